"""``kalm embed``: read -> validate -> tokenize -> embed -> write (vectors + rejects) -> manifest.

Run it as ``kalm embed ...`` or ``python -m pipelines.embed ...`` (the form a Ray job's entrypoint uses).
"""

from __future__ import annotations

import logging
import math
import sys
from dataclasses import dataclass
from typing import Literal

from operators.embed import EmbedConfig, Embedder
from operators.io import InputError, InputFiles, check_columns, resolve_input
from operators.model import inspect_model, weights_sha256
from operators.sink import RowSink
from operators.tokenize import TokenizeConfig, Tokenizer, backend_json
from operators.validate import IdRegistry, ValidateConfig, id_shards_for, validate_rows
from pipelines import defaults
from pipelines.config import ConfigError, Replicas, StorageSettings, check_ranges, to_dict
from pipelines.faults import POOL_ACTOR
from pipelines.job import execute
from pipelines.output import Output, preload_registry
from pipelines.progress import Tally
from pipelines.runtime import cluster_cpu_nodes, replicas_for, replicas_per_node, suggest_cpu_bf16

logger = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class EmbedJobConfig(StorageSettings):
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
    attn_implementation: str = "auto"  # auto: flash_attention_2 on GPU where flash-attn is installed, else sdpa
    compile: bool = False  # torch.compile the model (GPU: fused kernels after a few minutes of compiling)
    bidirectional: bool = False
    device: str = "auto"  # auto: CUDA when the replica has a GPU; cpu forces CPU (e.g. logical GPUs in a test cluster)
    trust_remote_code: bool = False
    allow_pickle: bool = False
    num_gpus: float | None = None  # per replica; default: 1 when the cluster has GPUs, else 0 (CPU)
    replicas: Replicas = None  # model replicas; default: all GPUs / num_gpus, or one per CPU up to 4 a node (CPU)
    # Padded tokens / rows per forward pass. Defaults, from measurements (tests/gpu/h200-2026-11-29.json):
    # GPU 65536 / 2048 (H200, bf16: Qwen2-0.5B-shaped 231k tokens/s at 65536 vs 147k at 16384; lower it for a large
    # model on a small GPU); CPU 2048 / 64, where small batches stay in cache (all-MiniLM-L6-v2 on 2 cores: 67 rows/s
    # at 2048 tokens vs 58 at 16384).
    max_tokens: int | None = None
    max_rows: int | None = None
    batch_size: int | None = None  # rows per actor call, length-sorted within; default 8192 on GPU, 1024 on CPU
    # Logical CPUs per model replica; default 1 on GPU, 0.5 on CPU. A CPU replica holding a whole CPU (plus the
    # tokenizer's share) on a 2-core node leaves the read and write tasks too little and the job stalls. The
    # replica's torch threads are set separately (EmbedConfig.torch_threads).
    embed_num_cpus: float | None = None
    # A fixed pool of this many; default on GPU: one per model replica, autoscaled by Ray Data up to
    # ``tokenizers_for`` while they are the bottleneck; on CPU one in all (models take ~100 rows/s)
    tokenizer_replicas: int | None = None
    tokenizer_num_cpus: float = 0.25
    io_num_cpus: float = 0.25
    # Target block size in MB; default 8 on GPU, 0.5 on CPU (``block_mb_for``). Ray Data's default (128 MB) packs
    # ~250k texts in a block, and a block is the unit handed to one model replica: a corpus of a few blocks would
    # then keep most GPUs idle and nothing would stream.
    block_mb: float | None = None
    dedupe_ids: bool = True
    # Rows per output file; default: ~128 MB of vectors per file (e.g. 87k rows of 384 float32), so files are
    # neither tiny nor held in memory for long before they are written.
    rows_per_file: int | None = None
    overwrite: bool = False
    address: str | None = None

    def __post_init__(self):
        check_ranges(self)
        if self.text_kind not in ("document", "query"):
            raise ValueError(f"text_kind must be one of ['document', 'query'], got {self.text_kind!r}")
        self.storage()  # validates the storage settings

    def input_uri(self) -> str:
        return self.input or str(defaults.SAMPLE_CORPUS)

    def output_uri(self) -> str:
        return self.output or f"{defaults.DEFAULT_OUTPUT}/embed"


# The settings that change what is written: a rerun with the same ones resumes, other ones are refused. Resources,
# batch sizes and file sizes are left out, so a resumed run may use a different cluster.
OUTPUT_SETTINGS = (
    "format",
    "id_column",
    "text_column",
    "add_ids",
    "keep_columns",
    "text_kind",
    "task",
    "query_prompt",
    "document_prompt",
    "max_length",
    "pooling",
    "normalize",
    "dims",
    "dtype",
    "compute_dtype",
    "bidirectional",
    "dedupe_ids",
)


@dataclass(frozen=True)
class EmbedPlan:
    """The job config resolved into operator configs, all validated on the driver before Ray starts."""

    job: EmbedJobConfig
    input: InputFiles
    output: str
    validate: ValidateConfig
    tokenize: TokenizeConfig
    embed: EmbedConfig
    block_mb: float  # the job's, or the CPU / GPU default (``block_mb_for``)


def prompt_for(job: EmbedJobConfig) -> str | None:
    template = job.query_prompt if job.text_kind == "query" else job.document_prompt
    return template.replace("{task}", job.task) if template else None


def plan(job: EmbedJobConfig, *, gpus_in_cluster: float | None = None, cpu_nodes: tuple[float, ...] | None = None,
         inp: InputFiles | None = None) -> EmbedPlan:  # fmt: skip
    """Resolve defaults and check everything that can be checked without Ray: paths, columns, model, ranges.

    ``gpus_in_cluster``/``cpu_nodes``: the Ray cluster's GPUs and each node's CPUs, which size the model pool
    (``replicas_for``) and a CPU replica's torch threads (``replicas_per_node``).

    ``inp``: the input already resolved by an earlier plan of the same job, so files are not listed twice.
    """
    try:
        model = job.model or defaults.default_student()
        info = inspect_model(model, allow_pickle=job.allow_pickle, trust_remote_code=job.trust_remote_code,
                             storage=job.storage())  # fmt: skip
        inp = inp or resolve_input(job.input_uri(), job.format, job.storage())
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
        replicas = replicas_for(job.replicas, num_gpus, gpus_in_cluster, "--replicas", cpu_nodes, inp.total_bytes)
        batch_size = job.batch_size or (8192 if num_gpus > 0 else CPU_BATCH_ROWS)
        max_length = job.max_length or info.st_max_seq_length or min(512, info.max_positions or 512)
        tokenize = TokenizeConfig(
            model=info,
            text_column=job.text_column,
            prompt=prompt_for(job),
            max_length=max_length,
            **tokenizers_for(job.tokenizer_replicas, replicas, num_gpus),
            num_cpus=job.tokenizer_num_cpus,
            batch_size=batch_size,
            keep_text=job.text_column in job.keep_columns,
            tokenizer_json=backend_json(info.local_path(), job.trust_remote_code),
            trust_remote_code=job.trust_remote_code,
        )
        embed = EmbedConfig(
            model=info,
            pooling=job.pooling or info.st_pooling or "mean",
            normalize=job.normalize,
            dims=job.dims,
            output_dtype=job.dtype,
            compute_dtype=job.compute_dtype,
            attn_implementation=job.attn_implementation,
            compile=job.compile,
            bidirectional=job.bidirectional,
            device=job.device,
            trust_remote_code=job.trust_remote_code,
            **forward_limits(num_gpus, job.max_tokens, job.max_rows),
            batch_size=batch_size,
            replicas=replicas,
            replicas_per_node=replicas_per_node(replicas, cpu_nodes),
            num_gpus=num_gpus,
            num_cpus=job.embed_num_cpus if job.embed_num_cpus is not None else (1.0 if num_gpus > 0 else 0.5),
        )
        validate = ValidateConfig(id_column=job.id_column, text_column=job.text_column, dedupe_ids=job.dedupe_ids,
                                  id_shards=id_shards_for(inp.total_bytes))  # fmt: skip
    except (InputError, FileNotFoundError, ValueError) as e:
        raise ConfigError(str(e)) from e
    return EmbedPlan(job, inp, job.output_uri(), validate, tokenize, embed, block_mb_for(job.block_mb, num_gpus))


TARGET_FILE_BYTES = 128 * 2**20
# Rows per model call on CPU: a call is the unit one replica takes, ~20 s of one core for all-MiniLM-L6-v2, so
# several replicas share a small input evenly and the last call leaves the others idle briefly; 1,024 length-sorted
# rows still pack into forward batches of near-equal lengths.
CPU_BATCH_ROWS = 1024
# Target block size on GPU and on CPU, in MB. Ray Data fills blocks up to the target at every stage (it merges a
# map's output batches, it never splits a block to a later map's batch_size), so a model task is a block. On GPU
# 8 MB (~20k short texts, a few calls) keeps the queues full at little per-block cost. On CPU a call of 1,024 rows
# takes ~20 s of one core: an 8 MB block would be ~20 calls, minutes of one replica, and the last such task leaves
# the others idle that long; a 0.5 MB block is about one call of short texts (~360 bytes a row once tokenised),
# and blocks of longer texts are bundled up to a call's rows.
GPU_BLOCK_MB = 8.0
CPU_BLOCK_MB = 0.5


def block_mb_for(block_mb: float | None, num_gpus: float) -> float:
    return block_mb or (GPU_BLOCK_MB if num_gpus > 0 else CPU_BLOCK_MB)


# Tokenizer actors a GPU may need, at most. One actor runs one Rust thread (its logical CPUs, at least one):
# 6.7k rows/s of the bundled corpus on an H200 machine's host (10.1k at 2 threads, 21.1k at 4;
# tests/gpu/tokenizer_rate.py), while one H200 embeds 71k rows/s of it with all-MiniLM-L6-v2 and 6.5k with a
# compiled 0.5B model (tests/gpu/h200-2026-12-04.json). A small model thus needs ~11 actors per GPU, a 0.5B one 1.
TOKENIZERS_PER_GPU = 12


def tokenizers_for(fixed: int | None, replicas: int, num_gpus: float) -> dict[str, int | None]:
    """Tokenizer pool size: ``fixed`` when given; on CPU one; on GPU one per model replica to start with, and Ray
    Data's autoscaler adds actors, up to ``TOKENIZERS_PER_GPU`` per GPU, while the tokenizers hold the models back
    (their input queue backs up), within the CPU budget it gives the stage."""
    if fixed:
        return {"replicas": fixed, "max_replicas": None}
    if num_gpus <= 0:
        return {"replicas": 1, "max_replicas": None}
    return {"replicas": replicas, "max_replicas": max(replicas, math.ceil(replicas * num_gpus * TOKENIZERS_PER_GPU))}


def forward_limits(num_gpus: float, max_tokens: int | None, max_rows: int | None) -> dict[str, int]:
    """Padded tokens and rows per forward pass, where not given: 65,536 / 2,048 on GPU (the H200 sweep),
    2,048 / 64 on CPU. Shared by every model stage (embedder, teacher)."""
    return {"max_tokens": max_tokens or (65536 if num_gpus > 0 else 2048),
            "max_rows": max_rows or (2048 if num_gpus > 0 else 64)}  # fmt: skip


# A write task holds its file's rows (in the object store) until the file is written, so this also bounds what a
# write buffers: small vectors would otherwise make 700k-row files (32-d) and buffers that grow with the corpus
# up to that size.
MAX_ROWS_PER_FILE = 100_000


def rows_per_file(embed: EmbedConfig) -> int:
    """Rows that make ~TARGET_FILE_BYTES of vectors (before compression, which does little on float vectors), and at
    most MAX_ROWS_PER_FILE."""
    return max(1000, min(MAX_ROWS_PER_FILE, TARGET_FILE_BYTES // row_bytes(embed)))


def row_bytes(embed: EmbedConfig) -> int:
    """An output row's bytes: its vectors, plus the id and Parquet overhead."""
    width = 2 if embed.output_dtype == "float16" else 4
    return width * sum(embed.dims or (embed.model.hidden_size,)) + 64


# Object store bytes a run's stages may hold at once (Ray Data's execution limit), per model replica. On CPU the
# model is ~40x slower than reading and tokenising, so with Ray Data's default limit (half the object store, 3.5 GB
# on a 24 GB node) the reads race ahead and park the tokenised input in the store: a 1M-row run on 2 cores parked
# all of it, and every process that had touched those pages carried them (338 MB of the store, against 40 MB at
# 100k rows). At 128 MB a replica it peaked at 227 MB and ran as fast (290 s against 280 s; issue 9 note). GPU
# replicas take 8 MB blocks many times a second and keep a queue of them.
STORE_MB_PER_CPU_REPLICA = 128
STORE_MB_PER_GPU_REPLICA = 1024
# Output files' worth of rows the limit always leaves room for: a write task waits for a file of rows in the
# store, and Ray Data splits the limit between the stages (~a seventh each here), so a limit near one file kept a
# tiny-model run waiting on its writes (9x slower with a limit under one file).
STORE_FILES = 8


def store_limit(embed: EmbedConfig, rows_in_file: int) -> int:
    """Bytes of the object store the run's Ray Data stages may hold: ``STORE_MB_PER_*_REPLICA`` per model replica,
    at least ``STORE_FILES`` output files. Ray Data takes the lower of this and its own default."""
    per_replica = STORE_MB_PER_GPU_REPLICA if embed.num_gpus > 0 else STORE_MB_PER_CPU_REPLICA
    return max(embed.replicas * per_replica * 2**20, STORE_FILES * rows_in_file * row_bytes(embed))


def fingerprint(p: EmbedPlan, weights_hash: str) -> dict:
    settings = to_dict(p.job)
    out = {k: settings[k] for k in OUTPUT_SETTINGS}
    out.update(input=p.job.input_uri(), model_weights_sha256=weights_hash)
    return out


def build_dataset(p: EmbedPlan, out: Output, rows_in_file: int, tally: Tally):
    """The streaming plan: read -> validate -> tokenize (CPU actors) -> embed (model actors); None if all is done.

    ``out``: what earlier attempts committed; their rows are not read again. ``rows_in_file``: the sink's rows per
    output file (the object store limit leaves room for several, ``store_limit``). ``tally``: the model actors
    count the rows they embed there (``progress.Tally``).
    """
    import ray
    from ray.data import ActorPoolStrategy, DataContext, TaskPoolStrategy

    job, inp = p.job, p.input
    DataContext.get_current().target_max_block_size = int(p.block_mb * 2**20)
    columns = list(dict.fromkeys(([] if job.add_ids else [job.id_column]) + [job.text_column, *job.keep_columns]))
    # Two read tasks per model replica keep its tokenizer fed (one streams thousands of rows/s) while bounding the
    # memory that reads hold (operators.io.read_input): memory then follows the cluster, not the number of files.
    reads = 2 * p.embed.replicas
    ds = out.read(inp, columns=columns, num_cpus=job.io_num_cpus, add_ids=job.add_ids, id_column=job.id_column,
                  concurrency=reads)  # fmt: skip
    if ds is None:
        return None
    registry = None
    if p.validate.dedupe_ids:
        shard = ray.remote(num_cpus=0)(IdRegistry)
        registry = [shard.remote() for _ in range(p.validate.id_shards)]
        preload_registry(out, registry, id_column=job.id_column, num_cpus=job.io_num_cpus)
    # Validation runs in the read tasks (Ray Data fuses the two): a block at a time (batch_size=None; Ray Data does
    # not fuse a read with a map that asks for a batch size) and a task pool of the read's size (a pool of another
    # size is not fused either). Unfused, every block made one more trip through the object store and one more
    # task, and the driver's scheduling loop had one more operator to walk ten times a second (issue 9 note).
    ds = ds.map_batches(
        validate_rows,
        fn_kwargs={"cfg": p.validate, "registry": registry},
        batch_size=None,
        batch_format="pyarrow",  # the columns it does not check pass through as they were read
        num_cpus=job.io_num_cpus,
        compute=TaskPoolStrategy(size=reads),
        udf_modifying_row_count=False,
    )
    # Tokenizer and Embedder take and return Arrow tables: token ids and vectors cross as flat buffers
    # (operators/tokenize.py says what that saves).
    ds = ds.map_batches(
        Tokenizer,
        fn_constructor_kwargs={"cfg": p.tokenize},
        batch_size=p.tokenize.batch_size,
        batch_format="pyarrow",
        compute=ActorPoolStrategy(
            min_size=p.tokenize.replicas, max_size=p.tokenize.max_replicas or p.tokenize.replicas
        ),  # fmt: skip
        num_cpus=p.tokenize.num_cpus,
        udf_modifying_row_count=False,
        **POOL_ACTOR,
    )
    ds = ds.map_batches(
        tally.counted(Embedder),
        fn_constructor_kwargs={"cfg": p.embed},
        batch_size=p.embed.batch_size,
        batch_format="pyarrow",
        # On CPU a call takes seconds: one queued call per replica, so a replica that starts late, or finishes
        # early, gets the next call instead of the first-started one holding a queue of four (Ray Data's default
        # queues calls on the replicas alive at the time). On GPU calls are short and the queue keeps it fed.
        # Two per CPU replica was tried: the gaps between a replica's calls fell from 0.04-0.33 s to 0.01-0.11 s
        # (~0.7% of its time), but the bundled corpus's run took 54 s instead of 36-38 s, one replica holding
        # the last calls while the other sat idle (issue 9 note).
        compute=ActorPoolStrategy(
            size=p.embed.replicas, max_tasks_in_flight_per_actor=None if p.embed.num_gpus else 1
        ),  # fmt: skip
        num_gpus=p.embed.num_gpus or None,
        num_cpus=p.embed.num_cpus,
        udf_modifying_row_count=False,
        **POOL_ACTOR,
    )
    # On this dataset's own context (a copy Ray Data made at the read), not the driver's: a later stage in the same
    # driver (kalm mine's search, kalm score) keeps Ray Data's default.
    options = ds.context.execution_options
    options.resource_limits = options.resource_limits.copy(object_store_memory=store_limit(p.embed, rows_in_file))
    return ds


def run(job: EmbedJobConfig) -> dict:
    """Run the job, or resume it where an earlier attempt stopped; returns the manifest (also written to
    ``{output}/_manifest.json``), whose counts cover every attempt."""
    p = plan(job)  # first pass: everything that needs no cluster, so bad input fails before Ray starts
    weights_hash = weights_sha256(p.embed.model)
    keep = tuple(c for c in job.keep_columns if c != job.id_column)
    resolved = {}

    def build(out, gpus, tally):
        q = plan(job, gpus_in_cluster=gpus, cpu_nodes=cluster_cpu_nodes(), inp=p.input)
        resolved["plan"] = q
        suggest_cpu_bf16(job.compute_dtype, q.embed.num_gpus)
        rows_in_file = job.rows_per_file or rows_per_file(q.embed)
        sink = RowSink(
            out.root,
            columns=(job.id_column, *q.embed.columns, *keep),
            vector_columns=q.embed.columns,
            id_column=job.id_column,
            reject_columns=keep,
            rows_per_file=rows_in_file,
            filesystem=out.fs,
            attempt=out.attempt,
        )
        return build_dataset(q, out, rows_in_file, tally), sink

    def describe() -> dict:
        q = resolved["plan"]
        return {
            "columns": {"id": job.id_column, "vectors": list(q.embed.columns), "kept": list(keep)},
            "model": {
                "name": q.embed.model.name,
                "path": q.embed.model.path,
                "weights_sha256": weights_hash,
                "hidden_size": q.embed.model.hidden_size,
            },
            "resolved": {
                "input": job.input_uri(),
                "input_format": q.input.format,
                "input_files": len(q.input.files),
                "output": q.output,
                "max_length": q.tokenize.max_length,
                "prompt": q.tokenize.prompt,
                "pooling": q.embed.pooling,
                "num_gpus": q.embed.num_gpus,
                "replicas": q.embed.replicas,
                "max_tokens": q.embed.max_tokens,
                "block_mb": q.block_mb,
            },
        }

    return execute(
        "embed",
        inp=p.input,
        output=p.output,
        storage=job.storage(),
        fingerprint=fingerprint(p, weights_hash),
        overwrite=job.overwrite,
        address=job.address,
        io_num_cpus=job.io_num_cpus,
        build=build,
        describe=describe,
        config=to_dict(job),
    )


if __name__ == "__main__":
    from pipelines.cli import main

    sys.exit(main(["embed", *sys.argv[1:]]))
