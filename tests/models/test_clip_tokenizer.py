"""CLIP's BPE tokenizer against transformers' CLIPTokenizer built from the same files, and the discovery of
bpe_simple_vocab_16e6.txt.gz inside an installed open_clip / clip package.

The merges are learned here from a small corpus (a few hundred, by the usual most-frequent-pair rule); the
vocab.json handed to transformers is derived from them the way OpenAI's clip/simple_tokenizer.py defines
it: the 256 byte symbols, the same with </w>, one token per merge, then <|startoftext|>, <|endoftext|>."""

import collections
import gzip
import html
import importlib.util
import json

import pytest
import torch
from bpe_merges import learn_bpe_merges

from fastgen.models import clip
from fastgen.models.clip import BPE_FILE, SimpleTokenizer, find_bpe_file

regex = pytest.importorskip("regex")
transformers = pytest.importorskip("transformers")

# the pre-tokenizer pattern OpenAI's and transformers' CLIP tokenizers share
PATTERN = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""

TRAIN = (
    "a photo of a cat. a photo of a dog. an oil painting of the city at night; a drawing of two cats "
    "sitting on the grass, in the style of van gogh! there's a red car and it's parked near the station. "
    "we'll meet at 10:30 -- they've said the photographs are great. café naïve straße über 東京 "
    "a close-up portrait of a smiling woman wearing glasses, studio lighting, high resolution. "
    "an aerial view of mountains covered with snow under a blue sky with white clouds. "
    "a bowl of fresh fruit: apples, oranges, bananas and grapes on a wooden kitchen table. "
    "children playing football in the park during summer; people walking their dogs along the river. "
    "a black and white sketch of an old lighthouse beside the stormy ocean waves at sunset. "
    "the quick brown fox jumps over the lazy dog while birds are singing in the trees. "
) * 3
CORPUS = [
    "a photo of a cat",
    "A PHOTO of a Dog",
    "there's a cat; it's here. we'll see, they've gone, I'm ok, you're ok, he'd go",
    "numbers: 3.14159, 2024-01-01, 10:30pm, $1,000,000 and 1st 2nd",
    "  leading and trailing whitespace   ",
    "tabs\t\tand\nnew\r\nlines   and\u00a0nbsp\u3000ideographic\u2009thin",
    "punctuation!!! ... ??? (parens) [brackets] {braces} \"quotes\" 'single' — dashes – ok",
    "café naïve straße über ÉCOLE Ça",
    "cafe\u0301 decomposed accents: e\u0301 a\u0308",  # NFC-composed by both
    "東京タワー 中文 한국어 العربية עברית",
    "emoji 🐕‍🦺 🐱 👍🏽 ½ ² ① Ⅻ",
    "unseenwords zzqxj xylophone photographsphotographs",
    "a",
    "",
    "snake_case under_score, hash#tag @mention url://x.y/z?q=1&r=2",
    "the photo " * 40,  # longer than 77 tokens: truncated in tokenize
]
# differences by design, left out of the equality checks (each asserted to differ as described):
HTML = ["fish &amp; chips", "&lt;b&gt;bold&lt;/b&gt; &quot;q&quot; &#39;s &amp;amp;"]  # OpenAI unescapes HTML
# (twice), transformers does not
SIGMA = ["ΟΔΟΣ ΚΑΙ ΌΛΟΣ"]  # str.lower() writes a word-final Σ as ς; tokenizers' Lowercase maps it per
# character to σ


def bytes_to_unicode():
    """Byte -> printable character: printable Latin-1 bytes map to themselves, the rest to 256 + n in
    byte order (written out here independently of fastgen's helper)."""
    keep = [b for b in range(256) if 33 <= b <= 126 or 161 <= b <= 172 or 174 <= b <= 255]
    rest = [b for b in range(256) if b not in keep]
    return {**{b: chr(b) for b in keep}, **{b: chr(256 + i) for i, b in enumerate(rest)}}


def learn_merges(text, n):
    b2u = bytes_to_unicode()
    words = collections.Counter()
    for piece in regex.findall(PATTERN, " ".join(text.lower().split())):
        sym = [b2u[b] for b in piece.encode()]
        words[(*sym[:-1], sym[-1] + "</w>")] += 1
    return learn_bpe_merges(words, n)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("clip_bpe")
    merges = learn_merges(TRAIN, 300)
    assert len(merges) == 300
    body = "".join(f"{a} {b}\n" for a, b in merges)
    with gzip.open(d / BPE_FILE, "wt", encoding="utf-8") as f:
        f.write('"bpe_simple_vocab_16e6.txt#version: 0.2\n' + body)  # the OpenAI file's header line
    symbols = list(bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + [a + b for a, b in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    assert len(set(vocab)) == len(vocab)
    hf = d / "hf"
    hf.mkdir()
    (hf / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (hf / "merges.txt").write_text("#version: 0.2\n" + body)
    return d


@pytest.fixture(scope="module")
def pair(files):
    return SimpleTokenizer(files / BPE_FILE), transformers.CLIPTokenizer.from_pretrained(str(files / "hf"))


def test_ids_equal_transformers(pair):
    ours, ref = pair
    assert ours.vocab_size == 512 + 300 + 2 == len(ref)
    assert (ours.sot_token, ours.eot_token) == (ref.bos_token_id, ref.eos_token_id)
    merged = 0
    for text in CORPUS:
        ids = ours.encode(text)
        assert ids == ref(text, add_special_tokens=False)["input_ids"], text
        merged += sum(i >= 512 for i in ids)
        if ids:
            assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=True), text
    assert merged > 50  # the learned merges are exercised, not only byte symbols


def test_by_design_differences(pair):
    ours, ref = pair
    for text in HTML:
        assert ours.encode(text) != ref(text, add_special_tokens=False)["input_ids"]
        plain = html.unescape(html.unescape(text))
        assert ours.encode(text) == ref(plain, add_special_tokens=False)["input_ids"]
    for text in SIGMA:
        assert ours.encode(text) != ref(text, add_special_tokens=False)["input_ids"]
        assert ours.encode(text.replace("Σ", "σ")) == ref(text, add_special_tokens=False)["input_ids"]


def test_tokenize_rows_equal_transformers(pair):
    """Full rows: sot, ids, eot, then OpenAI's zero padding (transformers pads with eot: zeroed where its
    attention_mask is 0); a text longer than the context is cut to sot + 75 ids + eot by both."""
    ours, ref = pair
    rows = ours.tokenize(CORPUS, context_length=77, truncate=True)
    enc = ref(CORPUS, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    want = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, 0)
    assert torch.equal(rows, want)
    assert rows[-1, -1] == ours.eot_token and (rows[:-1] == ours.eot_token).sum(1).eq(1).all()


def test_from_pretrained_reads_hf_directory(files, pair):
    from_dir = SimpleTokenizer.from_pretrained(files / "hf")  # merges.txt, checked against vocab.json
    assert from_dir.encoder == pair[0].encoder
    assert from_dir.tokenize(CORPUS[:4]).tolist() == pair[0].tokenize(CORPUS[:4]).tolist()
    assert SimpleTokenizer.from_pretrained(files).encoder == pair[0].encoder  # the .gz in a directory
    bad = files / "bad"
    bad.mkdir()
    (bad / "merges.txt").write_text((files / "hf" / "merges.txt").read_text())
    vocab = json.loads((files / "hf" / "vocab.json").read_text())
    vocab["a</w>"], vocab["b</w>"] = vocab["b</w>"], vocab["a</w>"]
    (bad / "vocab.json").write_text(json.dumps(vocab))
    with pytest.raises(ValueError, match=r"not the vocab that merges\.txt defines"):
        SimpleTokenizer.from_pretrained(bad)


def fake_package(root, name, with_file=True, source=None):
    pkg = root / name
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise ImportError('importing the package is not needed')\n")
    if with_file:
        (pkg / BPE_FILE).write_bytes(source.read_bytes())
    return pkg


def test_discovery_in_installed_packages(tmp_path, monkeypatch, files, pair):
    real = importlib.util.find_spec
    hidden = set()
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n in hidden else real(n, *a))
    site = tmp_path / "site"
    monkeypatch.syspath_prepend(str(site))
    # OpenAI's clip package only (open_clip hidden, whether or not it is installed here)
    hidden.add("open_clip")
    pkg = fake_package(site, "clip", source=files / BPE_FILE)
    importlib.invalidate_caches()
    assert find_bpe_file() == pkg / BPE_FILE
    # open_clip first when both are there
    hidden.clear()
    oc = fake_package(site, "open_clip", source=files / BPE_FILE)
    importlib.invalidate_caches()
    assert find_bpe_file() == oc / BPE_FILE
    for tok in (SimpleTokenizer("auto"), SimpleTokenizer.from_pretrained()):
        assert tok.encoder == pair[0].encoder and tok.bpe_path == oc / BPE_FILE
        assert tok.encode(CORPUS[2]) == pair[0].encode(CORPUS[2])


def test_discovery_errors(tmp_path, monkeypatch, files):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n in clip._BPE_PACKAGES else real(n, *a)
    )
    with pytest.raises(
        FileNotFoundError, match=r"bpe_simple_vocab_16e6\.txt\.gz: not found \(neither open_clip"
    ):
        SimpleTokenizer("auto")
    monkeypatch.setattr(importlib.util, "find_spec", real)
    site = tmp_path / "site"
    monkeypatch.syspath_prepend(str(site))
    fake_package(site, "open_clip", with_file=False)
    fake_package(site, "clip", with_file=False)
    importlib.invalidate_caches()
    with pytest.raises(FileNotFoundError, match=r"searched \[.*open_clip.*comes with the open_clip package"):
        SimpleTokenizer.from_pretrained()
    with pytest.raises(FileNotFoundError, match=r"missing\.txt\.gz: file not found"):
        SimpleTokenizer(tmp_path / "missing.txt.gz")
    with pytest.raises(FileNotFoundError, match=r"bpe_simple_vocab_16e6\.txt\.gz: file not found"):
        SimpleTokenizer.from_pretrained(tmp_path)
    with pytest.raises(TypeError, match="bpe_path: expected"):
        SimpleTokenizer(3)
    (tmp_path / "broken.txt").write_text("#version: 0.2\na b\nc\n")
    with pytest.raises(ValueError, match="merge 1 is 'c', not two symbols"):
        SimpleTokenizer(tmp_path / "broken.txt")
