"""Embedder: the model stage. One model replica per actor; GPU when the config asks for one, else CPU.

Needs ``input_ids``/``num_tokens`` (from ``Tokenizer``) and ``_reject``; adds one vector column per output
dimension (``embedding``, or ``embedding_{d}`` per Matryoshka dimension) and drops the token ids. Rows are
length-sorted within the batch and grouped by a padded-token budget, so little compute goes to padding; vectors
come back in the input order. A row whose vector is not finite (e.g. fp16 overflow) is marked
``embedding_not_finite`` and written to the rejects, never as a vector. A model error fails the batch loudly.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from operators.arrow import fixed_size_list, flat_ids, release_unused_memory
from operators.model import (
    ATTN_IMPLEMENTATIONS,
    COMPUTE_DTYPES,
    ModelInfo,
    cpu_threads,
    load_model,
    select_device,
    to_device,
)
from operators.pooling import (
    POOLINGS,
    flatten,
    l2_normalize,
    matryoshka,
    pad_flat,
    plan_token_batches,
    pool,
    select_rows,
)
from operators.tokenize import TOKEN_COLUMNS
from operators.validate import REJECT_COLUMN

logger = logging.getLogger(__name__)

OUTPUT_DTYPES = ("float32", "float16")
DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True, kw_only=True)
class EmbedConfig:
    model: ModelInfo
    pooling: str = "mean"
    normalize: bool = True
    dims: tuple[int, ...] = ()  # Matryoshka dimensions; empty: the full vector in one column
    embedding_column: str = "embedding"
    output_dtype: str = "float32"
    compute_dtype: str = "auto"  # auto: bf16 on CUDA, float32 on CPU
    # auto: flash_attention_2 on CUDA in half precision where flash-attn is installed, else sdpa (eager for
    # architectures transformers has no SDPA path for, e.g. MPNet)
    attn_implementation: str = "auto"
    compile: bool = False  # torch.compile the forward (dynamic shapes): minutes of compiling, then fused kernels
    bidirectional: bool = False
    trust_remote_code: bool = False
    device: str = "auto"  # auto: cuda when the actor was given a GPU
    max_tokens: int = 16384  # padded tokens per forward pass
    max_rows: int = 256  # rows per forward pass
    batch_size: int = 1024  # rows per actor call: the pool rows are length-sorted within
    replicas: int = 1
    replicas_per_node: int | None = None  # the replicas sharing one node's cores; default: all of them
    num_gpus: float = 0.0  # per replica; fractional shares a GPU between replicas
    num_cpus: float = 1.0
    torch_threads: int | None = None  # CPU only; default: the node's cores split between its replicas
    columns: tuple[str, ...] = field(init=False, default=())

    def __post_init__(self):
        checks = [
            ("pooling", self.pooling, POOLINGS),
            ("output_dtype", self.output_dtype, OUTPUT_DTYPES),
            ("compute_dtype", self.compute_dtype, COMPUTE_DTYPES),
            ("device", self.device, DEVICES),
            ("attn_implementation", self.attn_implementation, ATTN_IMPLEMENTATIONS),
        ]
        for name, value, valid in checks:
            if value not in valid:
                raise ValueError(f"{name} must be one of {valid}, got {value!r}")
        hidden = self.model.hidden_size
        bad = [d for d in self.dims if not 0 < d <= hidden]
        if bad:
            raise ValueError(f"dims must be in 1..{hidden} (the model's hidden size), got {bad}")
        if len(set(self.dims)) != len(self.dims):
            raise ValueError(f"dims must be distinct, got {list(self.dims)}")
        if self.max_tokens < 1 or self.max_rows < 1 or self.batch_size < 1 or self.replicas < 1:
            raise ValueError("max_tokens, max_rows, batch_size and replicas must be >= 1")
        if self.replicas_per_node is not None and not 1 <= self.replicas_per_node <= self.replicas:
            raise ValueError(f"replicas_per_node must be in 1..replicas ({self.replicas}), got "
                             f"{self.replicas_per_node}")  # fmt: skip
        if self.num_gpus < 0 or self.num_cpus < 0:
            raise ValueError(f"num_gpus and num_cpus must be >= 0, got {self.num_gpus}, {self.num_cpus}")
        if self.num_gpus > 1 and self.num_gpus != int(self.num_gpus):
            raise ValueError(f"num_gpus above 1 must be a whole number, got {self.num_gpus}")
        if self.device == "cuda" and self.num_gpus == 0:
            raise ValueError("device 'cuda' needs num_gpus > 0 so Ray places the replica on a GPU")
        cols = tuple(f"{self.embedding_column}_{d}" for d in self.dims) if self.dims else (self.embedding_column,)
        object.__setattr__(self, "columns", cols)


def vectors_by_column(pooled: np.ndarray, cfg: EmbedConfig) -> dict[str, np.ndarray]:
    """pooled: [N, H] float32 -> {column: [N, d]} in the stored dtype, normalised as configured."""
    if not cfg.dims:
        full = l2_normalize(pooled) if cfg.normalize else pooled
        return {cfg.columns[0]: full.astype(cfg.output_dtype)}
    heads = matryoshka(pooled, cfg.dims, normalize=cfg.normalize)
    return {col: heads[d].astype(cfg.output_dtype) for col, d in zip(cfg.columns, cfg.dims)}


class Embedder:
    """The model replica. Arrow batches in and out (``batch_format="pyarrow"``): token ids arrive as one flat
    buffer (``operators.tokenize``) and are padded per forward batch with array indexing, no loop over rows;
    vectors leave as ``fixed_size_list`` columns, the type the sink writes, so nothing converts them again.

    On CUDA the pooled vectors of a call's forward batches stay on the GPU until the call ends, so the host pads and
    copies the next batch (pinned memory, non-blocking) while the GPU still computes the last one; one copy back
    per call instead of one synchronising copy per forward batch.
    """

    def __init__(self, cfg: EmbedConfig):
        import torch

        self.torch = torch
        self.cfg = cfg
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
            bidirectional=cfg.bidirectional,
            trust_remote_code=cfg.trust_remote_code,
        )
        self.forward = compiled(self.model) if cfg.compile else self.model
        # Rows padded to a multiple of 8 tokens on CUDA: tensor-core-friendly shapes, and fewer distinct shapes for
        # torch.compile. Padded positions are masked out of attention and pooling, so vectors do not change.
        self.multiple = 8 if self.device == "cuda" else 1
        self.pad_id = 0  # any id works: padded positions are masked out of attention and pooling

    def _forward(self, values: np.ndarray, offsets: np.ndarray, rows: np.ndarray):
        """Rows ``rows`` of the flat ids -> pooled [B, H] float32 tensor on the model's device (not synchronised)."""
        tokens, lengths = pad_flat(values, offsets, rows, self.pad_id, self.multiple)  # [B, L] int64, [B]
        t_tokens, t_lengths = to_device(self.device, tokens, lengths)
        positions = self.torch.arange(tokens.shape[1], device=t_tokens.device)
        t_mask = (positions[None, :] < t_lengths[:, None]).long()  # [B, L], built on the device: half the copy
        with self.torch.inference_mode():
            hidden = self.forward(input_ids=t_tokens, attention_mask=t_mask).last_hidden_state  # [B, L, H]
            return pool(hidden, t_mask, self.cfg.pooling)  # [B, H] float32

    def set_threads(self) -> None:
        if self.threads and self.torch.get_num_threads() != self.threads:
            # OpenMP thread counts are per calling thread: Ray Data calls the UDF from another thread than
            # __init__, where Ray's OMP_NUM_THREADS=1 for fractional-CPU actors would leave one core busy.
            self.torch.set_num_threads(self.threads)

    def pooled_flat(self, values: np.ndarray, offsets: np.ndarray) -> np.ndarray:
        """Flat ids [T] with offsets [N + 1] -> pooled [N, H] float32 in input order; length-sorted token-budget
        batches."""
        n = len(offsets) - 1
        out = np.zeros((n, self.cfg.model.hidden_size), dtype=np.float32)
        if n:
            parts = [
                (group, self._forward(values, offsets, group))
                for group in plan_token_batches(np.diff(offsets), self.cfg.max_tokens, self.cfg.max_rows)
            ]
            order = np.concatenate([g for g, _ in parts])
            out[order] = self.torch.cat([p for _, p in parts]).cpu().numpy()  # the one synchronising copy
        return out

    def pooled(self, ids: list) -> np.ndarray:
        """N sequences of token ids -> pooled [N, H] float32, in input order (the teacher's entry point)."""
        return self.pooled_flat(*flatten(ids))

    def __call__(self, batch: pa.Table) -> pa.Table:
        cfg = self.cfg
        self.set_threads()
        reasons = np.asarray(batch.column(REJECT_COLUMN).to_numpy(zero_copy_only=False), dtype=object).copy()
        n = len(reasons)
        pooled = np.zeros((n, cfg.model.hidden_size), dtype=np.float32)
        rows = np.flatnonzero(reasons == "")
        if len(rows):
            values, offsets = flat_ids(batch.column("input_ids"))
            if len(rows) < n:  # rejected rows hold no ids; keep the valid rows' spans
                values, offsets = select_rows(values, offsets, rows)
            pooled[rows] = self.pooled_flat(values, offsets)
        bad = ~np.isfinite(pooled).all(axis=1) & (reasons == "")
        if bad.any():
            logger.warning("%d rows produced non-finite embeddings; set aside as rejects", int(bad.sum()))
            reasons[bad] = "embedding_not_finite"
            pooled[bad] = 0.0
        vectors = vectors_by_column(pooled, cfg)
        if cfg.output_dtype == "float16":
            # Values past fp16's range become inf in the cast: those rows go to the rejects too.
            over = np.zeros(n, dtype=bool)
            for v in vectors.values():
                over |= ~np.isfinite(v).all(axis=1)
            over &= reasons == ""
            reasons[over] = "embedding_not_finite"
        out = batch.drop_columns([c for c in (REJECT_COLUMN, *TOKEN_COLUMNS[:2]) if c in batch.column_names])
        out = out.append_column(REJECT_COLUMN, pa.array(reasons, type=pa.string()))
        for name, v in vectors.items():
            out = out.append_column(name, fixed_size_list(v))
        release_unused_memory()  # a long-lived actor: what its calls free goes back, not to a growing cache
        return out


def compiled(model):
    """``torch.compile`` of the model's forward, dynamic in batch and length (one graph for every batch shape)."""
    import torch

    return torch.compile(model, dynamic=True)
