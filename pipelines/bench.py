"""``kalm bench``: kalm embed against sentence-transformers and a raw in-process forward, same model and texts.

All figures come from one run on the current machine:
- ``sentence_transformers``: ``SentenceTransformer.encode`` (batch size ``--batch-size``), model load excluded;
- ``raw_forward``: this project's Tokenizer + Embedder called in-process, no Ray (the ceiling for the pipeline);
- ``pipeline``: ``kalm embed`` end to end on Ray. Ray start-up is timed separately. Steady state is the marginal
  rate between a run on the texts x1 and a run on the texts x(1 + repeat): (extra rows) / (extra seconds), which
  cancels the fixed costs (actor start, model load, first-block latency) that a long job amortises.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines import defaults

logger = logging.getLogger(__name__)


def _texts(path: str | None) -> list[str]:
    from operators.storage import resolve

    fs, where = resolve(str(path or defaults.SAMPLE_CORPUS))  # local or s3:// (endpoint from AWS_ENDPOINT_URL)
    table = pq.read_table(where, filesystem=fs, columns=["text"])
    return [t for t in table.column("text").to_pylist() if isinstance(t, str) and t.strip()]


def _write_copies(texts: list[str], copies: int, folder: Path, files: int = 4) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    rows = [(f"{c}-{i}", t) for c in range(copies) for i, t in enumerate(texts)]
    for k in range(files):
        part = rows[k::files]
        pq.write_table(pa.table({"id": [r[0] for r in part], "text": [r[1] for r in part]}), folder / f"{k}.parquet")
    return str(folder)


def bench_sentence_transformers(model: str, texts: list[str], batch_size: int) -> dict:
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(model, device="cpu")
    st.encode(texts[:64], batch_size=batch_size)  # warm-up
    t0 = time.perf_counter()
    st.encode(texts, batch_size=batch_size, normalize_embeddings=True)
    dt = time.perf_counter() - t0
    return {"rows": len(texts), "seconds": round(dt, 3), "rows_per_s": round(len(texts) / dt, 2)}


def bench_raw_forward(model: str, texts: list[str]) -> dict:
    from operators.embed import Embedder
    from operators.tokenize import Tokenizer
    from operators.validate import validate_rows
    from pipelines.embed import EmbedJobConfig, plan

    # The operators exactly as the pipeline configures them on CPU (max length, pooling, token budget, batch size).
    p = plan(EmbedJobConfig(model=model), gpus_in_cluster=0)
    tok, emb = Tokenizer(p.tokenize), Embedder(p.embed)
    batch = {"id": np.arange(len(texts)), "text": np.array(texts, dtype=object)}

    def run_batch(rows: slice) -> int:
        b = tok(validate_rows({k: v[rows] for k, v in batch.items()}, cfg=p.validate, registry=None))
        emb(b)
        return int(b["num_tokens"].sum())

    run_batch(slice(0, 64))  # warm-up
    t0 = time.perf_counter()
    tokens = sum(run_batch(slice(s, s + p.embed.batch_size)) for s in range(0, len(texts), p.embed.batch_size))
    dt = time.perf_counter() - t0
    return {"rows": len(texts), "seconds": round(dt, 3), "rows_per_s": round(len(texts) / dt, 2),
            "tokens_per_s": round(tokens / dt, 1)}  # fmt: skip


def bench_pipeline(model: str, texts: list[str], repeat: int, workdir: Path) -> dict:
    from pipelines.embed import EmbedJobConfig, run
    from pipelines.runtime import ray_session

    small = _write_copies(texts, 1, workdir / "in-1")
    large = _write_copies(texts, 1 + repeat, workdir / f"in-{1 + repeat}")
    runs = {}
    with ray_session() as ray_start:  # the local Ray a `kalm embed` run starts, shared by both runs
        for name, src in (("small", small), ("large", large)):
            m = run(EmbedJobConfig(input=src, output=str(workdir / f"out-{name}"), model=model, overwrite=True))
            runs[name] = {"rows": m["counts"]["rows_out"], "seconds": m["timings_s"]["pipeline"]}
    extra_rows = runs["large"]["rows"] - runs["small"]["rows"]
    extra_s = runs["large"]["seconds"] - runs["small"]["seconds"]
    return {
        "ray_start_s": round(ray_start, 3),
        "runs": runs,
        "end_to_end_rows_per_s": round(runs["large"]["rows"] / runs["large"]["seconds"], 2),
        "steady_rows_per_s": round(extra_rows / extra_s, 2) if extra_s > 0 else None,
    }


def cross_encoder_from(bi_encoder: str) -> str:
    """A cross-encoder of the bi-encoder's size (its weights + a seeded one-logit head), saved once in the cache: the
    same compute as a real cross-encoder of that shape, for benchmarking when no trained one is installed."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    target = defaults.cache_dir() / "models" / (Path(bi_encoder).name + "-cross-bench")
    if not (target / "model.safetensors").is_file():
        torch.manual_seed(0)
        model = AutoModelForSequenceClassification.from_pretrained(bi_encoder, num_labels=1, local_files_only=True)
        model.save_pretrained(target, safe_serialization=True)
        AutoTokenizer.from_pretrained(bi_encoder, local_files_only=True).save_pretrained(target)
    return str(target)


def _marked(row: dict, copy: int) -> dict:
    if copy == 0:
        return row
    mark = f" ({copy})"
    return {"query": row["query"] + mark, "pos": [d + mark for d in row["pos"]], "neg": [d + mark for d in row["neg"]]}


def bench_score(ns) -> dict:
    """kalm score vs sentence-transformers on the same pairs: CrossEncoder.predict, or encode + cosine."""
    import torch
    from sentence_transformers import CrossEncoder, SentenceTransformer

    from pipelines.runtime import ray_session
    from pipelines.score import ScoreJobConfig, run

    kind = ns.score
    teacher = ns.model or defaults.default_teacher()
    if kind == "cross-encoder":
        teacher = cross_encoder_from(teacher)
    lines = Path(ns.input or defaults.sample_pairs()).read_text().splitlines()[: ns.score_rows]
    rows = [json.loads(x) for x in lines]
    pairs = [(r["query"], d) for r in rows for d in r["pos"] + r["neg"]]
    result = {"teacher": teacher, "kind": kind, "rows": len(rows), "pairs": len(pairs),
              "distinct_docs": len({d for _, d in pairs}), "torch_threads": torch.get_num_threads()}  # fmt: skip
    t0 = time.perf_counter()
    if kind == "cross-encoder":
        ce = CrossEncoder(teacher, device="cpu", max_length=512)
        ce.predict(pairs[:8], batch_size=ns.batch_size)  # warm-up
        t0 = time.perf_counter()
        ce.predict(pairs, batch_size=ns.batch_size)
    else:
        st = SentenceTransformer(teacher, device="cpu")
        st.encode([q for q, _ in pairs[:8]], batch_size=ns.batch_size)  # warm-up
        t0 = time.perf_counter()
        q = st.encode([r["query"] for r in rows], batch_size=ns.batch_size, normalize_embeddings=True)
        d = st.encode([d for _, d in pairs], batch_size=ns.batch_size, normalize_embeddings=True)
        row_of = np.repeat(np.arange(len(rows)), [len(r["pos"]) + len(r["neg"]) for r in rows])
        np.einsum("ph,ph->p", q[row_of], d)
    st_s = time.perf_counter() - t0
    result["sentence_transformers"] = {"seconds": round(st_s, 3), "pairs_per_s": round(len(pairs) / st_s, 2)}
    runs = {}
    with tempfile.TemporaryDirectory(prefix="kalm-bench-") as tmp, ray_session() as ray_start:
        for copies in (1, 3):
            src = Path(tmp) / f"in-{copies}.jsonl"
            # Copies differ by a marker on every text: identical copies would be embedded once (per-batch dedupe)
            # and flatter the marginal rate.
            src.write_text("".join(json.dumps(_marked(r, c)) + "\n" for c in range(copies) for r in rows))
            job = ScoreJobConfig(input=str(src), output=f"{tmp}/out-{copies}", teacher=teacher, teacher_kind=kind,
                                 query_prompt="", max_length=512 if kind == "cross-encoder" else None)  # fmt: skip
            m = run(job)
            runs[copies] = {"pairs": len(pairs) * copies, "seconds": m["timings_s"]["pipeline"]}
    extra_s = runs[3]["seconds"] - runs[1]["seconds"]
    steady = round(2 * len(pairs) / extra_s, 2) if extra_s > 0 else None
    result["pipeline"] = {"ray_start_s": round(ray_start, 3), "runs": runs, "steady_pairs_per_s": steady,
                          "end_to_end_pairs_per_s": round(runs[3]["pairs"] / runs[3]["seconds"], 2)}  # fmt: skip
    result["ratio_pipeline_steady_over_sentence_transformers"] = (
        round(steady / result["sentence_transformers"]["pairs_per_s"], 3) if steady else None
    )
    print(json.dumps(result, indent=2))
    if ns.json:
        Path(ns.json).write_text(json.dumps(result, indent=2))
    return result


def main(ns) -> dict:
    if getattr(ns, "score", None):
        return bench_score(ns)
    model = ns.model or defaults.default_student()
    texts = _texts(ns.input)
    import torch

    result = {"model": model, "texts": len(texts), "torch_threads": torch.get_num_threads(), "cpus": os.cpu_count()}
    result["sentence_transformers"] = bench_sentence_transformers(model, texts, ns.batch_size)
    result["raw_forward"] = bench_raw_forward(model, texts)
    with tempfile.TemporaryDirectory(prefix="kalm-bench-") as tmp:
        result["pipeline"] = bench_pipeline(model, texts, ns.repeat, Path(tmp))
    steady = result["pipeline"]["steady_rows_per_s"]
    result["ratios"] = {
        "pipeline_steady_over_sentence_transformers": round(steady / result["sentence_transformers"]["rows_per_s"], 3),
        "pipeline_steady_over_raw_forward": round(steady / result["raw_forward"]["rows_per_s"], 3),
    }
    rows = [
        ("sentence-transformers encode", result["sentence_transformers"]["rows_per_s"]),
        ("raw forward (in-process)", result["raw_forward"]["rows_per_s"]),
        ("kalm embed, steady state", steady),
        ("kalm embed, end to end", result["pipeline"]["end_to_end_rows_per_s"]),
    ]
    print(f"{'measure':34s} {'rows/s':>10s}")
    for name, v in rows:
        print(f"{name:34s} {v:>10}")
    print(f"Ray start-up: {result['pipeline']['ray_start_s']} s; ratios: {result['ratios']}")
    print(json.dumps(result, indent=2))
    if ns.json:
        Path(ns.json).write_text(json.dumps(result, indent=2))
    return result
