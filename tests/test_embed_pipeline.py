"""End to end through the `kalm embed` CLI on the shared local Ray session."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.cli import EXIT_BAD_CONFIG, main
from tests.reference import reference as _reference


def _write_jsonl(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def _read_output(out):
    files = sorted(out.glob("part-*.parquet"))
    return pa.concat_tables([pq.read_table(f) for f in files]) if files else None


def _read_rejects(out):
    files = sorted((out / "_rejects").glob("*.parquet"))
    return pa.concat_tables([pq.read_table(f) for f in files]).to_pylist() if files else []


def test_jsonl_folder_with_bad_rows_counts_add_up(ray_local, tiny_bert, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    words = "the python list dict string function class module error file import return value".split()
    good = [{"id": f"d{i}", "text": " ".join(words[i % 7 : i % 7 + 3 + i % 5])} for i in range(30)]
    bad = [
        {"id": "n1", "text": None},
        {"id": "e1", "text": ""},
        {"id": "w1", "text": "  \t\n "},
        {"id": "d3", "text": "a duplicate id"},  # d3 is also in the first file
        {"id": "long", "text": "python " * 500},  # longer than max_length: embedded, counted truncated
    ]
    _write_jsonl(src / "a.jsonl", good[:20])
    _write_jsonl(src / "b.jsonl", good[20:] + bad)
    out = tmp_path / "out"
    rc = main(["embed", "--input", str(src), "--output", str(out), "--model", tiny_bert, "--max-length", "32"])
    assert rc == 0
    table = _read_output(out)
    ids = table.column("id").to_pylist()
    assert sorted(ids) == sorted([r["id"] for r in good] + ["long"])  # each valid id exactly once
    assert pa.types.is_fixed_size_list(table.schema.field("embedding").type)
    assert table.schema.field("embedding").type.list_size == 32
    assert table.schema.field("embedding").type.value_type == pa.float32()
    rejects = {(r["id"], r["reason"]) for r in _read_rejects(out)}
    assert rejects == {("n1", "text_null"), ("e1", "text_empty"), ("w1", "text_empty"), ("d3", "id_duplicate")}
    manifest = json.loads((out / "_manifest.json").read_text())
    c = manifest["counts"]
    assert c["rows_in"] == 35 and c["rows_out"] == 31 and c["rows_rejected"] == 4
    assert c["rejected_by_reason"] == {"id_duplicate": 1, "text_empty": 2, "text_null": 1}
    assert c["rows_truncated"] == 1
    assert manifest["model"]["weights_sha256"] and manifest["versions"]["ray"]
    assert manifest["config"]["max_length"] == 32
    # vectors against an independent per-row forward of the same model
    by_id = dict(zip(ids, np.stack(table.column("embedding").to_numpy(zero_copy_only=False))))
    texts = {r["id"]: r["text"] for r in good[:20]}  # first file: no duplicate ambiguity
    want = _reference(tiny_bert, list(texts.values()))
    got = np.stack([by_id[i] for i in texts])
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_csv_without_ids_add_ids_dims_float16_keep_columns(ray_local, tiny_bert, tmp_path, capsys):
    src = tmp_path / "docs.csv"
    src.write_text("title,text\nt0,the python list\nt1,a dict of string\nt2,import the module\n")
    out = tmp_path / "out"
    args = ["embed", "--input", str(src), "--output", str(out), "--model", tiny_bert, "--max-length", "32"]
    assert main(args) == EXIT_BAD_CONFIG
    err = capsys.readouterr().err
    assert "missing column(s) ['id']" in err and "columns found: ['title', 'text']" in err and "--add-ids" in err
    assert not list(out.glob("*"))  # failed before any work
    rc = main(args + ["--add-ids", "--dims", "32,8", "--dtype", "float16", "--keep-columns", "title"])
    assert rc == 0
    table = _read_output(out).sort_by("id")
    assert table.column("id").to_pylist() == ["docs.csv:0", "docs.csv:1", "docs.csv:2"]
    assert table.column("title").to_pylist() == ["t0", "t1", "t2"]
    for d in (32, 8):
        t = table.schema.field(f"embedding_{d}").type
        assert pa.types.is_fixed_size_list(t) and t.list_size == d and t.value_type == pa.float16()
    v8 = np.stack(table.column("embedding_8").to_numpy(zero_copy_only=False)).astype(np.float32)
    full = _reference(tiny_bert, ["the python list", "a dict of string", "import the module"])
    head = full[:, :8] / np.linalg.norm(full[:, :8], axis=1, keepdims=True)
    np.testing.assert_allclose(v8, head, atol=2e-3)


def test_hf_save_to_disk_input_and_query_prompt(ray_local, tiny_bert, tmp_path):
    import datasets

    texts = ["the python list", "read the file line", "call the function"]
    ds_path = tmp_path / "hf"
    datasets.Dataset.from_dict({"qid": [10, 11, 12], "query": texts}).save_to_disk(str(ds_path))
    out = tmp_path / "out"
    rc = main(
        ["embed", "--input", str(ds_path), "--output", str(out), "--model", tiny_bert, "--id-column", "qid",
         "--text-column", "query", "--text-kind", "query", "--task", "find code", "--max-length", "32"]
    )  # fmt: skip
    assert rc == 0
    table = _read_output(out).sort_by("qid")
    assert table.column("qid").to_pylist() == [10, 11, 12]
    want = _reference(tiny_bert, [f"Instruct: find code\nQuery: {t}" for t in texts])
    np.testing.assert_allclose(np.stack(table.column("embedding").to_numpy(zero_copy_only=False)), want, atol=1e-5)
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["resolved"]["prompt"] == "Instruct: find code\nQuery: {text}"
    assert manifest["resolved"]["input_format"] == "hf"


def test_default_model_matches_sentence_transformers(ray_local, default_model, tmp_path):
    """The real bundled all-MiniLM-L6-v2 through the pipeline vs sentence-transformers encode, row by row."""
    from sentence_transformers import SentenceTransformer

    from pipelines.defaults import SAMPLE_CORPUS

    sample = pq.read_table(SAMPLE_CORPUS).slice(0, 200)
    src = tmp_path / "sample.parquet"
    pq.write_table(sample, src)
    out = tmp_path / "out"
    assert main(["embed", "--input", str(src), "--output", str(out)]) == 0
    table = _read_output(out)
    got = dict(zip(table.column("id").to_pylist(), np.stack(table.column("embedding").to_numpy(zero_copy_only=False))))
    assert len(got) == 200
    st = SentenceTransformer(default_model, device="cpu")
    ref = st.encode(sample.column("text").to_pylist(), batch_size=32, normalize_embeddings=True)
    cos = np.array([float(np.dot(got[i], r)) for i, r in zip(sample.column("id").to_pylist(), ref)])
    assert cos.min() >= 0.9999, f"worst cosine {cos.min()} at row {int(cos.argmin())}"


def test_bad_config_fails_before_work(tiny_bert, tmp_path, capsys):
    src = tmp_path / "a.jsonl"
    _write_jsonl(src, [{"id": 1, "body": "x"}])
    out = tmp_path / "out"
    assert main(["embed", "--input", str(src), "--output", str(out), "--model", tiny_bert]) == EXIT_BAD_CONFIG
    assert "missing column(s) ['text']; columns found: ['id', 'body']" in capsys.readouterr().err
    good = tmp_path / "good.jsonl"
    _write_jsonl(good, [{"id": 1, "text": "x"}])
    assert main(["embed", "--input", str(good), "--model", tiny_bert, "--pooling", "max"]) == EXIT_BAD_CONFIG
    assert "pooling must be one of ('mean', 'cls', 'last'), got 'max'" in capsys.readouterr().err
    cfg = tmp_path / "embed.yaml"
    cfg.write_text("input: x\nmax_lenght: 3\n")
    assert main(["embed", "--config", str(cfg)]) == EXIT_BAD_CONFIG
    assert "unknown config key(s) ['max_lenght']" in capsys.readouterr().err
    assert main(["embed", "--input", str(tmp_path / "nope.parquet"), "--model", tiny_bert]) == EXIT_BAD_CONFIG
    assert "no input files found" in capsys.readouterr().err


def test_existing_output_is_not_overwritten(tiny_bert, tmp_path, capsys):
    src = tmp_path / "a.jsonl"
    _write_jsonl(src, [{"id": 1, "text": "x"}])
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    assert main(["embed", "--input", str(src), "--output", str(out), "--model", tiny_bert]) == EXIT_BAD_CONFIG
    assert "holds no kalm run" in capsys.readouterr().err and (out / "keep.txt").read_text() == "precious"


def test_id_claims_survive_a_retried_batch(ray_local):
    """A batch re-run after a worker died claims its ids again as the same owner: no self-duplicates.
    The same ids from another file, or twice in one batch, are duplicates."""
    import ray

    from operators.io import ROW_COLUMN, SOURCE_COLUMN
    from operators.validate import COMMITTED, IdRegistry, ValidateConfig, id_key, validate_rows

    cfg = ValidateConfig(id_shards=2)
    registry = [ray.remote(num_cpus=0)(IdRegistry).remote() for _ in range(2)]

    def batch(src, ids, start=0):
        return {"id": np.array(ids, dtype=object), "text": np.array(["t"] * len(ids), dtype=object),
                SOURCE_COLUMN: np.array([src] * len(ids), dtype=object),
                ROW_COLUMN: np.arange(start, start + len(ids))}  # fmt: skip

    first = validate_rows(batch("a.parquet", ["x", "y", "x"]), cfg=cfg, registry=registry)
    assert first["_reject"].tolist() == ["", "", "id_duplicate"]
    retry = validate_rows(batch("a.parquet", ["x", "y", "x"]), cfg=cfg, registry=registry)
    assert retry["_reject"].tolist() == ["", "", "id_duplicate"]
    other = validate_rows(batch("b.parquet", ["x", "y", "x"]), cfg=cfg, registry=registry)
    assert other["_reject"].tolist() == ["id_duplicate"] * 3
    # Resume: ids committed by an earlier attempt are preloaded; a new row with one of them is a duplicate.
    ray.get([r.preload.remote([id_key("z")]) for r in registry])
    assert COMMITTED != b""
    later = validate_rows(batch("a.parquet", ["z", "w"], start=3), cfg=cfg, registry=registry)
    assert later["_reject"].tolist() == ["id_duplicate", ""]
    # As the pipeline hands it (Arrow): an integer id in a block with a null is the same id as in one without
    # (converted to numpy it would be 7.0 there, and key apart from 7).
    block = pa.table({"id": pa.array([7, 8], pa.int64()), "text": ["t", "t"], SOURCE_COLUMN: ["c.parquet"] * 2,
                      ROW_COLUMN: [0, 1]})  # fmt: skip
    assert validate_rows(block, cfg=cfg, registry=registry)["_reject"].to_pylist() == ["", ""]
    nulls = pa.table({"id": pa.array([None, 7], pa.int64()), "text": ["t", "t"], SOURCE_COLUMN: ["d.parquet"] * 2,
                      ROW_COLUMN: [0, 1]})  # fmt: skip
    assert validate_rows(nulls, cfg=cfg, registry=registry)["_reject"].to_pylist() == ["id_null", "id_duplicate"]


def test_duplicated_input_file_is_rejected_as_duplicates(ray_local, tiny_bert, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    rows = [{"id": i, "text": "the python list"} for i in range(5)]
    _write_jsonl(src / "a.jsonl", rows)
    _write_jsonl(src / "copy-of-a.jsonl", rows)
    out = tmp_path / "out"
    assert main(["embed", "--input", str(src), "--output", str(out), "--model", tiny_bert, "--max-length", "32"]) == 0
    assert sorted(_read_output(out).column("id").to_pylist()) == list(range(5))
    assert [r["reason"] for r in _read_rejects(out)] == ["id_duplicate"] * 5


def test_non_string_texts_are_rejected_not_crashing(ray_local, tiny_bert, tmp_path):
    """Texts of other types among strings are set aside row by row; a text column with no strings at all is refused
    before any work (tests/reliability/test_bad_input.py)."""
    src = tmp_path / "mixed.jsonl"
    rows = [{"id": "a", "text": 1}, {"id": "b", "text": "the list"}, {"id": "c", "text": None},
            {"id": "d", "text": "a file"}, {"id": "e", "text": ["a", "list"]}]  # fmt: skip
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    assert main(["embed", "--input", str(src), "--output", str(out), "--model", tiny_bert, "--max-length", "32"]) == 0
    assert sorted(_read_output(out).column("id").to_pylist()) == ["b", "d"]
    assert sorted((r["id"], r["reason"]) for r in _read_rejects(out)) == [
        ("a", "text_wrong_type"), ("c", "text_null"), ("e", "text_wrong_type")]  # fmt: skip
    c = json.loads((out / "_manifest.json").read_text())["counts"]
    assert (c["rows_in"], c["rows_out"], c["rows_rejected"]) == (5, 2, 3)


def test_block_size_splits_work_into_many_blocks(ray_local, tiny_bert, tmp_path):
    """Ray's default 128 MB blocks would hand this whole input to one replica as one task; block_mb splits it."""
    from ray.data import DataContext

    from pipelines.embed import EmbedJobConfig, build_dataset, plan, store_limit
    from pipelines.output import open_output
    from pipelines.progress import Tally

    (tmp_path / "in").mkdir()
    for f in range(2):
        ids = [f"{f}-{i}" for i in range(3000)]
        pq.write_table(pa.table({"id": ids, "text": ["the python list of data"] * 3000}), tmp_path / f"in/{f}.parquet")
    job = EmbedJobConfig(input=str(tmp_path / "in"), model=tiny_bert, max_length=32, block_mb=0.125, batch_size=1000)
    out = open_output(str(tmp_path / "out"), job.storage(), {}, overwrite=False)
    p = plan(job, gpus_in_cluster=0)
    driver_limit = DataContext.get_current().execution_options.resource_limits.object_store_memory
    ds = build_dataset(p, out, rows_in_file=100_000, tally=Tally())
    # the run's object store limit is on this dataset only: a later stage in the same driver keeps Ray's default
    assert ds.context.execution_options.resource_limits.object_store_memory == store_limit(p.embed, 100_000)
    assert DataContext.get_current().execution_options.resource_limits.object_store_memory == driver_limit
    sizes = [len(b["id"]) for b in ds.iter_batches(batch_size=None)]
    assert sum(sizes) == 6000 and len(sizes) >= 6
    # validation ran inside the read tasks: a batch size or a task pool of another size on it would undo the fusion
    assert "ReadProvenance->MapBatches(validate_rows)" in ds.stats()


def test_gpu_tokenizer_pool_autoscales_and_cpu_pool_is_fixed(ray_local, tiny_bert, tmp_path):
    """The plan's tokenizer limits reach Ray Data: on GPU an actor pool from one tokenizer per model replica up to
    ``TOKENIZERS_PER_GPU`` per GPU (one tokenizer thread feeds a tenth of what an H200 embeds with a small model),
    on CPU one fixed actor. Read from the built dataset's logical plan; nothing runs."""
    from pipelines.embed import TOKENIZERS_PER_GPU, EmbedJobConfig, build_dataset, plan
    from pipelines.output import open_output
    from pipelines.progress import Tally

    pq.write_table(pa.table({"id": ["a", "b"], "text": ["x y", "z"]}), tmp_path / "in.parquet")
    job = EmbedJobConfig(input=str(tmp_path / "in.parquet"), model=tiny_bert, max_length=32, device="cpu",
                         dedupe_ids=False)  # fmt: skip

    def tokenizer_pool(gpus: int) -> tuple:
        out = open_output(str(tmp_path / f"out{gpus}"), job.storage(), {}, overwrite=False)
        op = build_dataset(plan(job, gpus_in_cluster=gpus), out, rows_in_file=100_000, tally=Tally())._logical_plan.dag
        while "Tokenizer" not in op.name:
            op = op.input_dependencies[0]
        return op.compute.min_size, op.compute.max_size

    assert tokenizer_pool(2) == (2, 2 * TOKENIZERS_PER_GPU)
    assert tokenizer_pool(0) == (1, 1)


def test_local_ray_reuses_idle_task_workers(ray_local):
    """On a node whose CPUs are held by actors (a run's model replicas), Ray's default kills a task worker idle for
    1 s, and every read or write task then starts a Python worker; the local session keeps them a minute
    (``LOCAL_SYSTEM_CONFIG``). Without it this worker is gone within the 4 s."""
    import os
    import time

    import ray

    @ray.remote(num_cpus=1.5)
    class Replica:
        def ready(self) -> bool:
            return True

    @ray.remote(num_cpus=0.25)
    def worker_pid() -> int:
        return os.getpid()

    replica = Replica.remote()  # 0.5 of the 2 CPUs left free: fewer than the one idle worker
    try:
        assert ray.get(replica.ready.remote())
        pid = ray.get(worker_pid.remote())
        time.sleep(4)  # Ray's default threshold is 1 s, checked every 0.2 s
        os.kill(pid, 0)  # raises ProcessLookupError if the worker was killed
    finally:
        ray.kill(replica)


def test_local_ray_log_monitor_lists_files_at_the_slower_pace(ray_local):
    """The session's own log monitor (a process Ray spawned, not this one) runs with ``LOCAL_ENV``: the variable
    must reach it through the environment it inherits at start, or it lists the log folder every 0.1 s."""
    import psutil
    import ray

    from pipelines.runtime import LOCAL_ENV

    session = ray._private.worker.global_worker.node.get_session_dir_path()
    monitors = [p for p in psutil.process_iter(["cmdline"])
                if any(a.endswith("log_monitor.py") for a in p.info["cmdline"] or ())
                and f"--session-dir={session}" in p.info["cmdline"]]  # fmt: skip
    assert len(monitors) == 1, monitors
    env = monitors[0].environ()
    assert {k: env.get(k) for k in LOCAL_ENV} == LOCAL_ENV


def _slow(batch: dict) -> pa.Table:
    """A map step standing in for a model stage: 0.4 s a call, output rows tagged as ``input_rows`` counts them."""
    import time

    from operators.io import ROW_COLUMN, SOURCE_COLUMN

    time.sleep(0.4)
    return pa.table({"id": batch["id"], SOURCE_COLUMN: np.full(len(batch["id"]), "f", dtype=object),
                     ROW_COLUMN: batch["id"]})  # fmt: skip


class _Slow:
    """``_slow`` as a callable class (an actor stage)."""

    def __call__(self, batch: dict) -> pa.Table:
        return _slow(batch)


@pytest.mark.parametrize("where", ["counting step", "inside the actor", "inside the task"])
def test_rows_are_counted_as_blocks_arrive_not_when_the_sink_writes(ray_local, where):
    """The progress count (and the steady rate taken from it) follows blocks as they leave the stage before the
    sink: counted by a step of its own after the stage, or by the stage's own actor or task (``Tally.counted``). The
    sink's write is bundled up to a file of rows by Ray Data, so a count fused into it would count every row at the
    end: here all six blocks, produced over ~2.4 s, would be counted within a moment."""
    import ray
    from ray.data import ActorPoolStrategy, Datasink

    from pipelines.progress import Tally, track

    class OneFile(Datasink):
        @property
        def min_rows_per_write(self) -> int:
            return 10**6  # every block bundled into one write task

        def write(self, blocks, ctx) -> None:
            for _ in blocks:
                pass

    tally = Tally()
    ds = ray.data.range(600, override_num_blocks=6)
    if where == "inside the task":  # one task at a time, as the actor pool of one below
        ds = ds.map_batches(tally.counted(_slow), batch_size=None, num_cpus=0.25, concurrency=1)
    else:
        stage = tally.counted(_Slow) if where == "inside the actor" else _Slow
        ds = ds.map_batches(stage, batch_size=None, compute=ActorPoolStrategy(size=1), num_cpus=0.25)
    inside = where != "counting step"
    assert tally.inside == inside
    with track("count test", lambda: 600, tally) as tracker:
        if inside:
            counted = ds
            # the stage keeps its name in Ray's logs and dashboard
            assert ds._logical_plan.dag.name.endswith("_Slow)" if where == "inside the actor" else "_slow)")
        else:
            counted = tracker.wrap(ds, tasks=2)
            assert counted._logical_plan.dag.compute.size == 2  # at most two counting tasks at once
        counted.write_datasink(OneFile(), ray_remote_args={"num_cpus": 0.25})
        line = ray.get(tracker.counter.timeline.remote(tracker.key))
    assert line[-1][1] == 600
    assert line[-1][0] - line[0][0] > 1.0, line


def test_a_stage_that_yields_cannot_count_inside(ray_local):
    from pipelines.progress import Tally

    class Yields:
        def __call__(self, batch):
            yield batch

    def yields(batch):
        yield batch

    for udf in (Yields, yields):
        with pytest.raises(TypeError, match=f"{udf.__name__} yields batches"):
            Tally().counted(udf)
