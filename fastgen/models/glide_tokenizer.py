"""The GLIDE tokenizer: GPT-2's byte-level BPE on LOWER-CASED text, read from local files.

GLIDE (Nichol et al. 2021, glide-text2im) tokenizes prompts with GPT-2's byte-level BPE
(``encoder.json``: 50,257 entries, ``vocab.bpe``: 50,000 merges) with one difference: the text is
lower-cased first. There is no start / end token and no text cleaning; ``padded_tokens_and_mask``
truncates to the model's text context (128) and pads with ``<|endoftext|>`` (50256), mask False there.

The algorithm, in three stages:

1. pre-tokenization, the GPT-2 pattern ``'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+|
   ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+`` (written here as a scanner over Unicode categories, so no
   third-party regex engine is needed);
2. each piece's UTF-8 bytes become printable characters (bytes that print map to themselves, the rest
   to code points 256, 257, ... in byte order), so every byte string has a vocabulary spelling;
3. BPE: repeatedly merge the adjacent pair with the lowest merge rank, then look the symbols up.

The files are never downloaded: pass local paths (plain or ``.gz``).
"""

from __future__ import annotations

import functools
import gzip
import json
import os
import unicodedata
from collections.abc import Sequence

import torch

from fastgen.models.hub import package_dirs

__all__ = ["GlideTokenizer", "byte_to_unicode", "pre_tokenize"]

END_OF_TEXT = "<|endoftext|>"

# Unicode White_Space (the set the GPT-2 pattern's \s matches), not str.isspace (which adds U+001C..1F).
_WHITESPACE = frozenset(
    "\t\n\x0b\x0c\r \x85\xa0\u1680\u2028\u2029\u202f\u205f\u3000" + "".join(map(chr, range(0x2000, 0x200B)))
)
_CONTRACTIONS = ("'s", "'t", "'re", "'ve", "'m", "'ll", "'d")


@functools.lru_cache(maxsize=1)
def byte_to_unicode() -> dict[int, str]:
    """The byte -> printable character table of GPT-2's byte-level BPE (256 entries, a bijection)."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    table = {b: chr(b) for b in printable}
    extra = 256
    for b in range(256):
        if b not in table:
            table[b] = chr(extra)
            extra += 1
    return table


def _kind(ch: str) -> str:
    """'s' whitespace, 'L' letter, 'N' number, 'o' anything else."""
    if ch in _WHITESPACE:
        return "s"
    cat = unicodedata.category(ch)[0]
    return cat if cat in "LN" else "o"


def pre_tokenize(text: str) -> list[str]:
    """Splits ``text`` like the GPT-2 pattern (see the module docstring); the pieces concatenate to text."""
    kinds = [_kind(c) for c in text]
    n, i, out = len(text), 0, []
    while i < n:
        if text[i] == "'":
            hit = next((c for c in _CONTRACTIONS if text.startswith(c, i)), None)
            if hit:
                out.append(hit)
                i += len(hit)
                continue
        # " ?X+" for X in letters / numbers / other: one optional U+0020 before a run of one kind.
        start = i
        j = i + 1 if text[i] == " " and i + 1 < n and kinds[i + 1] != "s" else i
        if kinds[j] != "s":
            k = kinds[j]
            j += 1
            while j < n and kinds[j] == k:
                j += 1
            out.append(text[start:j])
            i = j
            continue
        # A whitespace run: all of it at the end of the text or before more whitespace; before a
        # non-space character it leaves its last character (which then prefixes the next piece when
        # it is U+0020, or stands alone otherwise).
        j = i
        while j < n and kinds[j] == "s":
            j += 1
        if j < n and j - i > 1:
            j -= 1
        out.append(text[i:j])
        i = j
    return out


def _open_text(path: str | os.PathLike) -> str:
    with open(path, "rb") as f:
        data = f.read()
    if data[:2] == b"\x1f\x8b":  # gzip magic, whatever the file is called
        data = gzip.decompress(data)
    return data.decode("utf-8")


_FILES_NEEDED = (
    "GPT-2's encoder.json and vocab.bpe (plain or .gz): glide-text2im ships them as "
    "glide_text2im/tokenizer/encoder.json.gz and vocab.bpe.gz (github.com/openai/glide-text2im); the same "
    "files come with GPT-2 (github.com/openai/gpt-2, models/*/encoder.json and vocab.bpe)"
)


class GlideTokenizer:
    """GLIDE's tokenizer from a GPT-2 ``encoder.json`` and ``vocab.bpe`` (each plain or gzip).

    ``encode(text) -> list[int]`` (lower-cases first), ``decode(ids) -> str`` (invalid UTF-8 becomes
    U+FFFD), ``padded_tokens_and_mask(tokens, text_ctx=128) -> (tokens, mask)`` as lists, and
    ``__call__(prompts, text_ctx=128) -> (tokens (B, text_ctx) long, mask (B, text_ctx) bool)`` for
    the GLIDE models' ``forward``.
    """

    def __init__(self, encoder_path: str | os.PathLike, bpe_path: str | os.PathLike):
        self.encoder: dict[str, int] = json.loads(_open_text(encoder_path))
        if not isinstance(self.encoder, dict):
            raise ValueError(
                f"encoder_path must hold a JSON object (token -> id), got {type(self.encoder).__name__}"
            )
        self.decoder = {v: k for k, v in self.encoder.items()}
        lines = _open_text(bpe_path).split("\n")
        if lines and lines[0].startswith("#version"):
            lines = lines[1:]
        self.ranks: dict[tuple[str, str], int] = {}
        for line in lines:
            parts = line.split()
            if not parts:
                continue
            if len(parts) != 2:
                raise ValueError(f"bpe_path: each merge line must hold two symbols, got {line!r}")
            self.ranks.setdefault((parts[0], parts[1]), len(self.ranks))
        if END_OF_TEXT not in self.encoder:
            raise ValueError(f"encoder_path: the vocabulary has no {END_OF_TEXT!r} entry (the padding token)")
        self.end_token = self.encoder[END_OF_TEXT]
        self.byte_encoder = byte_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        self._bpe = functools.lru_cache(maxsize=65536)(self._bpe_uncached)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike | None = None) -> GlideTokenizer:
        """The tokenizer from a directory holding ``encoder.json`` and ``vocab.bpe`` (each plain or ``.gz``).

        ``directory`` None: the ``tokenizer/`` folder of an installed ``glide_text2im`` package (it ships
        ``encoder.json.gz`` and ``vocab.bpe.gz``). A missing file raises ``FileNotFoundError`` saying which
        file is needed and where it comes from. Nothing is downloaded.
        """
        if directory is None:
            found = next(iter(package_dirs("glide_text2im")), None)
            if found is None:
                raise FileNotFoundError(
                    "GlideTokenizer.from_pretrained(): no directory given and no glide_text2im package is "
                    f"installed. Pass a directory holding {_FILES_NEEDED}"
                )
            directory = os.path.join(found, "tokenizer")
        paths = []
        for name in ("encoder.json", "vocab.bpe"):
            cands = [os.path.join(directory, name), os.path.join(directory, name + ".gz")]
            hit = next((c for c in cands if os.path.isfile(c)), None)
            if hit is None:
                raise FileNotFoundError(f"{cands[0]} (or {name}.gz): file not found. Needed: {_FILES_NEEDED}")
            paths.append(hit)
        return cls(*paths)

    @property
    def n_vocab(self) -> int:
        return len(self.encoder)

    def _bpe_uncached(self, word: str) -> tuple[str, ...]:
        symbols = list(word)
        while len(symbols) > 1:
            best, best_rank = -1, None
            for i in range(len(symbols) - 1):
                r = self.ranks.get((symbols[i], symbols[i + 1]))
                if r is not None and (best_rank is None or r < best_rank):
                    best, best_rank = i, r
            if best < 0:
                break
            a, b = symbols[best], symbols[best + 1]
            merged, i = [], 0
            # Merge every occurrence of the pair, left to right, as one BPE step.
            while i < len(symbols):
                if i + 1 < len(symbols) and symbols[i] == a and symbols[i + 1] == b:
                    merged.append(a + b)
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        return tuple(symbols)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text.lower()`` (no start / end token)."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        ids = []
        for piece in pre_tokenize(text.lower()):
            word = "".join(self.byte_encoder[b] for b in piece.encode("utf-8"))
            for sym in self._bpe(word):
                try:
                    ids.append(self.encoder[sym])
                except KeyError:
                    raise ValueError(
                        f"the vocabulary has no entry for BPE symbol {sym!r} (of {piece!r})"
                    ) from None
        return ids

    def decode(self, tokens: Sequence[int] | torch.Tensor) -> str:
        """The text of ``tokens``; ids of invalid UTF-8 byte sequences decode to U+FFFD."""
        if isinstance(tokens, torch.Tensor):
            tokens = tokens.tolist()
        try:
            chars = "".join(self.decoder[int(t)] for t in tokens)
        except KeyError as e:
            raise ValueError(
                f"tokens: id {e.args[0]} is not in the vocabulary (0..{self.n_vocab - 1})"
            ) from None
        return bytes(self.byte_decoder[c] for c in chars).decode("utf-8", errors="replace")

    def padded_tokens_and_mask(
        self, tokens: Sequence[int], text_ctx: int = 128
    ) -> tuple[list[int], list[bool]]:
        """``tokens`` truncated to ``text_ctx`` and padded with ``<|endoftext|>``; mask False on padding."""
        if isinstance(text_ctx, bool) or not isinstance(text_ctx, int) or text_ctx < 0:
            raise ValueError(f"text_ctx must be an int >= 0, got {text_ctx!r}")
        tokens = list(tokens)[:text_ctx]
        pad = text_ctx - len(tokens)
        return tokens + [self.end_token] * pad, [True] * len(tokens) + [False] * pad

    def __call__(
        self, prompts: str | Sequence[str], text_ctx: int = 128
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens (B, text_ctx) long, mask (B, text_ctx) bool) for one prompt or a list of prompts."""
        if isinstance(prompts, str):
            prompts = [prompts]
        rows = [self.padded_tokens_and_mask(self.encode(p), text_ctx) for p in prompts]
        tokens = torch.tensor([r[0] for r in rows], dtype=torch.long).reshape(len(rows), text_ctx)
        mask = torch.tensor([r[1] for r in rows], dtype=torch.bool).reshape(len(rows), text_ctx)
        return tokens, mask
