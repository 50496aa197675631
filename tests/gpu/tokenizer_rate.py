"""Tokenizer rows/s per process at a given Rust thread count: what one tokenizer actor of ``kalm embed`` feeds.

A pipeline's tokenizer actor gets ``RAYON_NUM_THREADS`` = its logical CPUs (at least 1, ``operators.tokenize``),
and the Rust pool reads that once, at its first parallel encode: each thread count is therefore timed in a fresh
process. Run on a GPU machine's host, it says how many tokenizer actors one GPU replica needs (the model's rows/s
from ``gpu_check.py`` over one actor's rows/s here).

Usage: python tests/gpu/tokenizer_rate.py --model DIR [--threads 1,2,4] [--reps 10] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CORPUS = ROOT / "pipelines" / "data" / "corpus.parquet"


def one(model: str, reps: int) -> dict:
    """In this process: the pipeline's Tokenizer on the bundled corpus x ``reps``, after one warm-up call."""
    import numpy as np
    import pyarrow.parquet as pq

    sys.path.insert(0, str(ROOT))
    from operators.model import inspect_model
    from operators.tokenize import TokenizeConfig, Tokenizer
    from operators.validate import ValidateConfig, typed_table, validate_rows

    texts = pq.read_table(CORPUS).column("text").to_pylist() * reps
    # An Arrow table, as the read tasks hand blocks to the tokenizer actors
    batch = typed_table(validate_rows({"id": np.arange(len(texts)), "text": np.array(texts, dtype=object)},
                                      cfg=ValidateConfig(), registry=None), {})  # fmt: skip
    tok = Tokenizer(TokenizeConfig(model=inspect_model(model), max_length=256))
    tok(batch.slice(0, 1024))
    rows = 0
    t0 = time.perf_counter()
    for s in range(0, len(texts), tok.cfg.batch_size):  # the actor's call size
        rows += tok(batch.slice(s, tok.cfg.batch_size)).num_rows
    dt = time.perf_counter() - t0
    return {"rayon_threads": os.environ.get("RAYON_NUM_THREADS"), "rows": rows, "seconds": round(dt, 3),
            "rows_per_s": round(rows / dt, 1)}  # fmt: skip


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--threads", default="1,2,4")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--out")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(one(args.model, args.reps)))
        return
    results = []
    for n in [int(x) for x in args.threads.split(",")]:
        env = {**os.environ, "RAYON_NUM_THREADS": str(n), "TOKENIZERS_PARALLELISM": "true"}
        cmd = [sys.executable, __file__, "--model", args.model, "--reps", str(args.reps), "--child"]
        out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
        results.append(json.loads(out.strip().splitlines()[-1]))
        print("tokenizer", results[-1], flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
