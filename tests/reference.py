"""Independent references the tests compare the pipeline with."""

from __future__ import annotations

import numpy as np
import torch
from transformers import AutoModel, AutoTokenizer


def reference(model_dir: str, texts: list[str], pooling="mean", bidirectional=False, max_length=None) -> np.ndarray:
    """Independent reference: one unpadded forward per text with transformers directly, pooled by hand; texts cut
    to ``max_length`` tokens by the tokenizer when given."""
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModel.from_pretrained(model_dir).eval()
    if bidirectional:
        model.config.is_causal = False
        for m in model.modules():
            if getattr(m, "is_causal", None):
                m.is_causal = False
    out = []
    for t in texts:
        enc = tok(t, return_tensors="pt", truncation=max_length is not None, max_length=max_length)
        with torch.no_grad():
            h = model(**enc).last_hidden_state[0]
        v = {"mean": h.mean(0), "cls": h[0], "last": h[-1]}[pooling].numpy()
        out.append(v / np.linalg.norm(v))
    return np.stack(out)


def cross_scores(model_path: str, rows: list[dict], max_length: int) -> list[list[float]]:
    """Independent reference: each (query, document) pair of rows {query, pos, neg} through transformers' own
    tokenizer pair encoding and AutoModelForSequenceClassification, one pair at a time; logit 0."""
    from transformers import AutoModelForSequenceClassification

    tok = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForSequenceClassification.from_pretrained(model_path).eval()
    out = []
    for r in rows:
        scores = []
        for d in r["pos"] + r["neg"]:
            enc = tok(r["query"], d, truncation=True, max_length=max_length, return_tensors="pt")
            with torch.no_grad():
                scores.append(float(model(**enc).logits[0, 0]))
        out.append(scores)
    return out
