r"""Inception Score (Salimans et al. 2016, "Improved techniques for training GANs").

For class probabilities ``p(y|x_n)`` of N generated images, split into ``splits`` consecutive chunks
(chunk k = rows ``k N // splits .. (k + 1) N // splits - 1``, the original code's boundaries, which
torch-fidelity keeps; ``numpy.array_split`` / ``torch.tensor_split`` put the remainder elsewhere and give
other scores when ``N % splits != 0``)::

    IS_k = exp( mean_{n in chunk k} KL( p(y|x_n) || p_k(y) ) ),   p_k(y) = mean_{n in chunk k} p(y|x_n)

and the score is ``(mean_k IS_k, std_k IS_k)`` (population std, as the original code). Computed in float64;
``0 log 0 = 0``.
"""

from __future__ import annotations

import torch


def inception_score(probs: torch.Tensor, splits: int = 10) -> tuple[float, float]:
    """``probs``: (N, C) class probabilities (rows >= 0 summing to 1, e.g. softmax of Inception logits);
    ``splits``: number of chunks (1 <= splits <= N). Returns ``(mean, std)``: 1.0 for identical
    predictions, up to C for confident predictions spread evenly over the C classes."""
    if not isinstance(probs, torch.Tensor) or probs.dim() != 2:
        raise ValueError(
            f"inception_score: probs must be a (N, C) tensor, got {getattr(probs, 'shape', type(probs))}"
        )
    n = probs.shape[0]
    if not isinstance(splits, int) or isinstance(splits, bool) or not 1 <= splits <= n:
        raise ValueError(f"inception_score: splits must be an int in [1, N={n}], got {splits!r}")
    p = probs.to(torch.float64)
    if bool((p < 0).any()) or not torch.allclose(p.sum(1), torch.ones_like(p[:, 0]), atol=1e-3):
        raise ValueError("inception_score: probs must be non-negative with rows summing to 1 (apply softmax)")
    scores = []
    for k in range(splits):
        chunk = p[k * n // splits : (k + 1) * n // splits]
        py = chunk.mean(0, keepdim=True)
        kl = (torch.xlogy(chunk, chunk) - torch.xlogy(chunk, py)).sum(1).mean()
        scores.append(torch.exp(kl))
    s = torch.stack(scores)
    return float(s.mean()), float(s.std(unbiased=False))
