"""``kalm embed``: read -> validate -> tokenize -> embed -> write (vectors + rejects) -> manifest.

Run it as ``kalm embed ...`` or ``python -m pipelines.embed ...`` (the form a Ray job's entrypoint uses).
"""

from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import sys
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Literal

from operators.embed import EmbedConfig, Embedder
from operators.io import (
    SOURCE_COLUMN,
    InputError,
    InputFiles,
    check_columns,
    has_source_column,
    read_input,
    resolve_input,
)
from operators.model import inspect_model, weights_sha256
from operators.sink import EmbeddingSink
from operators.tokenize import TokenizeConfig, Tokenizer
from operators.validate import IdRegistry, ValidateConfig, validate_rows
from pipelines import defaults
from pipelines.config import ConfigError, to_dict
from pipelines.runtime import cluster_gpus, ray_session

logger = logging.getLogger(__name__)

MANIFEST = "_manifest.json"
PACKAGES = ("kalm-pipeline", "ray", "torch", "transformers", "tokenizers", "pyarrow", "numpy")


@dataclass(frozen=True, kw_only=True)
class EmbedJobConfig:
    """Everything ``kalm embed`` does, as one flat, YAML-friendly record. None means 'the embedded default'."""

    input: str | None = None  # file, folder, glob or save_to_disk folder; default: the bundled corpus
    output: str | None = None  # default: kalm-out/embed
    format: str | None = None  # parquet|jsonl|csv|hf; default: from the file names
    model: str | None = None  # local model folder; default: the bundled all-MiniLM-L6-v2
    id_column: str = "id"
    text_column: str = "text"
    add_ids: bool = False
    keep_columns: tuple[str, ...] = ()
    text_kind: Literal["document", "query"] = "document"
    task: str = defaults.DEFAULT_TASK
    query_prompt: str = defaults.KALM_QUERY_PROMPT
    document_prompt: str = ""  # asymmetric retrieval: documents unprompted (KaLM)
    max_length: int | None = None  # default: the model's sentence-transformers max_seq_length, else 512
    pooling: str | None = None  # mean|cls|last; default: the model's sentence-transformers pooling, else mean
    normalize: bool = True
    dims: tuple[int, ...] = ()
    dtype: str = "float32"  # of the stored vectors
    compute_dtype: str = "auto"
    bidirectional: bool = False
    device: str = "auto"  # auto: CUDA when the replica has a GPU; cpu forces CPU (e.g. logical GPUs in a test cluster)
    trust_remote_code: bool = False
    allow_pickle: bool = False
    num_gpus: float | None = None  # per replica; default: 1 when the cluster has GPUs, else 0 (CPU)
    replicas: int | None = None  # model replicas; default: all GPUs / num_gpus, or 1 on CPU
    # Padded tokens / rows per forward pass. Defaults, from measurements (tests/gpu/h200-2026-11-29.json):
    # GPU 65536 / 2048 (H200, bf16: Qwen2-0.5B-shaped 231k tokens/s at 65536 vs 147k at 16384; lower it for a large
    # model on a small GPU); CPU 2048 / 64, where small batches stay in cache (all-MiniLM-L6-v2 on 2 cores: 67 rows/s
    # at 2048 tokens vs 58 at 16384).
    max_tokens: int | None = None
    max_rows: int | None = None
    batch_size: int | None = None  # rows per actor call, length-sorted within; default 8192 on GPU, 4096 on CPU
    # Logical CPUs per model replica; default 1 on GPU, 0.5 on CPU. Ray Data's file listing and read tasks ask for
    # a whole CPU each: a CPU replica holding a full one (plus the tokenizer's share) on a 2-core node starves them
    # and the job hangs. The replica's torch threads are set separately (EmbedConfig.torch_threads).
    embed_num_cpus: float | None = None
    tokenizer_replicas: int | None = None  # default: one per model replica (one tokenizer feeds ~29k rows/s)
    tokenizer_num_cpus: float = 0.25
    io_num_cpus: float = 0.25
    # Target block size in MB. Ray Data's default (128 MB) packs ~250k texts in a block, and a block is the unit
    # handed to one model replica: a corpus of a few blocks would then keep most GPUs idle and nothing would stream.
    block_mb: float = 8.0
    dedupe_ids: bool = True
    # Rows per output file; default: ~128 MB of vectors per file (e.g. 87k rows of 384 float32), so files are
    # neither tiny nor held in memory for long before they are written.
    rows_per_file: int | None = None
    overwrite: bool = False
    address: str | None = None

    def __post_init__(self):
        if self.text_kind not in ("document", "query"):
            raise ValueError(f"text_kind must be one of ['document', 'query'], got {self.text_kind!r}")
        if self.rows_per_file is not None and self.rows_per_file < 1:
            raise ValueError(f"rows_per_file must be >= 1, got {self.rows_per_file}")
        if self.block_mb <= 0:
            raise ValueError(f"block_mb must be > 0, got {self.block_mb}")
        if self.io_num_cpus <= 0:
            raise ValueError(f"io_num_cpus must be > 0, got {self.io_num_cpus}")


@dataclass(frozen=True)
class EmbedPlan:
    """The job config resolved into operator configs, all validated on the driver before Ray starts."""

    job: EmbedJobConfig
    input: InputFiles
    output: str
    validate: ValidateConfig
    tokenize: TokenizeConfig
    embed: EmbedConfig


def prompt_for(job: EmbedJobConfig) -> str | None:
    template = job.query_prompt if job.text_kind == "query" else job.document_prompt
    return template.replace("{task}", job.task) if template else None


def plan(job: EmbedJobConfig, *, gpus_in_cluster: float | None = None, inp: InputFiles | None = None) -> EmbedPlan:
    """Resolve defaults and check everything that can be checked without Ray: paths, columns, model, ranges.

    ``inp``: the input already resolved by an earlier plan of the same job, so files are not listed twice.
    """
    try:
        info = inspect_model(job.model or defaults.default_student(), allow_pickle=job.allow_pickle)
        inp = inp or resolve_input(job.input or str(defaults.SAMPLE_CORPUS), job.format)
        check_columns(
            inp,
            id_column=job.id_column,
            text_column=job.text_column,
            keep_columns=job.keep_columns,
            add_ids=job.add_ids,
        )
        num_gpus = job.num_gpus
        if num_gpus is None:
            num_gpus = 1.0 if (gpus_in_cluster or 0) > 0 else 0.0
        replicas = job.replicas
        if num_gpus > 0 and gpus_in_cluster == 0 and replicas is None:
            # Ray would wait forever for a GPU actor. An autoscaling cluster that adds GPU nodes on demand is the
            # one case to wait, and the user says so by fixing the replica count.
            raise ValueError(
                f"num_gpus={num_gpus} per replica, but the Ray cluster has no GPUs; use --num-gpus 0 to run on "
                "CPU, or set --replicas if GPU nodes will be added by the autoscaler"
            )
        if replicas is None:
            replicas = max(1, int((gpus_in_cluster or 0) // num_gpus)) if num_gpus > 0 else 1
        batch_size = job.batch_size or (8192 if num_gpus > 0 else 4096)
        max_length = job.max_length or info.st_max_seq_length or min(512, info.max_positions or 512)
        tokenize = TokenizeConfig(
            model=info,
            text_column=job.text_column,
            prompt=prompt_for(job),
            max_length=max_length,
            replicas=job.tokenizer_replicas or replicas,
            num_cpus=job.tokenizer_num_cpus,
            batch_size=batch_size,
            keep_text=job.text_column in job.keep_columns,
        )
        embed = EmbedConfig(
            model=info,
            pooling=job.pooling or info.st_pooling or "mean",
            normalize=job.normalize,
            dims=job.dims,
            output_dtype=job.dtype,
            compute_dtype=job.compute_dtype,
            bidirectional=job.bidirectional,
            device=job.device,
            trust_remote_code=job.trust_remote_code,
            max_tokens=job.max_tokens or (65536 if num_gpus > 0 else 2048),
            max_rows=job.max_rows or (2048 if num_gpus > 0 else 64),
            batch_size=batch_size,
            replicas=replicas,
            num_gpus=num_gpus,
            num_cpus=job.embed_num_cpus if job.embed_num_cpus is not None else (1.0 if num_gpus > 0 else 0.5),
        )
        validate = ValidateConfig(
            id_column=job.id_column,
            text_column=job.text_column,
            dedupe_ids=job.dedupe_ids,
            source_column=SOURCE_COLUMN if has_source_column(inp, job.add_ids) else None,
        )
    except (InputError, FileNotFoundError, ValueError) as e:
        raise ConfigError(str(e)) from e
    return EmbedPlan(job, inp, job.output or f"{defaults.DEFAULT_OUTPUT}/embed", validate, tokenize, embed)


TARGET_FILE_BYTES = 128 * 2**20


def rows_per_file(embed: EmbedConfig) -> int:
    """Rows that make ~TARGET_FILE_BYTES of vectors (before compression, which does little on float vectors)."""
    width = 2 if embed.output_dtype == "float16" else 4
    row_bytes = width * sum(embed.dims or (embed.model.hidden_size,)) + 64  # + id and Parquet overhead
    return max(1000, TARGET_FILE_BYTES // row_bytes)


def prepare_output(path: str, overwrite: bool) -> None:
    p = Path(path)
    if p.exists() and any(p.iterdir()):
        if not overwrite:
            raise ConfigError(f"output {path!r} already exists and is not empty; pass --overwrite to replace it")
        shutil.rmtree(p)
    p.mkdir(parents=True, exist_ok=True)


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in PACKAGES:
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


def build_dataset(p: EmbedPlan):
    """The streaming plan: read -> validate -> tokenize (CPU actors) -> embed (model actors)."""
    import ray
    from ray.data import ActorPoolStrategy, DataContext

    job, inp = p.job, p.input
    DataContext.get_current().target_max_block_size = int(job.block_mb * 2**20)
    registry = None
    if p.validate.dedupe_ids:
        shard = ray.remote(num_cpus=0)(IdRegistry)
        registry = [shard.remote() for _ in range(p.validate.id_shards)]
    columns = None
    if not job.add_ids:
        columns = list(dict.fromkeys([job.id_column, job.text_column, *job.keep_columns]))
    ds = read_input(inp, add_ids=job.add_ids, id_column=job.id_column, columns=columns, num_cpus=job.io_num_cpus)
    ds = ds.map_batches(
        validate_rows,
        fn_kwargs={"cfg": p.validate, "registry": registry},
        batch_size=p.tokenize.batch_size,
        num_cpus=job.io_num_cpus,
        udf_modifying_row_count=False,
    )
    ds = ds.map_batches(
        Tokenizer,
        fn_constructor_kwargs={"cfg": p.tokenize},
        batch_size=p.tokenize.batch_size,
        compute=ActorPoolStrategy(size=p.tokenize.replicas),
        num_cpus=p.tokenize.num_cpus,
        udf_modifying_row_count=False,
    )
    ds = ds.map_batches(
        Embedder,
        fn_constructor_kwargs={"cfg": p.embed},
        batch_size=p.embed.batch_size,
        compute=ActorPoolStrategy(size=p.embed.replicas),
        num_gpus=p.embed.num_gpus or None,
        num_cpus=p.embed.num_cpus,
        udf_modifying_row_count=False,
    )
    return ds, registry


def run(job: EmbedJobConfig) -> dict:
    """Run the job; returns the manifest (also written to ``{output}/_manifest.json``)."""
    t_start = time.perf_counter()
    p = plan(job)  # first pass: everything that needs no cluster, so bad input fails before Ray starts
    prepare_output(p.output, job.overwrite)
    weights_hash = weights_sha256(p.embed.model)
    with ray_session(job.address) as ray_start_s:
        p = plan(job, gpus_in_cluster=cluster_gpus(), inp=p.input)
        keep = tuple(c for c in job.keep_columns if c != job.id_column)
        sink = EmbeddingSink(
            str(Path(p.output).resolve()),
            id_column=job.id_column,
            vector_columns=p.embed.columns,
            keep_columns=keep,
            rows_per_file=job.rows_per_file or rows_per_file(p.embed),
        )
        ds, _registry = build_dataset(p)
        t_pipe = time.perf_counter()
        ds.write_datasink(sink, ray_remote_args={"num_cpus": job.io_num_cpus})
        pipeline_s = time.perf_counter() - t_pipe
    stats = sink.stats.as_dict()
    manifest = {
        "command": "embed",
        "counts": {k: v for k, v in stats.items() if k != "files"},
        "files": [os.path.relpath(f, Path(p.output).resolve()) for f in stats["files"]],
        "columns": {"id": job.id_column, "vectors": list(p.embed.columns), "kept": list(keep)},
        "model": {
            "name": p.embed.model.name,
            "path": p.embed.model.path,
            "weights_sha256": weights_hash,
            "hidden_size": p.embed.model.hidden_size,
        },
        "config": to_dict(job),
        "resolved": {
            "input": job.input or str(defaults.SAMPLE_CORPUS),
            "input_format": p.input.format,
            "input_files": len(p.input.files),
            "output": p.output,
            "max_length": p.tokenize.max_length,
            "prompt": p.tokenize.prompt,
            "pooling": p.embed.pooling,
            "num_gpus": p.embed.num_gpus,
            "replicas": p.embed.replicas,
            "max_tokens": p.embed.max_tokens,
        },
        "versions": versions(),
        "timings_s": {
            "ray_start": round(ray_start_s, 3),
            "pipeline": round(pipeline_s, 3),
            "total": round(time.perf_counter() - t_start, 3),
            "rows_per_s": round(stats["rows_in"] / pipeline_s, 2) if pipeline_s > 0 else None,
        },
    }
    c = manifest["counts"]
    if c["rows_in"] != c["rows_out"] + c["rows_rejected"]:  # the sink sees every row; this cannot differ
        raise RuntimeError(f"row counts do not add up: {c}")
    Path(p.output, MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=False))
    return manifest


if __name__ == "__main__":
    from pipelines.cli import main

    sys.exit(main(["embed", *sys.argv[1:]]))
