"""``kalm bench``: one run on the current machine measures the hardware limit, the model, the pipeline and the
reference, on the same texts and model, and prints a table plus JSON.

Parts (``--parts``, all by default):
- ``peak``: the machine's matmul peak in the compute dtype and torch threads the model uses (the MFU denominator),
  timed before and after the other parts, the higher kept;
- ``forward``: this project's Embedder called in-process, no Ray, on texts tokenised beforehand (the model alone:
  tokens/s, rows/s, model FLOP/s and MFU); tokenisation is timed apart;
- ``st``: sentence-transformers ``encode`` on the same texts, model, batch size, device and dtype;
  with ``pipeline``, both references run before and after it and their rates are averaged (``averaged``): this
  VM's speed drifts 10-30% within minutes, and a reference timed once at another moment moves the ratios as much;
- ``pipeline``: ``kalm embed`` end to end on Ray. Ray start-up is timed separately. Steady state is the rate in
  the middle of the run on the texts x(1 + repeat), from the row counter's timeline (``progress.steady_rate``: the
  blocks between 10% and 90% of the rows), which leaves out the fixed costs (actor start, model load, first-block
  latency, the drain) that a long job amortises. As a cross-check, the marginal rate between that run and one on
  the texts x1, (extra rows) / (extra seconds), cancels the same costs another way; it is the difference of two
  whole runs, so a machine whose speed drifts moves it more;
- ``score``: ``kalm score`` (teacher soft labels) on the bundled training rows against sentence-transformers on the
  same pairs (``bench_score``);
- ``mine``: ``kalm mine`` on the bundled queries and corpus: queries/s of search + teacher-free selection, and end
  to end.
``--memory 100000,1000000`` instead measures the peak memory of ``kalm embed`` runs of those sizes
(``bench_memory``); ``--mine`` the large comparison with ``mine_hard_negatives`` (``pipelines.bench_mine``).
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
from pipelines.config import ConfigError

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


def job_settings(ns) -> dict:
    """The ``kalm embed`` settings every part runs with (model, device, precision, batching)."""
    out = {"model": ns.model or defaults.default_student(), "compute_dtype": ns.compute_dtype,
           "bidirectional": ns.bidirectional, "compile": ns.compile}  # fmt: skip
    if ns.device == "cuda":
        out.update(device="cuda", num_gpus=1.0)
    elif ns.device == "cpu":
        out.update(device="cpu", num_gpus=0.0)
    if ns.max_tokens:
        out["max_tokens"] = ns.max_tokens
    if ns.replicas:  # the pipeline's model replicas; the raw forward stays one process on every core
        out["replicas"] = ns.replicas
    return out


def _gpus(settings: dict) -> int:
    return 1 if settings.get("device") == "cuda" else 0


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def matmul_peak(device: str, dtype, n: int | None = None, reps: int = 10) -> float:
    """FLOP/s of an n x n x n matmul in ``dtype`` with the torch threads in use (the MFU denominator). Random
    inputs (zeros run faster than real data on some hardware); the best of three timings of ``reps`` products."""
    import torch

    n = n or (8192 if device == "cuda" else 2048)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(3):
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(reps):
            a @ b
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 * reps / best


def model_flops(model, lengths: np.ndarray) -> float:
    """Forward FLOPs over real (unpadded) tokens: 2 x non-embedding parameters per token, plus attention's QK^T and
    AV (4 x layers x hidden x length^2 per row). Padding is not counted: MFU charges it to the pipeline."""
    cfg = getattr(model.config, "text_config", model.config)
    params = sum(p.numel() for n, p in model.named_parameters() if "embed" not in n)
    lengths = np.asarray(lengths, dtype=np.float64)
    return 2.0 * params * lengths.sum() + 4.0 * cfg.num_hidden_layers * cfg.hidden_size * (lengths**2).sum()


def bench_peak(settings: dict) -> dict:
    import torch

    from operators.model import resolve_compute_dtype

    device = settings.get("device", "cpu")
    dtype = resolve_compute_dtype(settings["compute_dtype"], device)
    if device == "cpu":
        from operators.model import cpu_threads

        torch.set_num_threads(cpu_threads(None, 1))  # what a CPU replica uses
    flops = matmul_peak(device, dtype)
    return {"device": device, "dtype": str(dtype).replace("torch.", ""), "threads": torch.get_num_threads(),
            "tflops": round(flops / 1e12, 4)}  # fmt: skip


def bench_sentence_transformers(model: str, texts: list[str], batch_size: int, settings: dict) -> dict:
    import torch
    from sentence_transformers import SentenceTransformer

    from operators.model import resolve_compute_dtype

    device = settings.get("device", "cpu")
    dtype = resolve_compute_dtype(settings["compute_dtype"], device)
    st = SentenceTransformer(model, device=device, model_kwargs={"dtype": dtype})
    if settings.get("bidirectional"):
        from operators.model import make_bidirectional

        make_bidirectional(st[0].auto_model)
    st.encode(texts[:64], batch_size=batch_size)  # warm-up
    _sync(device)
    t0 = time.perf_counter()
    st.encode(texts, batch_size=batch_size, normalize_embeddings=True)
    _sync(device)
    dt = time.perf_counter() - t0
    return {"rows": len(texts), "seconds": round(dt, 3), "rows_per_s": round(len(texts) / dt, 2),
            "dtype": str(dtype).replace("torch.", ""), "torch_threads": torch.get_num_threads()}  # fmt: skip


def _tokenised(settings: dict, replicas: int, texts: list[str]):
    """The pipeline's plan for ``replicas`` replicas, and ``texts`` validated and tokenised by its Tokenizer (after
    a warm-up): (plan, token table, seconds the tokenisation took)."""
    from operators.tokenize import Tokenizer
    from operators.validate import validate_rows
    from pipelines.embed import EmbedJobConfig, plan

    p = plan(EmbedJobConfig(**{**settings, "replicas": replicas}), gpus_in_cluster=_gpus(settings))
    tok = Tokenizer(p.tokenize)
    batch = validate_rows({"id": np.arange(len(texts)), "text": np.array(texts, dtype=object)}, cfg=p.validate,
                          registry=None)  # fmt: skip
    tok(validate_rows({k: v[:64] for k, v in batch.items()}, cfg=p.validate, registry=None))  # warm-up
    t0 = time.perf_counter()
    table = tok(batch)
    return p, table, time.perf_counter() - t0


def _time_forward(settings: dict, replicas: int, texts: list[str], barrier=None) -> dict:
    """One model replica's share of the raw forward, configured as the pipeline configures a replica (max length,
    pooling, token budget, batch size, device, dtype, torch threads for ``replicas`` on the node): tokenise (timed
    apart), warm up, wait at ``barrier`` (the replicas start together), then the Embedder alone on its texts."""
    from operators.embed import Embedder

    p, table, tok_s = _tokenised(settings, replicas, texts)
    emb = Embedder(p.embed)
    step = p.embed.batch_size
    emb(table.slice(0, min(len(texts), 256)))  # warm-up (and torch.compile's first graph)
    _sync(emb.device)
    if barrier is not None:
        barrier.wait()
    start = time.monotonic()  # system-wide on Linux: comparable between the replicas' processes
    for s in range(0, len(texts), step):
        emb(table.slice(s, step))
    _sync(emb.device)
    end = time.monotonic()
    lengths = np.asarray(table.column("num_tokens"))
    return {"rows": len(texts), "tokens": int(lengths.sum()), "flops": float(model_flops(emb.model, lengths)),
            "start": start, "end": end, "tokenizer_s": tok_s, "max_tokens": p.embed.max_tokens,
            "max_rows": p.embed.max_rows, "batch_size": step, "device": emb.device,
            "threads": emb.threads}  # fmt: skip


def pipeline_replicas(settings: dict, texts: list[str]) -> int:
    """The model replicas ``kalm embed`` picks for these texts on the Ray the pipeline part will use (``--replicas``,
    else the CPU or GPU default); the bench then runs every part with that number."""
    import ray

    from operators.model import node_cpus
    from pipelines.embed import EmbedJobConfig, plan
    from pipelines.runtime import cluster_cpu_nodes

    nodes = cluster_cpu_nodes() if ray.is_initialized() else (float(node_cpus()),)
    with tempfile.TemporaryDirectory(prefix="kalm-bench-") as tmp:
        job = EmbedJobConfig(**settings, input=_write_copies(texts, 1, Path(tmp)))
        return plan(job, gpus_in_cluster=_gpus(settings), cpu_nodes=nodes).embed.replicas


def bench_raw_forward(texts: list[str], settings: dict, replicas: int = 1) -> dict:
    """The model alone, no Ray: ``replicas`` processes (one: this process), each with the pipeline's settings for a
    replica, on every ``replicas``-th text, started together; the time is from the first start to the last end."""
    if replicas == 1:
        parts = [_time_forward(settings, 1, texts)]
        tokenizer_rate = parts[0]["rows"] / parts[0]["tokenizer_s"]
    else:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        ctx = mp.get_context("spawn")  # a fresh interpreter per replica, as a Ray worker is
        with ctx.Manager() as manager, ProcessPoolExecutor(replicas, mp_context=ctx) as pool:
            barrier = manager.Barrier(replicas)
            futures = [pool.submit(_time_forward, settings, replicas, texts[i::replicas], barrier)
                       for i in range(replicas)]  # fmt: skip
            parts = [f.result() for f in futures]
        tokenizer_rate = len(texts) / _tokenised(settings, 1, texts)[2]  # alone: the replicas' tokenisers overlapped
    dt = max(p["end"] for p in parts) - min(p["start"] for p in parts)
    rows, tokens, flops = (sum(p[k] for p in parts) for k in ("rows", "tokens", "flops"))
    first = parts[0]
    out = {"rows": rows, "tokens": tokens, "seconds": round(dt, 3), "rows_per_s": round(rows / dt, 2),
           "tokens_per_s": round(tokens / dt, 1), "model_tflops": round(flops / dt / 1e12, 6),
           "flops_per_row": flops / rows, "replicas": replicas, "max_tokens": first["max_tokens"],
           "max_rows": first["max_rows"], "batch_size": first["batch_size"], "device": first["device"],
           "threads": first["threads"],
           "tokenizer_rows_per_s": round(tokenizer_rate, 1)}  # fmt: skip
    return out


def averaged(before: dict, after: dict) -> dict:
    """A reference (the raw forward, sentence-transformers) measured before and after the pipeline part, rates
    averaged: a shared or virtual machine's speed drifts over minutes, and the pipeline's ratio is then against the
    mean of the two, not the luckier one. The raw forward's derived rates (tokens/s, model FLOP/s) follow."""
    out = dict(before)
    rate = (before["rows_per_s"] + after["rows_per_s"]) / 2
    out.update(rows_per_s=round(rate, 2), rows_per_s_before=before["rows_per_s"], rows_per_s_after=after["rows_per_s"])
    if "flops_per_row" in before:
        out.update(tokens_per_s=round(rate * before["tokens"] / before["rows"], 1),
                   model_tflops=round(rate * before["flops_per_row"] / 1e12, 6))  # fmt: skip
    return out


def add_mfu(result: dict, peak_flops: float) -> None:
    """MFU (model FLOP/s over ``peak_flops``) of the raw forward(s) and the pipeline's steady state, in place."""
    for key in ("raw_forward", "raw_forward_one_process"):
        if key in result:
            result[key]["mfu"] = round(result[key]["model_tflops"] * 1e12 / peak_flops, 4)
    pipe, fwd = result.get("pipeline"), result.get("raw_forward")
    if pipe and fwd and pipe.get("steady_rows_per_s"):
        pipe["mfu"] = round(pipe["steady_rows_per_s"] * fwd["flops_per_row"] / peak_flops, 4)


def bench_pipeline(texts: list[str], repeat: int, workdir: Path, settings: dict) -> dict:
    from pipelines.embed import EmbedJobConfig, run
    from pipelines.runtime import ray_session

    small = _write_copies(texts, 1, workdir / "in-1")
    large = _write_copies(texts, 1 + repeat, workdir / f"in-{1 + repeat}")
    runs = {}
    with ray_session() as ray_start:  # the local Ray a `kalm embed` run starts, shared by both runs
        for name, src in (("small", small), ("large", large)):
            job = EmbedJobConfig(input=src, output=str(workdir / f"out-{name}"), overwrite=True, **settings)
            m = run(job)
            runs[name] = {"rows": m["counts"]["rows_out"], "seconds": m["timings_s"]["pipeline"],
                          "steady_rows_per_s": m["timings_s"]["steady_rows_per_s"]}  # fmt: skip
            replicas = m["resolved"]["replicas"]
    extra_rows = runs["large"]["rows"] - runs["small"]["rows"]
    extra_s = runs["large"]["seconds"] - runs["small"]["seconds"]
    return {
        "ray_start_s": round(ray_start, 3),
        "replicas": replicas,
        "runs": runs,
        "end_to_end_rows_per_s": round(runs["large"]["rows"] / runs["large"]["seconds"], 2),
        "steady_rows_per_s": runs["large"]["steady_rows_per_s"],
        "marginal_rows_per_s": round(extra_rows / extra_s, 2) if extra_s > 0 else None,
    }


def bench_mine_sample(settings: dict, workdir: Path) -> dict:
    """``kalm mine`` on the bundled queries and corpus with the student (exact search, the default rules)."""
    from pipelines.mine import MineJobConfig
    from pipelines.mine import run as run_mine
    from pipelines.runtime import ray_session

    with ray_session():
        t0 = time.perf_counter()
        m = run_mine(MineJobConfig(output=str(workdir / "mine"), overwrite=True, index_type="flat",
                                   **{k: v for k, v in settings.items() if k in MINE_KEYS}))  # fmt: skip
        total = time.perf_counter() - t0
    stages = {x["stage"]: x for x in m["stages"]}
    search = next(x for name, x in stages.items() if name.startswith("search"))
    queries = search["rows_in"]
    return {"queries": queries, "search_select_s": search["seconds"],
            "search_select_queries_per_s": round(queries / search["seconds"], 2) if search["seconds"] else None,
            "end_to_end_s": round(total, 2), "end_to_end_queries_per_s": round(queries / total, 2),
            "stages_s": {name: x["seconds"] for name, x in stages.items()}}  # fmt: skip


MINE_KEYS = ("model", "num_gpus")


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
    """kalm score vs sentence-transformers on the same pairs: CrossEncoder.predict, or encode + cosine. The teacher
    is ``--teacher`` (default: the bundled all-mpnet-base-v2), the rows the first ``--score-rows`` of
    ``--score-input`` (default: the bundled training rows)."""
    import torch
    from sentence_transformers import CrossEncoder, SentenceTransformer

    from pipelines.runtime import ray_session
    from pipelines.score import ScoreJobConfig, run

    kind = ns.score or "bi-encoder"
    teacher = ns.teacher or defaults.default_teacher()
    if kind == "cross-encoder":
        teacher = cross_encoder_from(teacher)
    lines = Path(ns.score_input or defaults.sample_pairs()).read_text().splitlines()[: ns.score_rows]
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
    return result


PARTS = ("peak", "forward", "st", "pipeline", "score", "mine")


def _row(name: str, value, unit: str, note: str = "") -> tuple[str, str, str]:
    return name, "-" if value is None else f"{value:,.2f}" if isinstance(value, float) else f"{value:,}", unit + note


def ratio(a: float | None, b: float | None) -> float | None:
    return float(f"{a / b:.4g}") if a and b else None  # significant digits: a tiny model's ratios are small


def _before_after(ref: dict) -> str:
    """How an ``averaged`` reference's rate was made, for its table row."""
    if "rows_per_s_after" not in ref:
        return ""
    return f", mean of {ref['rows_per_s_before']:,.1f} before and {ref['rows_per_s_after']:,.1f} after"


def table(result: dict) -> list[tuple[str, str, str]]:
    """The printed summary: one line per measure, from the JSON result."""
    rows = []
    peak, fwd, st, pipe = (result.get(k) for k in ("peak", "raw_forward", "sentence_transformers", "pipeline"))
    if peak:
        ends = f"; higher of {peak['tflops_first']} first, {peak['tflops_last']} last" if "tflops_last" in peak else ""
        rows.append(_row(f"matmul peak ({peak['device']}, {peak['dtype']}, {peak['threads']} threads{ends})",
                         peak["tflops"], "TFLOP/s"))  # fmt: skip
    if fwd:
        n = fwd.get("replicas", 1)
        what = ("in-process" if n == 1 else f"{n} processes as the pipeline's replicas") + _before_after(fwd)
        rows.append(_row(f"raw forward, {what}", fwd["rows_per_s"], "rows/s",
                         f" ({fwd['tokens_per_s']:,.0f} tokens/s, {fwd['model_tflops']} TFLOP/s, MFU "
                         f"{fwd.get('mfu', '-')})"))  # fmt: skip
        rows.append(_row("tokenizer, one process", fwd["tokenizer_rows_per_s"], "rows/s"))
    one = result.get("raw_forward_one_process")
    if one:
        rows.append(_row(f"raw forward, one process, {one['threads']} threads", one["rows_per_s"], "rows/s",
                         f" (MFU {one.get('mfu', '-')})"))  # fmt: skip
    if st:
        rows.append(_row(f"sentence-transformers encode ({st['dtype']}{_before_after(st)})", st["rows_per_s"],
                         "rows/s"))  # fmt: skip
    if pipe:
        rows.append(_row("kalm embed, steady state", pipe["steady_rows_per_s"], "rows/s",
                         f" (MFU {pipe.get('mfu', '-')}; middle of the {pipe['runs']['large']['rows']:,}-row "
                         "run)"))  # fmt: skip
        rows.append(_row("kalm embed, marginal rate (x1 run to the large run)", pipe["marginal_rows_per_s"],
                         "rows/s"))  # fmt: skip
        rows.append(_row(f"kalm embed, end to end ({pipe['runs']['large']['rows']:,} rows)",
                         pipe["end_to_end_rows_per_s"], "rows/s"))  # fmt: skip
        rows.append(_row("Ray start-up", pipe["ray_start_s"], "s"))
    sc = result.get("score")
    if sc:
        rows.append(_row(f"sentence-transformers {sc['kind']} pairs", sc["sentence_transformers"]["pairs_per_s"],
                         "pairs/s"))  # fmt: skip
        rows.append(_row(f"kalm score {sc['kind']}, steady state", sc["pipeline"]["steady_pairs_per_s"], "pairs/s"))
    mi = result.get("mine")
    if mi:
        rows.append(_row(f"kalm mine search + select ({mi['queries']} queries)", mi["search_select_queries_per_s"],
                         "queries/s"))  # fmt: skip
        rows.append(_row("kalm mine end to end (embedding included)", mi["end_to_end_queries_per_s"], "queries/s"))
    for name, v in result.get("ratios", {}).items():
        rows.append(_row(name.replace("_", " "), v, "x"))
    return rows


def main(ns) -> dict:
    if getattr(ns, "memory", None):
        return bench_memory(ns)
    parts = [p.strip() for p in (ns.parts or ",".join(PARTS)).split(",") if p.strip()]
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        raise ConfigError(f"--parts must name some of {list(PARTS)}, got {unknown}")
    import torch

    settings = job_settings(ns)
    texts = _texts(ns.input)
    result = {"model": settings["model"], "texts": len(texts), "settings": settings, "cpus": os.cpu_count(),
              "torch": torch.__version__}  # fmt: skip
    if "peak" in parts:
        result["peak"] = bench_peak(settings)
        print("peak", result["peak"], flush=True)
    replicas = settings.setdefault("replicas", pipeline_replicas(settings, texts))  # one layout for every part
    if "forward" in parts:
        result["raw_forward"] = bench_raw_forward(texts, settings, replicas)
        print("raw forward", result["raw_forward"], flush=True)
        if replicas > 1:  # also the model as one process on every core, the usual in-process reference
            result["raw_forward_one_process"] = bench_raw_forward(texts, settings, 1)
            print("raw forward, one process", result["raw_forward_one_process"], flush=True)
    if "st" in parts:
        result["sentence_transformers"] = bench_sentence_transformers(settings["model"], texts, ns.batch_size,
                                                                      settings)  # fmt: skip
        print("sentence-transformers", result["sentence_transformers"], flush=True)
    with tempfile.TemporaryDirectory(prefix="kalm-bench-") as tmp:
        if "pipeline" in parts:
            result["pipeline"] = pipe = bench_pipeline(texts, ns.repeat, Path(tmp), settings)
            if pipe["replicas"] != replicas:
                logger.warning("the pipeline ran %d replicas, the raw forward %d", pipe["replicas"], replicas)
            if "forward" in parts:
                after = bench_raw_forward(texts, settings, replicas)
                print("raw forward, after the pipeline", after, flush=True)
                result["raw_forward"] = averaged(result["raw_forward"], after)
            if "st" in parts:  # the same for the other reference the pipeline is held to
                again = bench_sentence_transformers(settings["model"], texts, ns.batch_size, settings)
                result["sentence_transformers"] = averaged(result["sentence_transformers"], again)
        if "score" in parts:
            result["score"] = bench_score(ns)
        if "mine" in parts:
            result["mine"] = bench_mine_sample(settings, Path(tmp))
    if "peak" in result:
        if "forward" in parts or "pipeline" in parts:
            # Measured again after the parts, and the higher taken: a peak is a bound, and this VM's speed drifts
            # 10-30% within minutes, so one short timing at a slow moment put the MFU of a later forward above 1.
            first, last = result["peak"]["tflops"], bench_peak(settings)["tflops"]
            result["peak"].update(tflops=max(first, last), tflops_first=first, tflops_last=last)
        add_mfu(result, result["peak"]["tflops"] * 1e12)
    steady = result.get("pipeline", {}).get("steady_rows_per_s")
    result["ratios"] = {k: v for k, v in {
        "pipeline_steady_over_raw_forward": ratio(steady, result.get("raw_forward", {}).get("rows_per_s")),
        "pipeline_steady_over_raw_forward_one_process": ratio(steady, result.get("raw_forward_one_process", {})
                                                              .get("rows_per_s")),
        "pipeline_steady_over_sentence_transformers": ratio(steady, result.get("sentence_transformers", {})
                                                            .get("rows_per_s")),
        "raw_forward_over_sentence_transformers": ratio(result.get("raw_forward", {}).get("rows_per_s"),
                                                        result.get("sentence_transformers", {}).get("rows_per_s")),
        "score_steady_over_sentence_transformers": result.get("score", {}).get(
            "ratio_pipeline_steady_over_sentence_transformers"),
    }.items() if v is not None}  # fmt: skip
    print(json.dumps(result, indent=2))
    print()
    for name, value, unit in table(result):
        print(f"{name:58s} {value:>12s} {unit}")
    if ns.json:
        Path(ns.json).write_text(json.dumps(result, indent=2))
    return result


def tiny_model(folder: Path) -> str:
    """A randomly initialised 2-layer, 32-wide BERT with the bundled student's tokenizer, saved once: the model
    costs next to nothing, so a run's memory is the pipeline's own."""
    import shutil

    import torch
    from transformers import BertConfig, BertModel

    if not (folder / "model.safetensors").is_file():
        src = Path(defaults.default_student())
        folder.mkdir(parents=True, exist_ok=True)
        for f in src.iterdir():
            if f.is_file() and ("token" in f.name or f.name == "vocab.txt"):
                shutil.copy(f, folder / f.name)
        torch.manual_seed(0)
        cfg = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=64, max_position_embeddings=512)  # fmt: skip
        BertModel(cfg).save_pretrained(folder, safe_serialization=True)
    return str(folder)


def _memory_input(texts: list[str], rows: int, folder: Path, rows_per_file: int = 10_000) -> str:
    """``rows`` rows of the bundled texts (cycled, each id distinct) in files of ``rows_per_file``: a larger corpus
    has more files of the same size, as corpora grow. (A read task holds its file's row group while it streams, so
    files that grew with the corpus would measure the row-group size, not the corpus.)"""
    folder.mkdir(parents=True, exist_ok=True)
    for k, start in enumerate(range(0, rows, rows_per_file)):
        idx = np.arange(start, min(rows, start + rows_per_file))
        pq.write_table(pa.table({"id": [f"r{i}" for i in idx], "text": [texts[i % len(texts)] for i in idx]}),
                       folder / f"part-{k:05d}.parquet")  # fmt: skip
    return str(folder)


def bench_memory(ns) -> dict:
    """Peak memory of ``kalm embed`` (the driver and every Ray process it starts, summed PSS sampled every second)
    on inputs of each size in ``--memory`` (files of 10k rows), with a tiny model: streaming means the peak does not
    grow with rows."""
    import sys

    from pipelines.bench_mine import measure

    sizes = [int(x) for x in str(ns.memory).split(",")]
    texts = _texts(ns.input)
    model = ns.model or tiny_model(defaults.cache_dir() / "models" / "bench-tiny-bert")
    results = []
    with tempfile.TemporaryDirectory(prefix="kalm-bench-memory-") as tmp:
        for rows in sizes:
            src = _memory_input(texts, rows, Path(tmp) / f"in-{rows}")
            out = Path(tmp) / f"out-{rows}"
            m = measure([sys.executable, "-m", "pipelines.embed", "--input", src, "--output", str(out), "--model",
                         model, "--max-length", "128", "--overwrite"])  # fmt: skip
            manifest = json.loads((out / "_manifest.json").read_text())
            r = {"rows": rows, "rows_out": manifest["counts"]["rows_out"], "seconds": m["seconds"],
                 "pipeline_s": manifest["timings_s"]["pipeline"], "peak_pss_tree_mb": m["peak_pss_tree_mb"],
                 "peak_rss_driver_mb": m["peak_rss_main_mb"],
                 "peak_pss_by_process_mb": m["peak_pss_by_process_mb"]}  # fmt: skip
            results.append(r)
            print(json.dumps(r), flush=True)
            shutil_rm(src, out)
    out = {"model": model, "results": results,
           "peak_ratio_largest_over_smallest": round(results[-1]["peak_pss_tree_mb"] / results[0]["peak_pss_tree_mb"],
                                                     3)}  # fmt: skip
    print(f"\n{'rows':>10} {'rows out':>10} {'seconds':>8} {'peak PSS, tree MB':>18} {'driver RSS MB':>14}")
    for r in results:
        print(f"{r['rows']:>10,} {r['rows_out']:>10,} {r['seconds']:>8} {r['peak_pss_tree_mb']:>18,} "
              f"{r['peak_rss_driver_mb']:>14,}")  # fmt: skip
    print(f"peak ratio, largest / smallest: {out['peak_ratio_largest_over_smallest']}")
    if ns.json:
        Path(ns.json).write_text(json.dumps(out, indent=2))
    return out


def shutil_rm(*paths) -> None:
    import shutil

    for p in paths:
        shutil.rmtree(p, ignore_errors=True)
