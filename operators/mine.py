"""QueryMiner: searches a batch of query vectors over every index shard, merges the top-k exactly, scores the
positives and applies the negative-selection rules (``operators.negatives``).

Needs ``query_id``, the query text, ``positive_ids`` (list) and the query ``embedding`` (from ``kalm embed`` with
the query prompt); adds ``pos_ids``/``pos_scores`` (positives found in the corpus), ``candidate_ids``/
``candidate_scores`` (the merged neighbours, best first), ``neg_ids``/``neg_scores`` (the chosen negatives),
``dropped`` (why a query yields no training row, "" otherwise) and ``removed`` (JSON: candidates removed per rule).
Queries never hold a query x corpus matrix: each call searches ``batch`` queries for ``k`` neighbours per shard.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from operators.lookup import lookup
from operators.negatives import SelectConfig, merge_topk, normalize_text, select_negatives
from operators.validate import REJECT_COLUMN, typed_table


@dataclass(frozen=True, kw_only=True)
class MineConfig:
    select: SelectConfig
    query_id_column: str = "query_id"
    query_column: str = "query"
    positives_column: str = "positive_ids"
    embedding_column: str = "embedding"
    text_rules: bool = True  # drop candidates whose text equals a positive's or the query's, and duplicate texts
    id_type: pa.DataType = pa.string()  # the corpus id type, so id lists are typed the same in every block


def _objects(values: list) -> np.ndarray:
    """A 1-d object array of lists (np.array would make a 2-d array when the lists have equal lengths)."""
    out = np.empty(len(values), dtype=object)
    out[:] = values
    return out


def _vectors(column) -> np.ndarray:
    return np.stack([np.asarray(v, dtype=np.float32) for v in column])


class QueryMiner:
    def __init__(self, cfg: MineConfig, shards: list, texts: list | None, positives_by_text: list | None = None):
        """positives_by_text: stores of normalised query text -> union of positive ids, so queries that share a
        text share their positives (sentence-transformers groups identical queries the same way); without it a
        positive of the twin query would be mined as a negative."""
        self.cfg, self.shards, self.texts, self.by_text = cfg, shards, texts, positives_by_text

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        import ray

        cfg = self.cfg
        n = len(batch[cfg.query_id_column])
        reasons = batch.get(REJECT_COLUMN, np.full(n, "", dtype=object)).copy()
        positives = [[] if p is None else list(p) for p in batch[cfg.positives_column]]
        if self.by_text is not None:
            shared = lookup(self.by_text, [normalize_text(str(t)) for t in batch[cfg.query_column]])
            positives = [own + [x for x in (more or []) if x not in own] for own, more in zip(positives, shared)]
        q = _vectors(batch[cfg.embedding_column])  # [B, D]
        k = cfg.select.candidates_needed(max((len(p) for p in positives), default=0))
        found = ray.get([s.search_ids.remote(q, k) for s in self.shards])
        names = {}
        for _, gids, ids in found:
            names.update(zip(gids.ravel().tolist(), ids.ravel().tolist()))
        scores, gids = merge_topk([f[0] for f in found], [f[1] for f in found], k)  # [B, k]
        pos_found = [{} for _ in range(n)]
        for part in ray.get([s.score_ids.remote(q, positives) for s in self.shards]):
            for i, d in enumerate(part):
                pos_found[i].update(d)
        out = {c: np.empty(n, dtype=object) for c in ("pos_ids", "pos_scores", "candidate_ids", "candidate_scores",
                                                      "neg_ids", "neg_scores", "removed")}  # fmt: skip
        dropped = np.full(n, "", dtype=object)
        cand_lists = [[names[g] for g in row if g >= 0] for row in gids.tolist()]
        text_of = {}
        if cfg.text_rules and self.texts is not None:
            wanted = list({x for i in range(n) for x in (*cand_lists[i], *positives[i])})
            text_of = dict(zip(wanted, lookup(self.texts, wanted)))
        for i in range(n):
            pos_ids = [p for p in positives[i] if p in pos_found[i]]
            pos_scores = np.array([pos_found[i][p] for p in pos_ids])
            cand, cs = cand_lists[i], scores[i, : len(cand_lists[i])]
            out["pos_ids"][i], out["pos_scores"][i] = pos_ids, pos_scores.tolist()
            out["candidate_ids"][i], out["candidate_scores"][i] = cand, cs.tolist()
            out["neg_ids"][i], out["neg_scores"][i], out["removed"][i] = [], [], "{}"
            if reasons[i]:
                continue
            if not positives[i]:
                reasons[i] = "no_positives"
                continue
            if not pos_ids:
                reasons[i] = "positives_not_in_corpus"
                continue
            sel = select_negatives(
                cand,
                cs,
                positive_ids=set(positives[i]),
                positive_scores=pos_scores,
                cfg=cfg.select,
                query_id=batch[cfg.query_id_column][i],
                cand_texts=[text_of.get(c) or "" for c in cand] if text_of else None,
                positive_texts=[text_of.get(p) or "" for p in positives[i]] if text_of else (),
                query_text=batch[cfg.query_column][i] if text_of else None,
            )
            out["neg_ids"][i] = [cand[j] for j in sel.chosen]
            out["neg_scores"][i] = cs[sel.chosen].tolist()
            counts = dict(sel.removed)
            if sel.padded:
                counts["padded"] = sel.padded
            if sel.short:
                counts["short"] = sel.short
            if len(pos_ids) < len(positives[i]):
                counts["positive_not_in_corpus"] = len(positives[i]) - len(pos_ids)
            out["removed"][i] = json.dumps(counts, sort_keys=True)
            dropped[i] = sel.dropped
        batch.update(out)
        batch["dropped"] = dropped
        batch[REJECT_COLUMN] = reasons
        batch.pop(cfg.embedding_column)
        ids, floats = pa.list_(cfg.id_type), pa.list_(pa.float64())
        types = {"pos_ids": ids, "candidate_ids": ids, "neg_ids": ids, "pos_scores": floats,
                 "candidate_scores": floats, "neg_scores": floats, cfg.positives_column: ids}  # fmt: skip
        return typed_table(batch, types)


def training_rows(batch: dict[str, np.ndarray], *, cfg: MineConfig, texts: list, prompt: str) -> pa.Table:
    """Candidates rows -> KaLM/FlagEmbedding training rows ``{query, pos, neg, pos_scores, neg_scores, prompt}``
    (texts looked up by id), keeping the ids. A query the rules dropped goes to the rejects with that reason."""
    n = len(batch[cfg.query_id_column])
    wanted = list({x for col in ("pos_ids", "neg_ids") for ids in batch[col] for x in ids})
    text_of = dict(zip(wanted, lookup(texts, wanted)))
    reasons = batch.get(REJECT_COLUMN, np.full(n, "", dtype=object)).copy()
    for i, why in enumerate(batch["dropped"]):
        reasons[i] = reasons[i] or why
    out = {
        "query": batch[cfg.query_column],
        "pos": _objects([[text_of[x] for x in ids] for ids in batch["pos_ids"]]),
        "neg": _objects([[text_of[x] for x in ids] for ids in batch["neg_ids"]]),
        "pos_scores": batch["pos_scores"],
        "neg_scores": batch["neg_scores"],
        "prompt": np.full(n, prompt, dtype=object),
        cfg.query_id_column: batch[cfg.query_id_column],
        "pos_ids": batch["pos_ids"],
        "neg_ids": batch["neg_ids"],
        REJECT_COLUMN: reasons,
        **{c: batch[c] for c in ("_source", "_row")},
    }
    texts_t, ids_t, floats = pa.list_(pa.string()), pa.list_(cfg.id_type), pa.list_(pa.float64())
    return typed_table(out, {"pos": texts_t, "neg": texts_t, "pos_ids": ids_t, "neg_ids": ids_t,
                             "pos_scores": floats, "neg_scores": floats})  # fmt: skip
