"""What every ``kalm`` pipeline does around its own stages: claim the output (fresh, resume or refuse), run the
Ray Dataset into its sink, check exactly-once, and write the manifest. Each pipeline supplies ``build``."""

from __future__ import annotations

import logging
import platform
import posixpath
import time
from collections.abc import Callable
from importlib import metadata

from operators import ledger
from operators.io import InputFiles
from operators.sink import RowSink
from operators.storage import StorageConfig
from pipelines.output import open_output
from pipelines.progress import Tally, count_tasks, parquet_rows, track
from pipelines.runtime import cluster_cpu_nodes, cluster_gpus, ray_session

logger = logging.getLogger(__name__)

PACKAGES = ("kalm-pipeline", "ray", "torch", "transformers", "tokenizers", "pyarrow", "numpy")


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in PACKAGES:
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


def execute(
    command: str,
    *,
    inp: InputFiles,
    output: str,
    storage: StorageConfig,
    fingerprint: dict,
    overwrite: bool,
    address: str | None,
    io_num_cpus: float,
    build: Callable,
    describe: Callable[[], dict],
    config: dict,
) -> dict:
    """Run one attempt and return the manifest (also written to ``{output}/_manifest.json``).

    ``build(out, gpus_in_cluster, tally) -> (dataset or None, RowSink)`` is called inside the Ray session: a dataset
    counts its rows in its last step before the sink, task or actor (``tally.counted``); one built without that gets
    a counting step after it. ``describe()`` adds the pipeline's own manifest sections after the run.
    """
    t_start = time.perf_counter()
    out = open_output(output, storage, fingerprint, overwrite=overwrite)
    with ray_session(address) as ray_start_s:
        tally = Tally()
        ds, sink = build(out, cluster_gpus(), tally)
        assert isinstance(sink, RowSink)
        t_pipe = time.perf_counter()
        steady = None
        if ds is not None:
            todo = [f for f in inp.files if inp.source(f) not in out.state.complete()]
            partly_done = sum(b - a for ranges in out.state.partial().values() for a, b in ranges)

            def remaining() -> int | None:
                total = parquet_rows(inp, todo)
                return None if total is None else total - partly_done

            with track(f"{command} ({posixpath.basename(output.rstrip('/'))})", remaining, tally) as tracker:
                if not tally.inside:
                    ds = tracker.wrap(ds, count_tasks(sum(cluster_cpu_nodes())))
                ds.write_datasink(sink, ray_remote_args={"num_cpus": io_num_cpus})
            steady = tracker.steady_rows_per_s
        else:
            logger.info("every input row of %s is already committed; nothing to do", output)
        pipeline_s = time.perf_counter() - t_pipe
    state = out.finish([inp.source(f) for f in inp.files])
    this_run = sink.stats.as_dict()
    manifest = {
        "command": command,
        "counts": state.counts(),
        "files": sorted(f for f in state.files() if not f.startswith(ledger.REJECTS_DIR)),
        **describe(),
        "config": config,
        "attempt": {
            "number": out.attempt,
            "rows_already_committed": out.state.rows(),
            "input_files_skipped": len(out.state.complete()),
            "rows_processed": this_run["rows_in"],
            "orphans_removed": out.removed,
        },
        "versions": versions(),
        "timings_s": {
            "ray_start": round(ray_start_s, 3),
            "pipeline": round(pipeline_s, 3),
            "total": round(time.perf_counter() - t_start, 3),
            "rows_per_s": round(this_run["rows_in"] / pipeline_s, 2) if pipeline_s > 0 else None,
            # Rows/s in the middle of the run, start-up and drain left out (``progress.steady_rate``): the figure
            # that scales to a larger input, where rows_per_s is diluted by fixed costs on a small one.
            "steady_rows_per_s": None if steady is None else round(steady, 2),
        },
    }
    out.write_manifest(manifest)
    return manifest


def stage_row(name: str, manifest: dict, *, reused: bool = False) -> dict:
    """One line of a run's stage table from a stage's manifest: rows in/out/rejected over all attempts, rows this
    run processed (0 when a rerun found them committed, or the output was reused), seconds and rows/s."""
    c, t, a = manifest["counts"], manifest["timings_s"], manifest["attempt"]
    return {"stage": name, "rows_in": c["rows_in"], "rows_out": c["rows_out"], "rows_rejected": c["rows_rejected"],
            "rows_this_run": 0 if reused else a["rows_processed"], "seconds": 0.0 if reused else t["pipeline"],
            "rows_per_s": None if reused else t["rows_per_s"]}  # fmt: skip
