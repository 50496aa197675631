"""TeacherScorer: teacher scores for (query, candidate) pairs, the soft labels of KaLM-style distillation.

Needs ``query``, ``pos`` (list of texts), ``neg`` (list of texts, may be empty) and ``_reject`` (from
``validate_training_rows``); optional per-row ``prompt``. Adds ``pos_scores`` and ``neg_scores`` aligned with
``pos`` and ``neg`` (FlagEmbedding's names) and, with a temperature, ``teacher_probs`` = softmax over
[pos..., neg...] / temperature. Rejected rows pass through with empty score lists. Returns an Arrow table with
the list columns typed (list<string>, list<double>), so blocks always concatenate.

- ``bi-encoder`` (what KaLM V2.5 used): queries with their instruction prompt, documents with the document prompt
  (none by default), pooled as the embedder does, L2-normalised: the score is the cosine. Each distinct query and
  document text of a batch is embedded once.
- ``cross-encoder``: ``AutoModelForSequenceClassification`` on (query, document) pairs, the tokenizer's own
  pair encoding (or ``pair_template`` as one text); the first logit, raw or through a sigmoid. Each distinct
  pair of a batch is scored once.

All texts (or pairs) of a batch are length-sorted and packed by a padded-token budget, then folded back into their
rows in order. Tokenisation runs inside this actor (Rust, batched): a bi-encoder deduplicates texts before
tokenising, which a separate tokenizer stage could not do without shipping every candidate's ids between actors.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from operators.embed import EmbedConfig, Embedder
from operators.model import (
    COMPUTE_DTYPES,
    ModelInfo,
    cpu_threads,
    load_model,
    load_tokenizer,
    select_device,
    to_device,
)
from operators.pooling import POOLINGS, flatten, l2_normalize, pad_flat, plan_token_batches
from operators.tokenize import apply_prompt
from operators.validate import REJECT_COLUMN, typed_table

logger = logging.getLogger(__name__)

KINDS = ("bi-encoder", "cross-encoder")
ACTIVATIONS = ("none", "sigmoid")
SCORE_COLUMNS = ("pos_scores", "neg_scores")
PROBS_COLUMN = "teacher_probs"


@dataclass(frozen=True, kw_only=True)
class TeacherConfig:
    model: ModelInfo
    kind: str = "bi-encoder"
    query_column: str = "query"
    pos_column: str = "pos"
    neg_column: str = "neg"
    prompt_column: str = "prompt"  # a row's own query instruction (FlagEmbedding), prepended to its query
    query_prompt: str | None = None  # template with {text}, or a prefix; used when a row has no prompt
    document_prompt: str | None = None
    pair_template: str | None = None  # cross-encoder: e.g. "{query} [SEP] {document}"; None: the tokenizer's pairs
    max_length: int = 512
    pooling: str = "mean"
    activation: str = "none"
    temperature: float | None = None  # adds teacher_probs
    compute_dtype: str = "auto"
    attn_implementation: str = "auto"  # see operators.model.attention_candidates
    bidirectional: bool = False
    trust_remote_code: bool = False
    device: str = "auto"
    max_tokens: int = 2048
    max_rows: int = 64
    batch_size: int = 256  # rows per actor call
    replicas: int = 1
    replicas_per_node: int | None = None  # the replicas sharing one node's cores (CPU threads); default: all
    num_gpus: float = 0.0
    num_cpus: float = 0.5
    torch_threads: int | None = None
    # Bi-encoder: memory per replica for the vectors of texts already embedded, so a text met again in a later
    # batch is not embedded again. Mining sends the same popular documents as candidates of many queries (on the
    # bundled sample each document comes back ~7 times); 0 turns it off.
    cache_mb: float = 256.0

    def __post_init__(self):
        if self.cache_mb < 0:
            raise ValueError(f"cache_mb must be >= 0, got {self.cache_mb}")
        if self.replicas_per_node is not None and not 1 <= self.replicas_per_node <= self.replicas:
            raise ValueError(f"replicas_per_node must be in 1..replicas ({self.replicas}), got "
                             f"{self.replicas_per_node}")  # fmt: skip
        for name, value, valid in (
            ("kind", self.kind, KINDS),
            ("activation", self.activation, ACTIVATIONS),
            ("pooling", self.pooling, POOLINGS),
            ("compute_dtype", self.compute_dtype, COMPUTE_DTYPES),
        ):
            if value not in valid:
                raise ValueError(f"{name} must be one of {valid}, got {value!r}")
        if self.temperature is not None and not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        t = self.pair_template
        if t is not None and not ("{query}" in t and "{document}" in t):
            raise ValueError(f"pair_template must contain {{query}} and {{document}}, got {self.pair_template!r}")
        if self.kind == "bi-encoder" and self.activation != "none":
            raise ValueError("activation applies to cross-encoders; a bi-encoder's score is the cosine")
        if self.max_length < 2 or self.max_tokens < self.max_length or self.max_rows < 1 or self.batch_size < 1:
            raise ValueError("need max_length >= 2, max_tokens >= max_length, max_rows >= 1 and batch_size >= 1")

    def embed_config(self) -> EmbedConfig:
        return EmbedConfig(
            model=self.model,
            pooling=self.pooling,
            compute_dtype=self.compute_dtype,
            attn_implementation=self.attn_implementation,
            bidirectional=self.bidirectional,
            trust_remote_code=self.trust_remote_code,
            device=self.device,
            max_tokens=self.max_tokens,
            max_rows=self.max_rows,
            replicas=self.replicas,
            replicas_per_node=self.replicas_per_node,
            num_gpus=self.num_gpus,
            num_cpus=self.num_cpus,
            torch_threads=self.torch_threads,
        )


def flatten_pairs(pos: list[list], neg: list[list]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per row, candidates = pos + neg. -> row of each pair [P], #pos per row [N], #neg per row [N]."""
    n_pos = np.array([len(p) for p in pos], dtype=np.int64)
    n_neg = np.array([len(x) for x in neg], dtype=np.int64)
    return np.repeat(np.arange(len(pos)), n_pos + n_neg), n_pos, n_neg


def fold_scores(scores: np.ndarray, n_pos: np.ndarray, n_neg: np.ndarray) -> tuple[list, list]:
    """Pair scores [P] in flatten_pairs order -> per row (pos scores [n_pos], neg scores [n_neg])."""
    ends = np.cumsum(n_pos + n_neg)
    starts = ends - n_pos - n_neg
    pos = [scores[s : s + p] for s, p in zip(starts, n_pos)]
    neg = [scores[s + p : e] for s, p, e in zip(starts, n_pos, ends)]
    return pos, neg


def softmax(scores: np.ndarray, temperature: float) -> np.ndarray:
    """[K] -> [K] probabilities of softmax(scores / temperature), computed stably in float64."""
    z = np.asarray(scores, dtype=np.float64) / temperature
    if len(z) == 0:
        return z
    e = np.exp(z - z.max())
    return e / e.sum()


class VectorCache:
    """Least-recently-used text -> vector map bounded in bytes. By hand: ``functools.lru_cache`` caches one call's
    result, while here a batch's texts are split into cached ones and one batched forward for the rest."""

    def __init__(self, max_bytes: int):
        from collections import OrderedDict

        self.max_bytes, self.bytes, self.items = max_bytes, 0, OrderedDict()
        self.hits = self.misses = 0

    def get(self, key: str) -> np.ndarray | None:
        v = self.items.get(key)
        if v is None:
            self.misses += 1
            return None
        self.hits += 1
        self.items.move_to_end(key)
        return v

    def put(self, key: str, value: np.ndarray) -> None:
        size = value.nbytes + len(key)
        if size > self.max_bytes or key in self.items:
            return
        self.items[key] = value
        self.bytes += size
        while self.bytes > self.max_bytes:
            k, v = self.items.popitem(last=False)
            self.bytes -= v.nbytes + len(k)


def _texts(values) -> list[str]:
    return [] if values is None else [str(v) for v in values]


class TeacherScorer:
    def __init__(self, cfg: TeacherConfig):
        import torch

        self.cfg, self.torch = cfg, torch
        backend = load_tokenizer(cfg.model, trust_remote_code=cfg.trust_remote_code).backend_tokenizer
        backend.no_padding()
        backend.enable_truncation(max_length=cfg.max_length)  # pairs: longest_first, as HF's own default
        self.tokenizer = backend
        if cfg.kind == "bi-encoder":
            self.embedder = Embedder(cfg.embed_config())
            self.cache = VectorCache(int(cfg.cache_mb * 2**20))
        else:
            self.device = select_device(cfg.device, cfg.num_gpus)
            self.threads = None
            if self.device == "cpu":
                self.threads = cpu_threads(cfg.torch_threads, cfg.replicas_per_node or cfg.replicas)
                torch.set_num_threads(self.threads)
            self.model = load_model(
                cfg.model,
                device=self.device,
                compute_dtype=cfg.compute_dtype,
                attn_implementation=cfg.attn_implementation,
                trust_remote_code=cfg.trust_remote_code,
                auto_class="AutoModelForSequenceClassification",
            )
            # BERT-style cross-encoders need segment ids for the document half; MPNet, XLM-R... take none.
            self.uses_token_types = "token_type_ids" in inspect.signature(self.model.forward).parameters

    def _ids(self, texts: list) -> list[list[int]]:
        return [e.ids for e in self.tokenizer.encode_batch(texts)] if texts else []

    def _bi_scores(self, queries: list[str], docs: list[str]) -> np.ndarray:
        """Cosine of each (query, doc) pair [P]; each distinct text embedded once."""
        uq, q_of = np.unique(np.array(queries, dtype=object), return_inverse=True)
        ud, d_of = np.unique(np.array(docs, dtype=object), return_inverse=True)
        q = self._vectors(list(uq))  # [Q, H]
        d = self._vectors(list(ud))  # [D, H]
        return np.einsum("ph,ph->p", q[q_of], d[d_of])

    def _vectors(self, texts: list[str]) -> np.ndarray:
        """Unit vectors [N, H] of distinct texts: cached ones looked up, the rest embedded in one call."""
        found = [self.cache.get(t) for t in texts]
        todo = [i for i, v in enumerate(found) if v is None]
        if todo:
            fresh = l2_normalize(self.embedder.pooled(self._ids([texts[i] for i in todo])))
            for i, v in zip(todo, fresh):
                found[i] = v
                self.cache.put(texts[i], v.copy())  # a row view would keep the whole batch alive
        return np.stack(found) if found else np.zeros((0, 0), dtype=np.float32)

    def _cross_forward(self, ids: tuple, types: tuple | None, rows: np.ndarray) -> np.ndarray:
        """Logits of pairs ``rows`` of the flat ids (and segment ids) -> [B] float32."""
        tokens, lengths = pad_flat(*ids, rows)
        t_tokens, t_lengths = to_device(self.device, tokens, lengths)
        positions = self.torch.arange(tokens.shape[1], device=t_tokens.device)
        inputs = {"input_ids": t_tokens, "attention_mask": (positions[None, :] < t_lengths[:, None]).long()}
        if types is not None:
            (inputs["token_type_ids"],) = to_device(self.device, pad_flat(*types, rows)[0])
        with self.torch.inference_mode():
            logits = self.model(**inputs).logits[:, 0].float()
            if self.cfg.activation == "sigmoid":
                logits = self.torch.sigmoid(logits)
        return logits.cpu().numpy()

    def _cross_scores(self, queries: list[str], docs: list[str]) -> np.ndarray:
        """Score of each (query, doc) pair [P]; each distinct pair scored once."""
        if self.threads and self.torch.get_num_threads() != self.threads:
            self.torch.set_num_threads(self.threads)  # per calling thread (see Embedder.set_threads)
        unique = list(dict.fromkeys(zip(queries, docs)))
        index = {pair: i for i, pair in enumerate(unique)}
        t = self.cfg.pair_template
        inputs = [t.replace("{query}", q).replace("{document}", d) for q, d in unique] if t else unique
        encs = self.tokenizer.encode_batch(inputs)
        # Flat once per call, padded per forward batch by array indexing (as the Embedder), no loop over rows.
        ids = flatten([e.ids for e in encs])
        types = flatten([e.type_ids for e in encs]) if self.uses_token_types else None
        scores = np.zeros(len(unique), dtype=np.float32)
        for group in plan_token_batches(np.diff(ids[1]), self.cfg.max_tokens, self.cfg.max_rows):
            scores[group] = self._cross_forward(ids, types, group)
        return scores[[index[p] for p in zip(queries, docs)]]

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        cfg = self.cfg
        if cfg.kind == "bi-encoder":
            self.embedder.set_threads()
        reasons = np.array(batch[REJECT_COLUMN], dtype=object)  # a writable copy: scoring can reject rows too
        n = len(reasons)
        rows = np.flatnonzero(reasons == "")
        prompts = batch.get(cfg.prompt_column)
        queries = []
        for i in rows:
            own = prompts[i] if prompts is not None and isinstance(prompts[i], str) and prompts[i] else None
            text = batch[cfg.query_column][i]
            queries.append(own + text if own else apply_prompt(cfg.query_prompt, text))
        pos = [_texts(batch[cfg.pos_column][i]) for i in rows]
        neg = [_texts(batch[cfg.neg_column][i]) if cfg.neg_column in batch else [] for i in rows]
        row_of, n_pos, n_neg = flatten_pairs(pos, neg)
        pair_queries = [queries[r] for r in row_of]
        pair_docs = [d for p, x in zip(pos, neg) for d in (*p, *x)]
        if cfg.kind == "bi-encoder":
            pair_docs = [apply_prompt(cfg.document_prompt, d) for d in pair_docs]
        if not pair_docs:
            scores = np.zeros(0, dtype=np.float32)
        elif cfg.kind == "bi-encoder":
            scores = self._bi_scores(pair_queries, pair_docs)
        else:
            scores = self._cross_scores(pair_queries, pair_docs)
        pos_s, neg_s = fold_scores(scores.astype(np.float64), n_pos, n_neg)
        # Python lists, so Arrow stores list<double> (numpy arrays would become Ray's tensor extension type).
        out = {c: np.empty(n, dtype=object) for c in (*SCORE_COLUMNS, PROBS_COLUMN)}
        for col in out.values():
            col[:] = [[] for _ in range(n)]
        for k, i in enumerate(rows):
            if not (np.isfinite(pos_s[k]).all() and np.isfinite(neg_s[k]).all()):
                # NaN/inf from the teacher (an fp16 overflow, a broken checkpoint): never written as a soft label.
                reasons[i] = "teacher_score_not_finite"
                continue
            out["pos_scores"][i], out["neg_scores"][i] = pos_s[k].tolist(), neg_s[k].tolist()
            if cfg.temperature is not None:
                out[PROBS_COLUMN][i] = softmax(np.concatenate([pos_s[k], neg_s[k]]), cfg.temperature).tolist()
        # The lists exactly as scored, as plain lists (an all-empty list column can come back from Arrow as None).
        for col, lists in ((cfg.pos_column, pos), (cfg.neg_column, neg)):
            values = np.empty(n, dtype=object)
            values[:] = list(batch[col]) if col in batch else [None] * n
            for k, i in enumerate(rows):
                values[i] = lists[k]
            batch[col] = values
        bad = int((reasons == "teacher_score_not_finite").sum())
        if bad:
            logger.warning("%d rows got non-finite teacher scores; set aside as rejects", bad)
        batch.update({REJECT_COLUMN: reasons, "pos_scores": out["pos_scores"], "neg_scores": out["neg_scores"]})
        if cfg.temperature is not None:
            batch[PROBS_COLUMN] = out[PROBS_COLUMN]
        texts, floats = pa.list_(pa.string()), pa.list_(pa.float64())
        types = {cfg.pos_column: texts, cfg.neg_column: texts, "pos_scores": floats, "neg_scores": floats}
        return typed_table(batch, {**types, PROBS_COLUMN: floats})
