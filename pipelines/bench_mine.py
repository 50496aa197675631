"""``kalm bench --mine``: ``kalm mine`` against sentence-transformers' ``mine_hard_negatives``, same model, texts
and rules, each in its own process, timed wall-clock with the peak resident memory of its whole process tree
(``kalm mine``: the driver plus every Ray process it starts, sampled every 0.2 s with psutil).

The corpus is synthetic but made of real text: passages of 1-3 sentences drawn (seeded) from the bundled Python
docs sample, so lengths and vocabulary are those of real passages; each query is the first words of one sentence of
its positive passage. Both tools truncate at ``--mine-max-length`` tokens and use exact inner-product search
(sentence-transformers with ``use_faiss=True``, its fastest CPU path). The rules: window [10, 50), relative margin
0.05, 7 negatives, top sampling. The two outputs are also compared: the share of queries given the same negatives.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines import defaults

RULES = {"num_negatives": 7, "range_min": 10, "range_max": 50, "relative_margin": 0.05}

ST_SCRIPT = """
import json, sys, time
import pyarrow.parquet as pq
from datasets import Dataset
from sentence_transformers import SentenceTransformer
from sentence_transformers.util import mine_hard_negatives
model_dir, data, out = sys.argv[1:4]
max_length, rules = int(sys.argv[4]), json.loads(sys.argv[5])
t0 = time.perf_counter()
corpus = pq.read_table(f"{data}/corpus.parquet").to_pylist()
text = {r["id"]: r["text"] for r in corpus}
queries = pq.read_table(f"{data}/queries.parquet").to_pylist()
pairs = Dataset.from_list([{"query": q["query"], "positive": text[p]} for q in queries for p in q["positive_ids"]])
model = SentenceTransformer(model_dir, device="cpu")
model.max_seq_length = max_length
ds = mine_hard_negatives(pairs, model, corpus=[r["text"] for r in corpus], sampling_strategy="top",
                         output_format="n-tuple", batch_size=64, use_faiss=True, verbose=False, **rules)
ds.to_parquet(out)
print(json.dumps({"rows": ds.num_rows, "seconds": time.perf_counter() - t0}))
"""


def make_data(folder: Path, passages: int, queries: int, seed: int = 0) -> None:
    """passages: 1-3 sentences of the bundled sample; queries: the first 6-12 words of one of their sentences."""
    texts = pq.read_table(defaults.SAMPLE_CORPUS).column("text").to_pylist()
    sentences = [s.strip() for t in texts for s in re.split(r"(?<=[.!?])\s+", t) if len(s.split()) >= 5]
    rng = np.random.default_rng(seed)
    corpus, seen = [], set()
    while len(corpus) < passages:
        picked = rng.choice(len(sentences), size=int(rng.integers(1, 4)), replace=False)
        text = " ".join(sentences[i] for i in picked)
        if text not in seen:
            seen.add(text)
            corpus.append({"id": f"p{len(corpus)}", "text": text, "first": [int(i) for i in picked]})
    qs = []
    for j, k in enumerate(rng.choice(passages, size=queries, replace=False)):
        s = sentences[corpus[k]["first"][int(rng.integers(len(corpus[k]["first"])))]].split()
        qs.append({"query_id": f"q{j}", "query": " ".join(s[: int(rng.integers(6, 13))]),
                   "positive_ids": [corpus[k]["id"]]})  # fmt: skip
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist([{"id": c["id"], "text": c["text"]} for c in corpus]),
                   folder / "corpus.parquet")  # fmt: skip
    pq.write_table(pa.Table.from_pylist(qs), folder / "queries.parquet")


def _pss(pid: int) -> int:
    """Proportional set size in bytes, from /proc/<pid>/smaps_rollup (one cheap read; psutil's memory_full_info
    parses the whole smaps file, which cost a sixth of a core per sample at Ray's process count)."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _name(p) -> str:
    """A process's role: Ray's title for its workers (``ray::MapWorker(MapBatches(Embedder))``), else its program."""
    try:
        cmd = p.cmdline()
    except Exception:  # noqa: BLE001 - gone between listing and reading
        return "?"
    if not cmd:
        return "?"
    return cmd[0] if cmd[0].startswith("ray::") else " ".join(Path(c).name for c in cmd[:2])[:60]


def measure(cmd: list[str]) -> dict:
    """Run ``cmd``; wall time, the peak of the summed PSS of its process tree (with the tree's share by process role
    at that moment) and the top process's RSS."""
    import psutil

    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = [0, 0, {}]  # tree PSS, top process RSS, PSS by role at the tree's peak

    def sample():
        root = psutil.Process(proc.pid)
        while proc.poll() is None:
            try:
                procs = [root, *root.children(recursive=True)]
                pss = [(_name(p), _pss(p.pid)) for p in procs]
                total = sum(v for _, v in pss)
                if total > peak[0]:
                    roles: dict[str, int] = {}
                    for name, v in pss:
                        roles[name] = roles.get(name, 0) + v
                    peak[0], peak[2] = total, roles
                peak[1] = max(peak[1], root.memory_info().rss)
            except psutil.Error:
                pass
            time.sleep(1.0)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    out, err = proc.communicate()
    th.join()
    if proc.returncode:
        raise RuntimeError(f"{cmd[:4]} failed ({proc.returncode}):\n{err[-3000:]}")
    by_role = {k: round(v / 2**20) for k, v in sorted(peak[2].items(), key=lambda kv: -kv[1])[:10]}
    return {"seconds": round(time.perf_counter() - t0, 1), "peak_pss_tree_mb": round(peak[0] / 2**20),
            "peak_rss_main_mb": round(peak[1] / 2**20), "peak_pss_by_process_mb": by_role,
            "stdout_tail": out[-400:]}  # fmt: skip


def agreement(data: Path, kalm_out: Path, st_out: Path) -> dict:
    text = dict(zip(*pq.read_table(data / "corpus.parquet", columns=["id", "text"]).to_pydict().values()))
    ours = {r["query"]: [text[i] for i in r["neg_ids"]] for r in pq.read_table(kalm_out / "candidates").to_pylist()}
    st = pq.read_table(st_out).to_pylist()
    n = RULES["num_negatives"]
    same = sum(ours.get(r["query"]) == [r[f"negative_{i}"] for i in range(1, n + 1)] for r in st)
    return {"queries_compared": len(st), "same_negatives": same}


def bench_mine(model: str, passages: int, queries: int, max_length: int, workdir: Path) -> dict:
    data = workdir / f"data-{passages}"
    make_data(data, passages, queries)
    kalm_out, st_out = workdir / f"kalm-{passages}", workdir / f"st-{passages}.parquet"
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in RULES.items()]
    kalm = measure([sys.executable, "-m", "pipelines.mine", "--queries", str(data / "queries.parquet"), "--corpus",
                    str(data / "corpus.parquet"), "--output", str(kalm_out), "--model", model, "--query-prompt", "",
                    "--max-length", str(max_length), "--overwrite", *flags])  # fmt: skip
    st = measure([sys.executable, "-c", ST_SCRIPT, model, str(data), str(st_out), str(max_length), json.dumps(RULES)])
    report = json.loads((kalm_out / "_manifest.json").read_text())
    return {
        "passages": passages,
        "queries": queries,
        "kalm_mine": {k: v for k, v in kalm.items() if k != "stdout_tail"}
        | {"stages_s": {x["stage"]: x["seconds"] for x in report["stages"]}},
        "mine_hard_negatives": {k: v for k, v in st.items() if k != "stdout_tail"},
        "speedup": round(st["seconds"] / kalm["seconds"], 2),
        "agreement": agreement(data, kalm_out, st_out),
    }


def main(ns) -> dict:
    model = ns.model or defaults.default_student()
    sizes = [int(x) for x in str(ns.mine_passages).split(",")]
    results = []
    with tempfile.TemporaryDirectory(prefix="kalm-bench-mine-") as tmp:
        for passages in sizes:
            r = bench_mine(model, passages, ns.mine_queries, ns.mine_max_length, Path(tmp))
            results.append(r)
            print(json.dumps(r), flush=True)
    print(f"\n{'passages':>9} {'queries':>8} {'kalm s':>8} {'ST s':>8} {'speedup':>8} {'kalm PSS MB':>13} "
          f"{'ST PSS MB':>11} {'same negs':>10}")  # fmt: skip
    for r in results:
        k, s, a = r["kalm_mine"], r["mine_hard_negatives"], r["agreement"]
        print(f"{r['passages']:>9} {r['queries']:>8} {k['seconds']:>8} {s['seconds']:>8} {r['speedup']:>8} "
              f"{k['peak_pss_tree_mb']:>13} {s['peak_pss_tree_mb']:>11} "
              f"{a['same_negatives']}/{a['queries_compared']:>5}")  # fmt: skip
    out = {"model": model, "max_length": ns.mine_max_length, "rules": RULES, "results": results}
    if ns.json:
        Path(ns.json).write_text(json.dumps(out, indent=2))
    return out
