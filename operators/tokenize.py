"""Tokenizer: the CPU stage ahead of the model, so model actors only run the model.

Needs the text column and ``_reject`` (set by the validator); adds ``input_ids`` (Arrow ``list<int32>``, one list
per row, no padding: the embedder pads per forward batch), ``num_tokens`` and ``truncated``. Rejected rows get
empty ids and are never tokenised. Costs one fast (Rust) tokenizer per actor; it cannot fail on a valid string.

Batches are Arrow tables (Ray Data's ``batch_format="pyarrow"``), not the dicts of numpy arrays other operators
take: the token ids leave as one flat int32 buffer plus offsets, which Ray stores and ships without touching each
row. As a numpy object column of per-row arrays, Ray converts every row into and out of its tensor extension type:
35 ms per 8,192 rows against 0.1 ms (measured, ``/tmp`` script in the issue 9 note), and the embedder, the
stage a GPU waits on, paid half of it.
"""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from operators.arrow import release_unused_memory, token_lists
from operators.model import ModelInfo
from operators.validate import REJECT_COLUMN, typed_table

logger = logging.getLogger(__name__)

# Texts are cut to this many characters per allowed token before tokenising: a 1 MB text would otherwise cost
# a full tokenisation only to keep its first 512 tokens. No tokenizer in use averages more than a few characters
# per token on real text, so the cut never changes the kept tokens of prose; a row cut here is counted truncated.
CHARS_PER_TOKEN_CAP = 32
TOKEN_COLUMNS = ("input_ids", "num_tokens", "truncated")


@functools.lru_cache(maxsize=8)
def backend_json(path: str, trust_remote_code: bool = False) -> str:
    """The model's fast tokenizer as transformers builds it (special tokens, post-processor), serialised.

    Loaded once on the driver: a Tokenizer actor rebuilds it with ``tokenizers`` alone, without importing
    transformers (~3 s of CPU per actor start here, more than the rest of the actor's start-up). The ids are
    those of the HF tokenizer's backend by construction, since it is the same object's serialisation.
    """
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)
    backend = getattr(hf, "backend_tokenizer", None)
    if backend is None:
        raise ValueError(f"model folder {path!r} has no fast (Rust) tokenizer; convert it to tokenizer.json")
    return backend.to_str()


@dataclass(frozen=True, kw_only=True)
class TokenizeConfig:
    model: ModelInfo
    text_column: str = "text"
    prompt: str | None = None  # applied before tokenising; "{text}" marks where the text goes, else a prefix
    max_length: int = 512  # counts prompt and special tokens
    replicas: int = 1
    # Autoscaling: Ray Data adds actors, up to this many, while the tokenizers' queue backs up (within the stage's
    # CPU budget); None: a fixed pool of ``replicas``.
    max_replicas: int | None = None
    num_cpus: float = 0.25
    batch_size: int = 1024
    keep_text: bool = False  # pass the text column on (asked for as an output column); else it is dropped here
    trust_remote_code: bool = False  # a tokenizer class the model folder defines (only where tokenizer_json is None)
    # The serialised backend (``backend_json``); None loads it from the model folder in the actor (transformers).
    tokenizer_json: str | None = field(default=None, repr=False)

    def __post_init__(self):
        if self.max_length < 2:
            raise ValueError(f"max_length must be >= 2, got {self.max_length}")
        if self.model.max_positions and self.max_length > self.model.max_positions:
            raise ValueError(
                f"max_length {self.max_length} exceeds the model's max_position_embeddings {self.model.max_positions}"
            )
        if self.prompt is not None and self.prompt.count("{text}") > 1:
            raise ValueError(f"prompt may contain '{{text}}' at most once, got {self.prompt!r}")
        if self.replicas < 1 or self.num_cpus <= 0 or self.batch_size < 1:
            raise ValueError(
                f"tokenizer replicas, num_cpus and batch_size must be positive, got "
                f"{self.replicas}, {self.num_cpus}, {self.batch_size}"
            )
        if self.max_replicas is not None and self.max_replicas < self.replicas:
            raise ValueError(f"tokenizer max_replicas ({self.max_replicas}) must be >= replicas ({self.replicas})")


def apply_prompt(prompt: str | None, text: str) -> str:
    """KaLM's query form is 'Instruct: {task}\\nQuery: {text}'; a prompt without '{text}' is a prefix."""
    if not prompt:
        return text
    if "{text}" in prompt:
        return prompt.replace("{text}", text)
    return prompt + text


class Tokenizer:
    def __init__(self, cfg: TokenizeConfig):
        # The Rust tokenizer's thread pool would otherwise take every core of the node, fighting the model actors.
        os.environ.setdefault("RAYON_NUM_THREADS", str(max(1, round(cfg.num_cpus))))
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
        from tokenizers import Tokenizer as RustTokenizer

        self.cfg = cfg
        # The backend (tokenizers.Tokenizer) encodes a batch in Rust and reports truncation per row through
        # `overflowing`; HF's __call__ would turn overflow into extra rows instead. Same ids as __call__.
        if cfg.tokenizer_json is not None:
            self.backend = RustTokenizer.from_str(cfg.tokenizer_json)
        else:
            self.backend = RustTokenizer.from_str(backend_json(cfg.model.local_path(), cfg.trust_remote_code))
        self.backend.no_padding()
        self.backend.enable_truncation(max_length=cfg.max_length)
        self.char_cap = cfg.max_length * CHARS_PER_TOKEN_CAP

    def __call__(self, batch: pa.Table | dict[str, np.ndarray]) -> pa.Table:
        """``batch``: an Arrow table (as Ray hands it), or a dict of numpy arrays (as ``validate_rows`` returns)."""
        table = batch if isinstance(batch, pa.Table) else typed_table(batch, {})
        reasons = np.asarray(table.column(REJECT_COLUMN).to_numpy(zero_copy_only=False), dtype=object)
        n = len(reasons)
        rows = np.flatnonzero(reasons == "")
        if self.cfg.text_column in table.column_names:  # absent only when the validator rejected every row for it
            texts = table.column(self.cfg.text_column).take(pa.array(rows)).to_pylist()
        else:
            texts = []
        prompted = [apply_prompt(self.cfg.prompt, t) for t in texts]
        cut = np.array([len(t) > self.char_cap for t in prompted], dtype=bool)
        prompted = [t[: self.char_cap] for t in prompted]
        encodings = self.backend.encode_batch_fast(prompted) if prompted else []
        ids: list[list[int]] = [[] for _ in range(n)]
        truncated = np.zeros(n, dtype=bool)
        for k, (i, enc) in enumerate(zip(rows, encodings)):
            ids[i] = enc.ids
            truncated[i] = bool(enc.overflowing) or cut[k]
        lists = token_lists(ids)
        num_tokens = np.diff(np.asarray(lists.offsets)).astype(np.int32)
        drop = [c for c in (*TOKEN_COLUMNS, *([] if self.cfg.keep_text else [self.cfg.text_column]))
                if c in table.column_names]  # fmt: skip
        table = table.drop_columns(drop)
        for name, values in (("input_ids", lists), ("num_tokens", num_tokens), ("truncated", truncated)):
            table = table.append_column(name, pa.array(values) if isinstance(values, np.ndarray) else values)
        release_unused_memory()  # a long-lived actor: what its calls free goes back, not to a growing cache
        return table
