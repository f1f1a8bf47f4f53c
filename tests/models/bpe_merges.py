"""Learning BPE merges from a tiny corpus, for the tokenizer tests (CLIP's and GLIDE's GPT-2 style)."""

import collections
import itertools


def learn_bpe_merges(words: collections.Counter, n: int) -> list[tuple[str, str]]:
    """Up to ``n`` merges learned from ``words`` (symbol tuple -> count): each round merges the most
    frequent adjacent pair everywhere (ties broken by the pair itself, so the result is deterministic)."""
    merges = []
    for _ in range(n):
        pairs = collections.Counter()
        for w, c in words.items():
            for p in itertools.pairwise(w):
                pairs[p] += c
        if not pairs:
            break
        best = max(pairs, key=lambda p: (pairs[p], p))
        merges.append(best)
        new = collections.Counter()
        for w, c in words.items():
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and (w[i], w[i + 1]) == best:
                    out.append(w[i] + w[i + 1])
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            new[tuple(out)] += c
        words = new
    return merges
