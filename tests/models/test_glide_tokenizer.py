"""The GLIDE tokenizer against transformers' GPT-2 tokenizer built from the same (tiny, test-made) files."""

import collections
import gzip
import json

import pytest
import torch
from bpe_merges import learn_bpe_merges

from fastgen.models.glide_tokenizer import GlideTokenizer, byte_to_unicode, pre_tokenize

regex = pytest.importorskip("regex")
transformers = pytest.importorskip("transformers")

GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

TRAIN = (
    "an oil painting of a corgi. a corgi wearing a red bowtie and a purple party hat. "
    "a painting of the ocean at sunset; a photo of the city at night, in the style of van gogh. "
) * 3
CORPUS = [
    "an oil painting of a corgi",
    "A Corgi",
    "a CORGI's hat, they'll say: it's 2024!! we've 3.14 cats   and\tdogs\n\nend  ",
    "  leading spaces, trailing ones   ",
    "naïve café — über straße, ÉCOLE 東京 2½ ①²  🐕‍🦺 emoji\u00a0nbsp\u3000ideographic\u2009thin",
    "tabs\t\t\tand\r\nnewlines \n x 'd 'll 'm 're 's 't 've '",
    "",
    " ",
    "unseenwordszq xyzzy 12345678901234567890",
]


def _train_merges(text, n_merges):
    words = collections.Counter(
        tuple(byte_to_unicode()[b] for b in piece.encode()) for piece in regex.findall(GPT2_PATTERN, text)
    )
    return learn_bpe_merges(words, n_merges)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("bpe")
    merges = _train_merges(TRAIN, 80)
    vocab = [byte_to_unicode()[b] for b in range(256)] + [a + b for a, b in merges] + ["<|endoftext|>"]
    encoder = {tok: i for i, tok in enumerate(dict.fromkeys(vocab))}
    (d / "encoder.json").write_text(json.dumps(encoder))
    bpe = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges)
    (d / "vocab.bpe").write_text(bpe)
    (d / "vocab.bpe.gz").write_bytes(gzip.compress(bpe.encode()))
    hf = d / "hf"  # the same files under the names transformers loads from a local directory
    hf.mkdir()
    (hf / "vocab.json").write_text(json.dumps(encoder))
    (hf / "merges.txt").write_text(bpe)
    return d


@pytest.mark.parametrize("text", [*CORPUS, TRAIN])
def test_pre_tokenize_matches_the_gpt2_pattern(text):
    assert pre_tokenize(text) == regex.findall(GPT2_PATTERN, text)


def test_encode_equals_gpt2_tokenizer_on_lower_cased_text(files):
    ours = GlideTokenizer(files / "encoder.json", files / "vocab.bpe.gz")
    hf = transformers.GPT2Tokenizer.from_pretrained(str(files / "hf"))
    assert len(ours.ranks) > 60 and ours.end_token == ours.n_vocab - 1
    for text in [*CORPUS, TRAIN]:
        ids = ours.encode(text)
        assert ids == hf.encode(text.lower(), add_special_tokens=False), text
        assert ids == ours.encode(text.lower())
        assert ours.decode(ids) == text.lower()
    assert len(ours.encode("an oil painting of a corgi")) < len(
        "an oil painting of a corgi"
    )  # merges applied


def test_padded_tokens_and_mask_and_call(files):
    tok = GlideTokenizer(files / "encoder.json", files / "vocab.bpe")
    ids = tok.encode("a corgi")
    padded, mask = tok.padded_tokens_and_mask(ids, 8)
    assert padded == ids + [tok.end_token] * (8 - len(ids)) and mask == [True] * len(ids) + [False] * (
        8 - len(ids)
    )
    long = list(range(10))
    assert tok.padded_tokens_and_mask(long, 4) == (long[:4], [True] * 4)
    tokens, m = tok(["a corgi", ""], text_ctx=6)
    assert tokens.dtype == torch.long and m.dtype == torch.bool and tokens.shape == m.shape == (2, 6)
    assert tokens[1].eq(tok.end_token).all() and not m[1].any()
    assert tok.decode(torch.tensor(ids)) == "a corgi"
    with pytest.raises(ValueError, match="text_ctx"):
        tok.padded_tokens_and_mask(ids, -1)
    with pytest.raises(ValueError, match="not in the vocabulary"):
        tok.decode([10**6])
    with pytest.raises(TypeError, match="text must be a str"):
        tok.encode(b"bytes")


def test_release_files_give_the_release_ids():
    """With the real GPT-2 files (FASTGEN_GLIDE_BPE_DIR holding encoder.json and vocab.bpe, plain or .gz)."""
    import os
    from pathlib import Path

    d = os.environ.get("FASTGEN_GLIDE_BPE_DIR")
    if not d:
        pytest.skip("set FASTGEN_GLIDE_BPE_DIR to a directory with GPT-2's encoder.json and vocab.bpe")
    d = Path(d)

    def pick(name):
        return d / name if (d / name).exists() else d / f"{name}.gz"

    tok = GlideTokenizer(pick("encoder.json"), pick("vocab.bpe"))
    assert tok.n_vocab == 50257 and len(tok.ranks) == 50000 and tok.end_token == 50256
    assert tok.encode("an oil painting of a corgi") == [272, 3056, 12036, 286, 257, 1162, 12397]
    assert tok.encode("A Corgi") == [64, 1162, 12397]


def test_from_pretrained_directory_and_installed_package(files, tmp_path, monkeypatch):
    ref = GlideTokenizer(files / "encoder.json", files / "vocab.bpe")
    text = "An oil painting of a corgi, 2 dogs & 'em"
    assert GlideTokenizer.from_pretrained(files).encode(text) == ref.encode(text)
    # an installed glide_text2im package ships tokenizer/encoder.json.gz and vocab.bpe.gz
    pkg = tmp_path / "site" / "glide_text2im"
    (pkg / "tokenizer").mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise RuntimeError('the package must not be imported')\n")
    (pkg / "tokenizer" / "encoder.json.gz").write_bytes(gzip.compress((files / "encoder.json").read_bytes()))
    (pkg / "tokenizer" / "vocab.bpe.gz").write_bytes(gzip.compress((files / "vocab.bpe").read_bytes()))
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    assert GlideTokenizer.from_pretrained().encode(text) == ref.encode(text)
    with pytest.raises(FileNotFoundError, match=r"vocab\.bpe.*file not found.*glide_text2im/tokenizer"):
        (tmp_path / "only_encoder").mkdir()
        (tmp_path / "only_encoder" / "encoder.json").write_bytes((files / "encoder.json").read_bytes())
        GlideTokenizer.from_pretrained(tmp_path / "only_encoder")
