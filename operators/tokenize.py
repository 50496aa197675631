"""Tokenizer: the CPU stage ahead of the model, so model actors only run the model.

Needs the text column and ``_reject`` (set by the validator); adds ``input_ids`` (int32 arrays, one per row, no
padding: the embedder pads per forward batch), ``num_tokens`` and ``truncated``. Rejected rows get empty ids and
are never tokenised. Costs one fast (Rust) tokenizer per actor; it cannot fail on a valid string.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import numpy as np

from operators.model import ModelInfo, load_tokenizer
from operators.validate import REJECT_COLUMN

logger = logging.getLogger(__name__)

# Texts are cut to this many characters per allowed token before tokenising: a 1 MB text would otherwise cost
# a full tokenisation only to keep its first 512 tokens. No tokenizer in use averages more than a few characters
# per token on real text, so the cut never changes the kept tokens of prose; a row cut here is counted truncated.
CHARS_PER_TOKEN_CAP = 32


@dataclass(frozen=True, kw_only=True)
class TokenizeConfig:
    model: ModelInfo
    text_column: str = "text"
    prompt: str | None = None  # applied before tokenising; "{text}" marks where the text goes, else a prefix
    max_length: int = 512  # counts prompt and special tokens
    replicas: int = 1
    num_cpus: float = 0.25
    batch_size: int = 1024
    keep_text: bool = False  # pass the text column on (asked for as an output column); else it is dropped here

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
        self.cfg = cfg
        hf = load_tokenizer(cfg.model)
        # The backend (tokenizers.Tokenizer) encodes a batch in Rust and reports truncation per row through
        # `overflowing`; HF's __call__ would turn overflow into extra rows instead. Same ids as __call__.
        self.backend = hf.backend_tokenizer
        self.backend.no_padding()
        self.backend.enable_truncation(max_length=cfg.max_length)
        self.char_cap = cfg.max_length * CHARS_PER_TOKEN_CAP

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ok = batch[REJECT_COLUMN] == ""
        n = len(ok)
        texts = batch.get(self.cfg.text_column)  # absent only when the validator rejected every row for it
        ids = np.empty(n, dtype=object)
        num_tokens = np.zeros(n, dtype=np.int32)
        truncated = np.zeros(n, dtype=bool)
        rows = np.flatnonzero(ok)
        prompted = [apply_prompt(self.cfg.prompt, texts[i]) for i in rows]
        cut = np.array([len(t) > self.char_cap for t in prompted], dtype=bool)
        prompted = [t[: self.char_cap] for t in prompted]
        encodings = self.backend.encode_batch(prompted) if prompted else []
        empty = np.zeros(0, dtype=np.int32)
        for i in range(n):
            ids[i] = empty
        for k, (i, enc) in enumerate(zip(rows, encodings)):
            ids[i] = np.asarray(enc.ids, dtype=np.int32)
            num_tokens[i] = len(enc.ids)
            truncated[i] = bool(enc.overflowing) or cut[k]
        out = {k: v for k, v in batch.items() if self.cfg.keep_text or k != self.cfg.text_column}
        out.update(input_ids=ids, num_tokens=num_tokens, truncated=truncated)
        return out
