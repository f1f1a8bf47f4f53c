"""Every ```python block of the README runs as written."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_examples():
    assert len(BLOCKS) >= 3


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_block_runs(index):
    exec(compile(BLOCKS[index], f"README.md[python block {index}]", "exec"), {})


def test_readme_stands_alone():
    """Every file the README links to is in the repository; nothing points outside it."""
    text = README.read_text()
    root = README.parent
    assert "../" not in text, "the README must not point outside the repository"
    for target in re.findall(r"\]\(([^)#\s]+)\)", text):
        if "://" not in target:
            assert (root / target).exists(), f"README links to {target}, which is not in the repository"
    for path in re.findall(r"`((?:docs|benchmarks)/[\w./-]+\.(?:md|sh|py))`", text):
        assert (root / path).exists(), f"README names {path}, which is not in the repository"
