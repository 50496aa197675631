"""Pure tensor/array math of the embedding path: pooling, normalisation, Matryoshka, token-budget batching.

Kept free of Ray and model code so each rule is tested against a hand computation.
"""

from __future__ import annotations

import itertools

import numpy as np
import torch

POOLINGS = ("mean", "cls", "last")


def pool(hidden: torch.Tensor, mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """Pool token states into one vector per row.

    hidden: [B, L, H] (any float dtype; pooled in float32), mask: [B, L] with 1 for real tokens, padding on the right.
    Returns [B, H] float32.
    """
    hidden = hidden.float()
    if pooling == "mean":
        m = mask.to(hidden.dtype).unsqueeze(-1)  # [B, L, 1]
        # clamp: a row of all padding cannot reach here (empty texts are rejected), but never divide by zero.
        return (hidden * m).sum(dim=1) / m.sum(dim=1).clamp(min=1.0)
    if pooling == "cls":
        return hidden[:, 0]
    if pooling == "last":
        last = mask.long().sum(dim=1).clamp(min=1) - 1  # [B] index of the last real token (right padding)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")


def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Row-wise L2 normalisation of x: [N, D]. A zero row stays zero (no NaN)."""
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, eps)


def matryoshka(x: np.ndarray, dims: tuple[int, ...], normalize: bool = True) -> dict[int, np.ndarray]:
    """Matryoshka truncation: for each d in dims, the first d components of x: [N, D], re-normalised -> [N, d]."""
    out = {}
    for d in dims:
        if not 0 < d <= x.shape[1]:
            raise ValueError(f"Matryoshka dimension {d} is out of range 1..{x.shape[1]}")
        head = np.ascontiguousarray(x[:, :d])
        out[d] = l2_normalize(head) if normalize else head
    return out


def plan_token_batches(lengths: np.ndarray, max_tokens: int, max_rows: int) -> list[np.ndarray]:
    """Group rows into forward batches by a padded-token budget.

    lengths: [N] token counts. Rows are sorted by length (longest first, so an out-of-memory shows on the first
    batch, not after an hour), then packed greedily while rows * longest_in_batch <= max_tokens and
    rows <= max_rows. A single row longer than the budget still forms its own batch. Returns index arrays
    into the original order; together they cover every row exactly once.
    """
    order = np.argsort(-np.asarray(lengths), kind="stable")
    batches: list[np.ndarray] = []
    start = 0
    n = len(order)
    while start < n:
        longest = int(lengths[order[start]])  # sorted descending: the first row is the longest of its batch
        rows = max(1, min(max_rows, max_tokens // max(longest, 1)))
        batches.append(order[start : start + rows])
        start += rows
    return batches


def flatten(ids: list) -> tuple[np.ndarray, np.ndarray]:
    """N sequences of token ids -> (values [T] int32 back to back, offsets [N + 1] int64), the form ``pad_flat``
    pads from. One pass over the ids; no per-row array."""
    offsets = np.zeros(len(ids) + 1, dtype=np.int64)
    np.cumsum(np.fromiter(map(len, ids), dtype=np.int64, count=len(ids)), out=offsets[1:])
    return np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int32, count=int(offsets[-1])), offsets


def pad_flat(
    values: np.ndarray, offsets: np.ndarray, rows: np.ndarray, pad_id: int = 0, multiple: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """Rows ``rows`` of flat token ids -> (tokens [B, L] int64 right-padded with pad_id, lengths [B] int64).

    values: [T] ids of all rows back to back; offsets: [N + 1], row r is values[offsets[r]:offsets[r + 1]].
    L is the longest selected row rounded up to ``multiple``. One gather, no Python loop over rows.
    """
    starts = offsets[rows]
    lengths = offsets[rows + 1] - starts
    longest = int(lengths.max()) if len(rows) else 0
    longest = -(-longest // multiple) * multiple
    cols = np.arange(longest)
    real = cols[None, :] < lengths[:, None]  # [B, L]
    tokens = np.full((len(rows), longest), pad_id, dtype=np.int64)
    tokens[real] = values[(starts[:, None] + cols[None, :])[real]]
    return tokens, lengths.astype(np.int64)


def select_rows(values: np.ndarray, offsets: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The flat ids of rows ``rows`` only, back to back, with their offsets [len(rows) + 1]."""
    lengths = offsets[rows + 1] - offsets[rows]
    new = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum(lengths, out=new[1:])
    take = np.repeat(offsets[rows] - new[:-1], lengths) + np.arange(new[-1])
    return values[take], new
