"""Independent references the tests compare the pipeline with."""

from __future__ import annotations

import numpy as np
import torch
from transformers import AutoModel, AutoTokenizer


def reference(model_dir: str, texts: list[str], pooling="mean", bidirectional=False) -> np.ndarray:
    """Independent reference: one unpadded forward per text with transformers directly, pooled by hand."""
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModel.from_pretrained(model_dir).eval()
    if bidirectional:
        model.config.is_causal = False
        for m in model.modules():
            if getattr(m, "is_causal", None):
                m.is_causal = False
    out = []
    for t in texts:
        enc = tok(t, return_tensors="pt")
        with torch.no_grad():
            h = model(**enc).last_hidden_state[0]
        v = {"mean": h.mean(0), "cls": h[0], "last": h[-1]}[pooling].numpy()
        out.append(v / np.linalg.norm(v))
    return np.stack(out)
