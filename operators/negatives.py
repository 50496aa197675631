"""Hard-negative selection rules and the exact merge of per-shard top-k lists: pure functions, no Ray, no model.

Semantics follow sentence-transformers' ``mine_hard_negatives`` (the fidelity reference), with its known bugs not
repeated:
- candidates come from the ANN search sorted by score, best first; positives (by id) are never negatives, nor are
  candidates whose normalised text equals a positive's or the query's, nor a second candidate with the same
  normalised text;
- then, in this order, each rule removes candidates and counts them (a candidate is counted by the first rule that
  removes it): ``absolute_margin`` (drop if neg + m > pos), ``relative_margin`` (drop if neg > pos - |pos| * m,
  NV-Retriever's TopK-PercPos; correct for negative scores), measured against the *lowest* positive score;
  ``max_score``; ``min_score``;
- the rank window ``[range_min, range_max)`` is taken over the survivors, then ``top`` takes the first
  ``num_negatives`` or ``random`` samples them with a per-query seed (the same query draws the same negatives
  whatever the batch or order), re-sorted by score;
- KaLM's ranking-consistency filter drops a whole query whose best positive ranks below ``consistency_rank``
  among the candidates;
- too few survivors: keep fewer (default), drop the query, or pad with random survivors from outside the window.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

SAMPLINGS = ("top", "random")
TOO_FEW = ("keep", "drop", "pad")
RULES = (
    "positive_id",
    "positive_text",
    "query_text",
    "duplicate_text",
    "absolute_margin",
    "relative_margin",
    "max_score",
    "min_score",
)


@dataclass(frozen=True, kw_only=True)
class SelectConfig:
    num_negatives: int = 7
    range_min: int = 0
    range_max: int | None = None  # default: range_min + 10 * num_negatives with a score rule, else + num_negatives
    min_score: float | None = None
    max_score: float | None = None
    absolute_margin: float | None = None
    relative_margin: float | None = None
    sampling: str = "top"
    seed: int = 0
    consistency_rank: int | None = None  # KaLM: drop a query whose best positive ranks at or below this
    too_few: str = "keep"

    def __post_init__(self):
        if self.sampling not in SAMPLINGS:
            raise ValueError(f"sampling must be one of {SAMPLINGS}, got {self.sampling!r}")
        if self.too_few not in TOO_FEW:
            raise ValueError(f"too_few must be one of {TOO_FEW}, got {self.too_few!r}")
        if self.num_negatives < 1 or self.range_min < 0:
            raise ValueError(f"need num_negatives >= 1 and range_min >= 0, got {self.num_negatives}, {self.range_min}")
        if self.window_end() - self.range_min < self.num_negatives:
            raise ValueError(
                f"range [{self.range_min}, {self.window_end()}) leaves fewer than num_negatives="
                f"{self.num_negatives} candidates; widen range_max or lower range_min"
            )
        for name in ("absolute_margin", "relative_margin"):
            value = getattr(self, name)
            if value is not None and not value >= 0:  # also refuses NaN
                # A negative margin keeps candidates scoring above the positive: the false negatives it is for.
                raise ValueError(f"{name} must be >= 0, got {value}")
        if self.consistency_rank is not None and self.consistency_rank < 1:
            raise ValueError(f"consistency_rank must be >= 1, got {self.consistency_rank}")

    def has_score_rule(self) -> bool:
        rules = (self.min_score, self.max_score, self.absolute_margin, self.relative_margin)
        return any(r is not None for r in rules)

    def window_end(self) -> int:
        if self.range_max is not None:
            return self.range_max
        return self.range_min + self.num_negatives * (10 if self.has_score_rule() else 1)

    def candidates_needed(self, max_positives: int) -> int:
        """How many neighbours to fetch per query: the window, plus room for the positives and for the query's own
        text in the corpus (dropped by the text rules), as sentence-transformers (6.3) fetches ``range_max +
        max_positives + 1``; plus ``num_negatives`` more when short lists are padded."""
        return self.window_end() + max_positives + 1 + (self.num_negatives if self.too_few == "pad" else 0)


@dataclass
class Selection:
    """One query's outcome: chosen candidate positions (into the candidate list), and why others were removed."""

    chosen: np.ndarray  # [n] int, sorted by score, best first
    removed: Counter = field(default_factory=Counter)  # rule -> candidates removed
    dropped: str = ""  # why the whole query was dropped ("" if kept)
    padded: int = 0  # negatives added by padding
    short: int = 0  # negatives missing (too_few="keep")


def normalize_text(text: str) -> str:
    """For duplicate detection: Unicode NFKC, case-folded, whitespace collapsed."""
    return re.sub(r"\s+", " ", unicodedata.normalize("NFKC", text)).strip().casefold()


def query_seed(seed: int, query_id) -> int:
    """A per-query random seed: stable across runs, batches and orders."""
    return int.from_bytes(hashlib.blake2b(f"{seed}\0{query_id!r}".encode(), digest_size=8).digest(), "little")


def select_negatives(
    cand_ids: list,
    cand_scores: np.ndarray,
    *,
    positive_ids: set,
    positive_scores: np.ndarray,
    cfg: SelectConfig,
    query_id=None,
    cand_texts: list[str] | None = None,
    positive_texts: list[str] = (),
    query_text: str | None = None,
) -> Selection:
    """Apply the rules to one query's candidates. cand_scores: [K] in search order (best first)."""
    scores = np.asarray(cand_scores, dtype=np.float64)  # [K]
    k = len(scores)
    alive = np.ones(k, dtype=bool)
    removed: Counter = Counter()

    def drop(mask: np.ndarray, rule: str) -> None:
        newly = mask & alive
        if newly.any():
            removed[rule] += int(newly.sum())
            alive[newly] = False

    is_positive = np.array([c in positive_ids for c in cand_ids], dtype=bool)
    drop(is_positive, "positive_id")
    if cand_texts is not None:
        norm = [normalize_text(t) for t in cand_texts]
        pos_norm = {normalize_text(t) for t in positive_texts}
        drop(np.array([t in pos_norm for t in norm], dtype=bool), "positive_text")
        if query_text is not None:
            q = normalize_text(query_text)
            drop(np.array([t == q for t in norm], dtype=bool), "query_text")
        seen: set = set()
        dup = np.zeros(k, dtype=bool)
        for i in np.argsort(-scores, kind="stable"):  # the best-scoring copy of a text stays
            if alive[i]:
                dup[i] = norm[i] in seen
                seen.add(norm[i])
        drop(dup, "duplicate_text")

    pos = np.asarray(positive_scores, dtype=np.float64)
    if cfg.consistency_rank is not None and len(pos):
        rank = int((scores[~is_positive] > pos.max()).sum())  # candidates ranked above the best positive
        if rank >= cfg.consistency_rank:
            return Selection(chosen=np.zeros(0, dtype=np.int64), removed=removed, dropped="ranking_consistency")
    if len(pos):
        p = pos.min()  # the hardest positive, as sentence-transformers and NV-Retriever
        if cfg.absolute_margin is not None:
            drop(scores + cfg.absolute_margin > p, "absolute_margin")
        if cfg.relative_margin is not None:
            drop(scores > p - abs(p) * cfg.relative_margin, "relative_margin")
    if cfg.max_score is not None:
        drop(scores > cfg.max_score, "max_score")
    if cfg.min_score is not None:
        drop(scores < cfg.min_score, "min_score")

    survivors = np.flatnonzero(alive)
    survivors = survivors[np.argsort(-scores[survivors], kind="stable")]  # best first
    window = survivors[cfg.range_min : cfg.window_end()]
    n = cfg.num_negatives
    if cfg.sampling == "top" or len(window) <= n:
        chosen = window[:n]
    else:
        rng = np.random.default_rng(query_seed(cfg.seed, query_id))
        chosen = rng.choice(window, size=n, replace=False)
    out = Selection(chosen=np.asarray(chosen, dtype=np.int64), removed=removed)
    if len(chosen) < n:
        if cfg.too_few == "drop":
            return Selection(chosen=np.zeros(0, dtype=np.int64), removed=removed, dropped="too_few_negatives")
        if cfg.too_few == "pad":
            rest = np.setdiff1d(survivors, chosen)
            rng = np.random.default_rng(query_seed(cfg.seed + 1, query_id))
            extra = rng.choice(rest, size=min(len(rest), n - len(chosen)), replace=False) if len(rest) else rest
            out.chosen = np.concatenate([out.chosen, extra]).astype(np.int64)
            out.padded = len(extra)
        out.short = n - len(out.chosen)
    out.chosen = out.chosen[np.argsort(-scores[out.chosen], kind="stable")]
    return out


def merge_topk(shard_scores: list[np.ndarray], shard_ids: list[np.ndarray], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k over shards. shard_scores[s], shard_ids[s]: [Q, k_s] (ids -1 = no result) -> scores, ids [Q, k].

    Each shard returns its own exact top-k, so the global top-k is within their union. Ties break by the smaller
    id, so the result does not depend on how the corpus was sharded.
    """
    scores = np.concatenate(shard_scores, axis=1)  # [Q, sum k_s]
    ids = np.concatenate(shard_ids, axis=1)
    scores = np.where(ids < 0, -np.inf, scores)
    order = np.lexsort((ids, -scores), axis=1)[:, :k]  # by score desc, then id asc
    top_scores = np.take_along_axis(scores, order, axis=1)
    top_ids = np.take_along_axis(ids, order, axis=1)
    top_ids = np.where(np.isinf(top_scores), -1, top_ids)
    if top_scores.shape[1] < k:  # fewer results than k in all shards together
        pad = k - top_scores.shape[1]
        top_scores = np.pad(top_scores, ((0, 0), (0, pad)), constant_values=-np.inf)
        top_ids = np.pad(top_ids, ((0, 0), (0, pad)), constant_values=-1)
    return top_scores, top_ids
