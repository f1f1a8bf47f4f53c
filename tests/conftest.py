import os

import pytest
import torch

# Triton kernels run under the interpreter when there is no GPU. Must be set before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

HAS_CUDA = torch.cuda.is_available()


# Resumable runs (benchmarks/gpu_check.sh full): with FASTGEN_RESUME_FILE set, every test that passes (or
# skips) appends its node id there the moment it finishes, and a later run deselects those ids, so a run
# cut off by a time limit continues where it stopped.
RESUME_FILE = os.environ.get("FASTGEN_RESUME_FILE")


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)
    if RESUME_FILE and os.path.exists(RESUME_FILE):
        with open(RESUME_FILE) as f:
            done = set(f.read().split())
        keep = [item for item in items if item.nodeid not in done]
        config.hook.pytest_deselected(items=[item for item in items if item.nodeid in done])
        items[:] = keep


def pytest_runtest_logreport(report):
    if RESUME_FILE and (
        (report.when == "call" and report.passed) or (report.when == "setup" and report.skipped)
    ):
        with open(RESUME_FILE, "a") as f:  # one short O_APPEND write per test: safe across xdist workers
            f.write(report.nodeid + "\n")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def record_calls(monkeypatch):
    """``record(module, *names, into=None)``: each named callable attribute of ``module`` (None: left alone)
    appends its name to the returned list (``into`` when given) on every call, then runs as before."""

    def record(module, *names, into=None):
        calls = [] if into is None else into
        for name in names:
            fn = getattr(module, name)
            if fn is not None:
                monkeypatch.setattr(module, name, lambda *a, _fn=fn, _n=name: calls.append(_n) or _fn(*a))
        return calls

    return record


@pytest.fixture
def poison_empty():
    """torch.empty / at::empty fill with NaN (ints: their max), so any element a kernel forgets to write
    shows up. Turns on deterministic mode (warn only) for the test, which that fill needs."""
    prev = torch.utils.deterministic.fill_uninitialized_memory
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.utils.deterministic.fill_uninitialized_memory = prev
    torch.use_deterministic_algorithms(was)
