"""Mining operators, in pipeline order: ``QueryMiner`` (search every index shard, merge the top-k exactly, score
the positives) -> ``CandidateTeacher`` (optional: the teacher rescores positives and candidates) ->
``NegativeSelector`` (the selection rules of ``operators.negatives``) -> ``training_rows`` / ``st_rows`` (the
KaLM/FlagEmbedding and sentence-transformers training files).

The candidates table (what ``QueryMiner`` and ``CandidateTeacher`` add, ID-keyed) holds everything selection
needs, so ``kalm select`` re-applies other rules to it with ``NegativeSelector`` alone, without searching again:
- ``pos_ids``/``pos_scores``: the query's positives found in the corpus (with those of queries sharing its
  normalised text, as sentence-transformers groups them) and their student scores; ``pos_ranks``: each
  positive's rank among the non-positive candidates (0 = above all of them);
- ``candidate_ids``/``candidate_scores``: the merged neighbours, best first (list position = student rank);
- ``teacher_pos_scores``/``teacher_candidate_scores`` when a teacher rescored them;
- ``missing_positives``: positives named by the query but absent from the corpus.
``NegativeSelector`` adds ``neg_ids``/``neg_scores`` (the chosen negatives, scored by the teacher when there is
one), ``dropped`` (why a query yields no training row, "" otherwise) and ``removed`` (JSON: candidates removed per
rule). Queries never hold a query x corpus matrix: each call searches one batch for ``k`` neighbours per shard.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from operators.arrow import object_array
from operators.lookup import lookup
from operators.negatives import SelectConfig, merge_topk, normalize_text, select_negatives
from operators.validate import REJECT_COLUMN, TrainingRowsConfig, typed_table, validate_training_rows

TEACHER_COLUMNS = ("teacher_pos_scores", "teacher_candidate_scores")


@dataclass(frozen=True, kw_only=True)
class MineConfig:
    select: SelectConfig
    query_id_column: str = "query_id"
    query_column: str = "query"
    positives_column: str = "positive_ids"
    embedding_column: str = "embedding"
    text_rules: bool = True  # drop candidates whose text equals a positive's or the query's, and duplicate texts
    id_type: pa.DataType = pa.string()  # the corpus id type, so id lists are typed the same in every block
    max_positives: int = 1  # the most positives any query has (with those of queries sharing its text)
    pool: int | None = None  # neighbours kept per query; default: what ``select`` needs (``window``)

    def window(self) -> int:
        """Neighbours the rules select from: the window plus room for the positives, the query's own text (and for
        padding), with the run's largest positive count for every query, as sentence-transformers' ``range_max +
        max_positives + 1``. Fixed for the run, so a row's negatives depend neither on its batch nor on how many
        neighbours the table kept."""
        return self.select.candidates_needed(self.max_positives)

    def pool_size(self) -> int:
        return max(self.pool or 0, self.window())

    def types(self) -> dict[str, pa.DataType]:
        ids, floats = pa.list_(self.id_type), pa.list_(pa.float64())
        return {"pos_ids": ids, "candidate_ids": ids, "neg_ids": ids, self.positives_column: ids,
                "pos_scores": floats, "candidate_scores": floats, "neg_scores": floats,
                "pos_ranks": pa.list_(pa.int64()), **{c: floats for c in TEACHER_COLUMNS}}  # fmt: skip


def _vectors(column) -> np.ndarray:
    return np.stack([np.asarray(v, dtype=np.float32) for v in column])


def _lists(column, n: int) -> list[list]:
    """A list column as Python lists (Arrow gives None for a null list, numpy arrays for others)."""
    if column is None:
        return [[] for _ in range(n)]
    return [[] if v is None else list(v) for v in column]


def _reasons(batch: dict, n: int) -> np.ndarray:
    return batch.get(REJECT_COLUMN, np.full(n, "", dtype=object)).copy()


class QueryMiner:
    def __init__(self, cfg: MineConfig, shards: list, positives_by_text: list | None = None):
        """positives_by_text: stores of normalised query text -> union of positive ids, so queries that share a
        text share their positives (sentence-transformers groups identical queries the same way); without it a
        positive of the twin query would be mined as a negative."""
        self.cfg, self.shards, self.by_text = cfg, shards, positives_by_text

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        import ray

        cfg = self.cfg
        n = len(batch[cfg.query_id_column])
        reasons = _reasons(batch, n)
        own = _lists(batch[cfg.positives_column], n)
        positives = [list(p) for p in own]
        if self.by_text is not None:
            shared = lookup(self.by_text, [normalize_text(str(t)) for t in batch[cfg.query_column]])
            positives = [p + [x for x in (more or []) if x not in p] for p, more in zip(positives, shared)]
        q = _vectors(batch[cfg.embedding_column])  # [B, D]
        k = cfg.pool_size()
        found = ray.get([s.search_ids.remote(q, k) for s in self.shards])
        names = {}
        for _, gids, ids in found:
            names.update(zip(gids.ravel().tolist(), ids.ravel().tolist()))
        scores, gids = merge_topk([f[0] for f in found], [f[1] for f in found], k)  # [B, k]
        pos_found = [{} for _ in range(n)]
        for part in ray.get([s.score_ids.remote(q, positives) for s in self.shards]):
            for i, d in enumerate(part):
                pos_found[i].update(d)
        cols = ("pos_ids", "pos_scores", "pos_ranks", "candidate_ids", "candidate_scores")
        out = {c: np.empty(n, dtype=object) for c in cols}
        missing = np.zeros(n, dtype=np.int64)
        for i in range(n):
            pos_ids = [p for p in positives[i] if p in pos_found[i]]
            cand = [names[g] for g in gids[i].tolist() if g >= 0]
            cs = scores[i, : len(cand)]
            pos_scores = [pos_found[i][p] for p in pos_ids]
            is_pos = set(positives[i])
            others = np.array([s for c, s in zip(cand, cs.tolist()) if c not in is_pos])
            out["pos_ids"][i], out["pos_scores"][i] = pos_ids, pos_scores
            out["pos_ranks"][i] = [int((others > s).sum()) for s in pos_scores]
            out["candidate_ids"][i], out["candidate_scores"][i] = cand, cs.tolist()
            missing[i] = sum(p not in pos_found[i] for p in own[i])
            if reasons[i]:
                continue
            if not own[i]:
                reasons[i] = "no_positives"
            elif not pos_ids:
                reasons[i] = "positives_not_in_corpus"
        batch.update(out)
        batch[cfg.positives_column] = object_array(own)
        batch["missing_positives"] = missing
        batch[REJECT_COLUMN] = reasons
        batch.pop(cfg.embedding_column)
        return typed_table(batch, cfg.types())


class CandidateTeacher:
    """Rescores each query's positives and candidates with the teacher (``operators.teacher.TeacherScorer``: bi- or
    cross-encoder, token-budget batches, each distinct text or pair scored once). Texts come from the corpus store.
    Adds ``teacher_pos_scores`` and ``teacher_candidate_scores``, aligned with ``pos_ids`` and ``candidate_ids``."""

    def __init__(self, cfg: MineConfig, teacher, texts: list):
        from dataclasses import replace

        from operators.teacher import TeacherScorer

        self.cfg, self.texts = cfg, texts
        self.teacher = replace(teacher, query_column="_query", pos_column="_pos", neg_column="_cand",
                               prompt_column="_no_prompt")  # fmt: skip
        self.scorer = TeacherScorer(self.teacher)

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        cfg = self.cfg
        n = len(batch[cfg.query_id_column])
        reasons = _reasons(batch, n)
        pos, cand = _lists(batch["pos_ids"], n), _lists(batch["candidate_ids"], n)
        wanted = list({x for i in range(n) if not reasons[i] for x in (*pos[i], *cand[i])})
        text_of = dict(zip(wanted, lookup(self.texts, wanted)))
        for i in range(n):
            if not reasons[i] and any(text_of.get(x) is None for x in (*pos[i], *cand[i])):
                reasons[i] = "corpus_text_missing"  # an indexed id whose text the corpus table lacks
        ok = reasons == ""
        sub = {
            "_query": batch[cfg.query_column],
            "_pos": object_array([[text_of[x] for x in p] if k else [] for p, k in zip(pos, ok)]),
            "_cand": object_array([[text_of[x] for x in c] if k else [] for c, k in zip(cand, ok)]),
            REJECT_COLUMN: reasons,
        }
        scored = self.scorer(sub)
        batch["teacher_pos_scores"] = object_array(scored.column("pos_scores").to_pylist())
        batch["teacher_candidate_scores"] = object_array(scored.column("neg_scores").to_pylist())
        batch[REJECT_COLUMN] = np.array(scored.column(REJECT_COLUMN).to_pylist(), dtype=object)  # + non-finite
        return typed_table(batch, cfg.types())


class NegativeSelector:
    """Applies the selection rules to candidates rows (from ``QueryMiner``, ``CandidateTeacher`` or an earlier
    candidates table). Scores are the teacher's where the rows carry them, else the student's. ``texts``: the corpus
    store, for the text rules (None: no text rules)."""

    def __init__(self, cfg: MineConfig, texts: list | None):
        self.cfg, self.texts = cfg, texts if cfg.text_rules else None

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        cfg = self.cfg
        n = len(batch[cfg.query_id_column])
        reasons = _reasons(batch, n)
        teacher = TEACHER_COLUMNS[0] in batch
        pos_ids, cand = _lists(batch["pos_ids"], n), _lists(batch["candidate_ids"], n)
        named = _lists(batch[cfg.positives_column], n)
        pos_scores = _lists(batch[TEACHER_COLUMNS[0] if teacher else "pos_scores"], n)
        cand_scores = _lists(batch[TEACHER_COLUMNS[1] if teacher else "candidate_scores"], n)
        text_of = {}
        if self.texts is not None:
            wanted = list({x for i in range(n) if not reasons[i] for x in (*cand[i], *pos_ids[i], *named[i])})
            text_of = dict(zip(wanted, lookup(self.texts, wanted)))
        out = {c: np.empty(n, dtype=object) for c in ("neg_ids", "neg_scores", "removed")}
        dropped = np.full(n, "", dtype=object)
        for i in range(n):
            out["neg_ids"][i], out["neg_scores"][i], out["removed"][i] = [], [], "{}"
            if reasons[i]:
                continue
            exclude = [*named[i], *(p for p in pos_ids[i] if p not in named[i])]
            # The rules see the neighbours they would have been mined with, however many the table kept (--pool), so
            # re-selecting equals mining afresh with these rules.
            keep = cfg.window()
            scores = np.asarray(cand_scores[i][:keep], dtype=np.float64)
            sel = select_negatives(
                cand[i][:keep],
                scores,
                positive_ids=set(exclude),
                positive_scores=np.asarray(pos_scores[i], dtype=np.float64),
                cfg=cfg.select,
                query_id=batch[cfg.query_id_column][i],
                cand_texts=[text_of.get(c) or "" for c in cand[i][:keep]] if text_of else None,
                positive_texts=[text_of[p] for p in exclude if text_of.get(p)] if text_of else (),
                query_text=batch[cfg.query_column][i] if text_of else None,
            )
            out["neg_ids"][i] = [cand[i][j] for j in sel.chosen]
            out["neg_scores"][i] = scores[sel.chosen].tolist()
            counts = dict(sel.removed)
            if sel.padded:
                counts["padded"] = sel.padded
            if sel.short:
                counts["short"] = sel.short
            out["removed"][i] = json.dumps(counts, sort_keys=True)
            dropped[i] = sel.dropped
        batch.update(out)
        batch["dropped"] = dropped
        batch[REJECT_COLUMN] = reasons
        return typed_table(batch, cfg.types())


def _label_scores(batch: dict) -> np.ndarray:
    """The positives' scores that go with ``neg_scores`` (the teacher's when it scored the candidates)."""
    return batch[TEACHER_COLUMNS[0]] if TEACHER_COLUMNS[0] in batch else batch["pos_scores"]


def _text_lists(texts: list, *columns) -> list[list[list[str]]]:
    wanted = list({x for col in columns for ids in col for x in ([] if ids is None else ids)})
    text_of = dict(zip(wanted, lookup(texts, wanted)))
    return [[[text_of[x] for x in ([] if ids is None else ids)] for ids in col] for col in columns]


def _with_dropped(batch: dict, n: int) -> np.ndarray:
    reasons = _reasons(batch, n)
    for i, why in enumerate(batch["dropped"]):
        reasons[i] = reasons[i] or why
    return reasons


def training_rows(batch: dict[str, np.ndarray], *, cfg: MineConfig, texts: list, prompt: str) -> pa.Table:
    """Candidates rows -> KaLM/FlagEmbedding training rows ``{query, pos, neg, pos_scores, neg_scores, prompt}``
    (texts looked up by id), keeping the ids. A query the rules dropped goes to the rejects with that reason."""
    n = len(batch[cfg.query_id_column])
    pos, neg = _text_lists(texts, batch["pos_ids"], batch["neg_ids"])
    out = {
        "query": batch[cfg.query_column],
        "pos": object_array(pos),
        "neg": object_array(neg),
        "pos_scores": _label_scores(batch),
        "neg_scores": batch["neg_scores"],
        "prompt": np.full(n, prompt, dtype=object),
        cfg.query_id_column: batch[cfg.query_id_column],
        "pos_ids": batch["pos_ids"],
        "neg_ids": batch["neg_ids"],
        REJECT_COLUMN: _with_dropped(batch, n),
        **{c: batch[c] for c in ("_source", "_row")},
    }
    texts_t, ids_t, floats = pa.list_(pa.string()), pa.list_(cfg.id_type), pa.list_(pa.float64())
    return typed_table(out, {"pos": texts_t, "neg": texts_t, "pos_ids": ids_t, "neg_ids": ids_t,
                             "pos_scores": floats, "neg_scores": floats})  # fmt: skip


def st_columns(num_negatives: int) -> tuple[str, ...]:
    return ("anchor", "positive", *(f"negative_{i}" for i in range(1, num_negatives + 1)))


def st_rows(batch: dict[str, np.ndarray], *, cfg: MineConfig, texts: list) -> pa.Table:
    """Candidates rows -> sentence-transformers' n-tuple form ``anchor, positive, negative_1..n``: one row per
    (query, positive), as ``mine_hard_negatives(output_format="n-tuple")``. The columns are fixed, so a query with
    fewer than ``num_negatives`` negatives cannot fill them: it goes to the rejects as ``fewer_negatives_than_columns``
    (it is in the JSONL file with what it has). Several rows share their query's ``_source``/``_row``."""
    n = len(batch[cfg.query_id_column])
    k = cfg.select.num_negatives
    reasons = _with_dropped(batch, n)
    neg_ids = _lists(batch["neg_ids"], n)
    for i in range(n):
        if not reasons[i] and len(neg_ids[i]) < k:
            reasons[i] = "fewer_negatives_than_columns"
    pos, neg = _text_lists(texts, batch["pos_ids"], neg_ids)
    for i in range(n):
        if not reasons[i] and not pos[i]:
            reasons[i] = "no_positives"  # keeps the query counted: it would otherwise yield no row at all
    pairs = [(i, r) for i in range(n) for r in (range(len(pos[i])) if not reasons[i] else [None])]
    rows = np.asarray([i for i, _ in pairs], dtype=np.int64)
    out = {
        "anchor": object_array([batch[cfg.query_column][i] for i in rows]),
        "positive": object_array([None if r is None else pos[i][r] for i, r in pairs]),
        **{f"negative_{j + 1}": object_array([None if r is None else neg[i][j] for i, r in pairs]) for j in range(k)},
        cfg.query_id_column: batch[cfg.query_id_column][rows],
        REJECT_COLUMN: reasons[rows],
        **{c: batch[c][rows] for c in ("_source", "_row")},
    }
    return typed_table(out, {c: pa.string() for c in st_columns(k)})


def text_id(text: str) -> str:
    """The id of a text given inline (FlagEmbedding rows name their positives by text): a hash of the exact text,
    so the same text gets the same id in every row, file and run, and the pool can be deduplicated by id."""
    return "t-" + hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=10).hexdigest()


def text_queries(batch: dict[str, np.ndarray], *, rows: TrainingRowsConfig, query_id_column: str,
                 positives_column: str) -> pa.Table:  # fmt: skip
    """KaLM/FlagEmbedding rows ``{query, pos, neg}`` (texts) -> ID-keyed queries ``query_id, query, positive_ids``
    with ``text_id`` ids; a row that cannot be mined (no query text, no positive, a null text) is rejected, named."""
    batch = validate_training_rows(batch, cfg=rows)
    ids = [[text_id(t) for t in p] if not r else [] for p, r in zip(batch[rows.pos_column], batch[REJECT_COLUMN])]
    queries = [q if isinstance(q, str) else None for q in batch[rows.query_column]]  # a rejected query may be any type
    out = {query_id_column: batch[query_id_column], rows.query_column: object_array(queries),
           positives_column: object_array(ids),
           **{c: batch[c] for c in (REJECT_COLUMN, "_source", "_row")}}  # fmt: skip
    return typed_table(out, {positives_column: pa.list_(pa.string()), rows.query_column: pa.string(),
                             query_id_column: pa.string()})  # fmt: skip


def pool_texts(batch: dict[str, np.ndarray], *, rows: TrainingRowsConfig, negatives: bool) -> pa.Table:
    """KaLM/FlagEmbedding rows -> the candidate pool ``id, text``: each row's positives, and its negatives when
    ``negatives`` (no corpus given). One pool row per text (duplicates across rows share an id; ``kalm embed``
    keeps the first and counts the others as ``id_duplicate``); a row that cannot be mined goes to the rejects."""
    batch = validate_training_rows(batch, cfg=rows)
    reasons = batch[REJECT_COLUMN]
    ids, texts, src, pos, why = [], [], [], [], []
    for i, r in enumerate(reasons):
        items = [] if r else [*batch[rows.pos_column][i], *((batch[rows.neg_column][i] or []) if negatives and
                                                             rows.neg_column in batch else [])]  # fmt: skip
        for t in dict.fromkeys(items) if items else [None]:
            ids.append(None if t is None else text_id(t))
            texts.append(t)
            src.append(batch["_source"][i])
            pos.append(batch["_row"][i])
            why.append(r or ("" if t is not None else "pos_empty"))
    return pa.table({"id": pa.array(ids, pa.string()), "text": pa.array(texts, pa.string()),
                     "_source": pa.array(src, pa.string()), "_row": pa.array(pos, pa.int64()),
                     REJECT_COLUMN: pa.array(why, pa.string())})  # fmt: skip
