"""GPU check of the embedding path, run on a lent GPU machine (no Ray there: the operators are called in-process).

It checks and measures, in one run:
1. the bf16 matmul peak of this GPU (the MFU denominator);
2. correctness on CUDA: the Embedder (fp32, bf16 and fp16, SDPA) against sentence-transformers encode of the
   same model on the same GPU, cosine per row;
3. throughput of the Embedder in bf16 for a randomly initialised Qwen2-0.5B-shaped model with bidirectional
   attention (token lengths of the real texts; first, as its MFU is the issue's goal) and all-MiniLM-L6-v2 (real
   texts): tokens/s, rows/s, model FLOP/s and MFU over token budgets, the median of three passes, eager, then
   compiled (``--compile``) at the two largest; the 0.5B model's largest budget profiled, eager and compiled (the
   top ops, full tables beside ``--out``); sentence-transformers encode on the same texts;
4. the tokenizer's rows/s in this process (one actor's, at a given thread count: ``tokenizer_rate.py``).
``--goal`` measures only the peak and the compiled 0.5B model at 65,536 tokens.

Usage: python tests/gpu/gpu_check.py --minilm DIR --out results.json [--quick] [--goal] [--device cuda]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from operators.arrow import vectors  # noqa: E402
from operators.embed import EmbedConfig, Embedder  # noqa: E402
from operators.model import inspect_model  # noqa: E402
from operators.tokenize import TokenizeConfig, Tokenizer  # noqa: E402
from operators.validate import ValidateConfig, validate_rows  # noqa: E402
from pipelines.bench import bench_sentence_transformers, matmul_peak, model_flops  # noqa: E402  (the same definitions kalm bench uses)

CORPUS = Path(__file__).resolve().parents[2] / "pipelines" / "data" / "corpus.parquet"


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def run_embedder(emb: Embedder, batch, device: str) -> float:
    """batch: an Arrow table from the Tokenizer (or built like one)."""
    sync(device)
    t0 = time.perf_counter()
    for s in range(0, batch.num_rows, emb.cfg.batch_size):
        emb(batch.slice(s, emb.cfg.batch_size))
    sync(device)
    return time.perf_counter() - t0


def profile(emb: Embedder, batch, dev: str, path: Path, rows: int = 8192, top: int = 15) -> list[dict]:
    """One call of ``rows`` rows under torch.profiler: the ops (kernels on CUDA) that took the most self time,
    as a share of all; the full table goes to ``path``. Where a forward's time goes besides the matmuls."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev == "cuda" else [])
    key = "self_device_time_total" if dev == "cuda" else "self_cpu_time_total"
    with torch_profile(activities=acts) as prof:
        run_embedder(emb, batch.slice(0, rows), dev)
    events = prof.key_averages()
    path.write_text(events.table(sort_by=key, row_limit=60))
    if dev == "cuda":
        # The kernels only, as the table's own total: the CPU op that launched a kernel carries its device time too.
        events = [e for e in events if e.device_type == DeviceType.CUDA and not e.is_user_annotation]
    total = sum(getattr(e, key) for e in events) or 1
    ranked = sorted(events, key=lambda e: getattr(e, key), reverse=True)[:top]
    return [{"op": e.key[:120], "share": round(getattr(e, key) / total, 4), "calls": e.count} for e in ranked]


def sweep(name: str, info, batch: dict, budgets: list[int], dev: str, peak: float, profile_to: Path | None = None,
          passes: int = 3, **cfg) -> list[dict]:  # fmt: skip
    """Embedder throughput over token budgets: rows/s, tokens/s (real tokens), model TFLOP/s and MFU, the median of
    ``passes`` timed passes over ``batch``. One replica serves the whole sweep (its budget swapped between runs), so
    a compiled one compiles once. With ``compile=True`` the first budget's warm-up is a whole pass (every batch
    shape compiled or reused before the timed passes) and its seconds are reported: what a replica pays once at
    start. ``profile_to``: the last budget is then profiled (``profile``) into that file and its top ops reported."""
    lengths = np.asarray(batch.column("num_tokens")).astype(np.int64)
    emb = Embedder(EmbedConfig(model=info, device=dev, num_gpus=1 if dev == "cuda" else 0, max_tokens=budgets[0],
                               max_rows=2048, batch_size=8192, **cfg))  # fmt: skip
    fl = model_flops(emb.model, lengths)
    results = []
    for i, mt in enumerate(budgets):
        emb.cfg = dataclasses.replace(emb.cfg, max_tokens=mt)
        warm_s = run_embedder(emb, batch if cfg.get("compile") else batch.slice(0, 1024), dev)
        times = sorted(run_embedder(emb, batch, dev) for _ in range(passes))
        dt = times[len(times) // 2]
        r = {"max_tokens": mt, "rows_per_s": round(len(lengths) / dt, 1), "tokens_per_s": round(lengths.sum() / dt),
             "tflops": round(fl / dt / 1e12, 2), "mfu": round(fl / dt / peak, 4), "warm_up_s": round(warm_s, 1),
             "pass_s": [round(t, 3) for t in times], "attn": emb.model.config._attn_implementation,
             **{k: v for k, v in cfg.items() if k != "bidirectional"}}  # fmt: skip
        if profile_to is not None and i == len(budgets) - 1:
            r["profile"] = profile(emb, batch, dev, profile_to)
        results.append(r)
        print(name, {k: v for k, v in r.items() if k != "profile"}, flush=True)
    del emb
    if dev == "cuda":
        torch.cuda.empty_cache()
    return results


def tokenized(info, texts, max_length):
    tok = Tokenizer(TokenizeConfig(model=info, max_length=max_length))
    b = validate_rows({"id": np.arange(len(texts)), "text": np.array(texts, dtype=object)}, cfg=ValidateConfig(),
                      registry=None)  # fmt: skip
    t0 = time.perf_counter()
    out = tok(b)
    return out, time.perf_counter() - t0


def correctness(info, texts: list[str], dev: str, path: str, rows: int, res: dict) -> None:
    """The Embedder in fp32, bf16 and fp16 against sentence-transformers' fp32 encode of the same model on the same
    device: cosine per row, into ``res``."""
    from sentence_transformers import SentenceTransformer

    sample = texts[:rows]
    st = SentenceTransformer(path, device=dev).float()  # fp32 reference (the carried weights are fp16)
    ref = st.encode(sample, batch_size=64, normalize_embeddings=True, convert_to_numpy=True)
    b, _ = tokenized(info, sample, 256)
    for cdt in ("float32", "bfloat16", "float16"):
        emb = Embedder(EmbedConfig(model=info, device=dev, num_gpus=1 if dev == "cuda" else 0, compute_dtype=cdt))
        got = vectors(emb(b), "embedding")
        cos = (got * ref).sum(1)
        res[f"minilm_{cdt}_cos_vs_st"] = {"min": float(cos.min()), "mean": float(cos.mean())}
        print(cdt, res[f"minilm_{cdt}_cos_vs_st"], flush=True)
        del emb
    del st


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--minilm", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--goal", action="store_true", help="only the issue's goal figure, again: the peak and the 0.5B "
                    "model compiled at 65,536 tokens (a second run's confirmation)")  # fmt: skip
    args = ap.parse_args()
    dev = args.device
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    res = {"torch": torch.__version__}
    import transformers

    res["transformers"] = transformers.__version__
    if dev == "cuda":
        res["gpu"] = torch.cuda.get_device_name(0)
    texts = [t for t in pq.read_table(CORPUS).column("text").to_pylist()]
    peak = matmul_peak(dev, torch.bfloat16 if dev == "cuda" else torch.float32, 1024 if args.quick else 8192)
    res["matmul_peak_tflops"] = round(peak / 1e12, 1)
    print("peak", res["matmul_peak_tflops"], flush=True)

    info = inspect_model(args.minilm)
    if not args.goal:
        correctness(info, texts, dev, args.minilm, 64 if args.quick else 512, res)

    # 3. The 0.5B model first: its MFU is the goal, and what is measured is kept if a later part overruns.
    reps = 1 if args.quick else 10
    all_texts = texts * reps
    b, tok_s = tokenized(info, all_texts, 256)
    res["tokenizer_rows_per_s_one_process"] = round(len(all_texts) / tok_s, 1)
    lengths = np.asarray(b.column("num_tokens")).astype(np.int64)
    budgets = [16384] if args.quick else [8192, 32768, 65536, 131072]
    outdir = Path(args.out).parent

    def save():
        Path(args.out).write_text(json.dumps(res, indent=2))

    # 3a. Qwen2-0.5B-shaped random model, bidirectional, bf16
    from transformers import Qwen2Config, Qwen2Model

    qdir = Path("/tmp/qwen2-tiny-random" if args.quick else "/tmp/qwen2-05b-random")
    if not qdir.exists():
        cfg = Qwen2Config(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                          num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768)  # fmt: skip
        if args.quick:
            cfg = Qwen2Config(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
        with torch.device(dev):  # random init on the GPU: seconds, where 0.5B parameters on the CPU take longer
            Qwen2Model(cfg).to(torch.bfloat16).save_pretrained(qdir, safe_serialization=True)
    qinfo = inspect_model(str(qdir))
    # Token lengths of the real corpus under a Qwen-like tokenizer are close to WordPiece's; reuse, cap at 512.
    rng = np.random.default_rng(0)
    vocab = 1000 if args.quick else 151936
    qlen = np.minimum(lengths, 512)
    ids = np.empty(len(qlen), dtype=object)
    for i, n in enumerate(qlen):
        ids[i] = rng.integers(0, vocab, size=int(n), dtype=np.int32)
    qb = pa.table({"input_ids": pa.array([x.tolist() for x in ids], pa.list_(pa.int32())),
                   "num_tokens": qlen.astype(np.int32), "_reject": [""] * len(qlen)})  # fmt: skip
    if not args.quick:
        qb = qb.slice(0, 3 * len(texts))
    if args.goal:
        res["qwen2_05b_bf16_bidirectional_compiled"] = sweep("qwen2-0.5b compiled", qinfo, qb, [65536], dev, peak,
                                                             bidirectional=True, compile=True)  # fmt: skip
        save()
        return
    res["qwen2_05b_bf16_bidirectional"] = sweep("qwen2-0.5b", qinfo, qb, budgets, dev, peak, bidirectional=True,
                                                profile_to=outdir / "profile-qwen2-eager.txt")  # fmt: skip
    save()

    # 3b. torch.compile (``--compile``) at the two largest budgets: eager runs every RMSNorm, rotary, SiLU-and-mul
    # and residual add as its own kernel over the whole activation; for a 896-wide model those passes over memory
    # take about as long per token as its matmuls (an estimate, ~60 against ~58 ms at 65,536 tokens); inductor fuses
    # them. A failure to compile (no C compiler for triton's launchers on the image...) is recorded, not fatal.
    st_settings = {"device": dev, "compute_dtype": "bfloat16" if dev == "cuda" else "float32"}
    b_all = b if args.quick else b.slice(0, 3 * len(texts))
    runs = {"qwen2_05b_bf16_bidirectional_compiled": lambda: sweep(
                "qwen2-0.5b compiled", qinfo, qb, budgets[-2:], dev, peak, bidirectional=True, compile=True,
                profile_to=outdir / "profile-qwen2-compiled.txt"),
            "minilm_bf16": lambda: sweep("minilm", info, b, budgets, dev, peak),
            # sentence-transformers encode, same texts, model, device and dtype (the reference kalm bench uses)
            "minilm_st_encode_bf16": lambda: bench_sentence_transformers(args.minilm, all_texts, 256, st_settings),
            "minilm_bf16_compiled": lambda: sweep("minilm compiled", info, b_all, budgets[-2:], dev, peak,
                                                  compile=True)}  # fmt: skip
    for key, fn in runs.items():
        t0 = time.perf_counter()
        try:
            res[key] = fn()
        except Exception as e:  # noqa: BLE001 - a diagnostic run: keep what it measured and say what failed
            res[key] = {"error": f"{type(e).__name__}: {str(e)[:2000]}"}
        print(key, f"{time.perf_counter() - t0:.0f} s", "" if isinstance(res[key], list) else res[key], flush=True)
        save()
    summary = {k: [{x: r[x] for x in ("max_tokens", "tokens_per_s", "tflops", "mfu")} for r in v]
               for k, v in res.items() if isinstance(v, list)}  # fmt: skip
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
