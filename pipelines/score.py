"""``kalm score``: teacher soft labels for training rows: read -> validate -> TeacherScorer -> write -> manifest.

Rows in the KaLM/FlagEmbedding form ``{query, pos: [..], neg: [..], prompt?}`` come back with ``pos_scores`` and
``neg_scores`` aligned with ``pos`` and ``neg`` (and ``teacher_probs`` with ``--temperature``), as JSONL (what
FlagEmbedding's trainers read) or Parquet. Same storage, exactly-once and resume behaviour as ``kalm embed``.
Run it as ``kalm score ...`` or ``python -m pipelines.score ...``.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Literal

from operators.io import InputError, InputFiles, resolve_input
from operators.lookup import IdColumns, build_store, resolve_texts
from operators.model import inspect_model, weights_sha256
from operators.sink import RowSink
from operators.teacher import TeacherConfig, TeacherScorer
from operators.validate import TrainingRowsConfig, validate_training_table
from pipelines import defaults
from pipelines.config import ConfigError, Replicas, StorageSettings, check_ranges, to_dict
from pipelines.embed import block_mb_for, forward_limits
from pipelines.faults import POOL_ACTOR
from pipelines.job import execute
from pipelines.progress import Tally
from pipelines.runtime import cluster_cpu_nodes, replicas_for, replicas_per_node, suggest_cpu_bf16


@dataclass(frozen=True, kw_only=True)
class ScoreJobConfig(StorageSettings):
    input: str | None = None  # JSONL/Parquet training rows; default: the bundled sample as {query, pos, neg}
    # ID-keyed input (what mining writes): rows of query_id, pos_ids, neg_ids, with texts from these two tables.
    queries: str | None = None  # table of query_id_column, query_column
    corpus: str | None = None  # table of corpus_id_column, corpus_text_column
    query_id_column: str = "query_id"
    pos_ids_column: str = "pos_ids"
    neg_ids_column: str = "neg_ids"
    corpus_id_column: str = "id"
    corpus_text_column: str = "text"
    # actors holding the id -> text maps (see operators.lookup for the memory cost); default: one per GB of table
    text_store_shards: int | None = None
    output: str | None = None  # default: kalm-out/score
    format: str | None = None  # input format; default from file names
    output_format: Literal["jsonl", "parquet"] = "jsonl"
    teacher: str | None = None  # local model folder; default: the bundled all-mpnet-base-v2
    teacher_kind: Literal["bi-encoder", "cross-encoder"] = "bi-encoder"
    query_column: str = "query"
    pos_column: str = "pos"
    neg_column: str = "neg"
    prompt_column: str = "prompt"
    task: str = defaults.DEFAULT_TASK
    # Bi-encoder query template; None: KaLM's, except for the bundled teacher, which was trained without one.
    query_prompt: str | None = None
    document_prompt: str = ""
    pair_template: str | None = None  # cross-encoder; None: the tokenizer's own (query, document) pair encoding
    max_length: int | None = None  # default: the teacher's sentence-transformers max_seq_length, else 512
    pooling: str | None = None  # bi-encoder; default: the teacher's sentence-transformers pooling, else mean
    activation: Literal["none", "sigmoid"] = "none"
    temperature: float | None = None  # adds teacher_probs = softmax([pos_scores, neg_scores] / temperature)
    compute_dtype: str = "auto"
    bidirectional: bool = False
    device: str = "auto"
    trust_remote_code: bool = False
    allow_pickle: bool = False
    num_gpus: float | None = None  # per teacher replica; default 1 when the cluster has GPUs, else 0
    replicas: Replicas = None
    max_tokens: int | None = None  # default 65536 on GPU, 2048 on CPU (as kalm embed)
    max_rows: int | None = None
    batch_size: int = 256  # training rows per actor call (each holds 1 + len(pos) + len(neg) texts)
    scorer_num_cpus: float | None = None  # default 1 on GPU, 0.5 on CPU
    io_num_cpus: float = 0.25
    block_mb: float | None = None  # default 8 on GPU, 0.5 on CPU, as kalm embed (``embed.block_mb_for``)
    rows_per_file: int = 20_000  # ~30-100 MB of JSONL training rows per file
    overwrite: bool = False
    address: str | None = None

    def __post_init__(self):
        check_ranges(self)
        if (self.queries is None) != (self.corpus is None):
            raise ValueError("ID-keyed input needs both --queries and --corpus (the tables its ids point into)")
        if self.queries is not None and self.input is None:
            raise ValueError("--queries/--corpus name the texts of an ID-keyed --input; give --input too")
        self.storage()


@dataclass(frozen=True)
class ScorePlan:
    job: ScoreJobConfig
    input: InputFiles
    output: str
    rows: TrainingRowsConfig
    teacher: TeacherConfig
    block_mb: float  # the job's, or the CPU / GPU default
    queries: InputFiles | None = None  # ID-keyed input only
    corpus: InputFiles | None = None
    ids: IdColumns | None = None

    def output_columns(self) -> tuple[str, ...] | None:
        """ID-keyed rows keep their ids and gain scores; the texts looked up for scoring are not written."""
        if self.ids is None:
            return None
        extra = ("pos_scores", "neg_scores") + (("teacher_probs",) if self.teacher.temperature is not None else ())
        return (*[c for c in self.input.schema.names if c not in extra], *extra)


OUTPUT_SETTINGS = (
    "format", "output_format", "teacher_kind", "query_column", "pos_column", "neg_column", "prompt_column", "task",
    "query_prompt", "document_prompt", "pair_template", "max_length", "pooling", "activation", "temperature",
    "compute_dtype", "bidirectional",
)  # fmt: skip


def teacher_config(job: ScoreJobConfig, info, gpus_in_cluster: float | None,
                   cpu_nodes: tuple[float, ...] | None = None) -> TeacherConfig:  # fmt: skip
    """The teacher's resolved settings (placement, prompt, limits) from a job's settings; ``kalm mine`` uses it
    too, through a ScoreJobConfig of its teacher settings. ``cpu_nodes`` (the CPUs of each node, once Ray is up)
    sets how many CPU replicas share a node's cores; the CPU pool itself stays one replica unless asked."""
    num_gpus = job.num_gpus if job.num_gpus is not None else (1.0 if (gpus_in_cluster or 0) > 0 else 0.0)
    replicas = replicas_for(job.replicas, num_gpus, gpus_in_cluster, "--replicas")
    query_prompt = job.query_prompt
    if query_prompt is None:
        query_prompt = "" if job.teacher is None else defaults.KALM_QUERY_PROMPT
    teacher = TeacherConfig(
        model=info,
        kind=job.teacher_kind,
        query_column=job.query_column,
        pos_column=job.pos_column,
        neg_column=job.neg_column,
        prompt_column=job.prompt_column,
        query_prompt=query_prompt.replace("{task}", job.task) if job.teacher_kind == "bi-encoder" else None,
        document_prompt=job.document_prompt or None,
        pair_template=job.pair_template,
        max_length=job.max_length or info.st_max_seq_length or min(512, info.max_positions or 512),
        pooling=job.pooling or info.st_pooling or "mean",
        activation=job.activation,
        temperature=job.temperature,
        compute_dtype=job.compute_dtype,
        bidirectional=job.bidirectional,
        trust_remote_code=job.trust_remote_code,
        device=job.device,
        **forward_limits(num_gpus, job.max_tokens, job.max_rows),
        batch_size=job.batch_size,
        replicas=replicas,
        replicas_per_node=replicas_per_node(replicas, cpu_nodes) if num_gpus <= 0 else None,
        num_gpus=num_gpus,
        num_cpus=job.scorer_num_cpus if job.scorer_num_cpus is not None else (1.0 if num_gpus > 0 else 0.5),
    )
    return teacher


def plan(job: ScoreJobConfig, *, gpus_in_cluster: float | None = None, cpu_nodes: tuple[float, ...] | None = None,
         inp: InputFiles | None = None) -> ScorePlan:  # fmt: skip
    """Resolve defaults and check everything that needs no cluster: input columns, teacher, ranges."""
    try:
        info = inspect_model(
            job.teacher or defaults.default_teacher(),
            allow_pickle=job.allow_pickle,
            trust_remote_code=job.trust_remote_code,
            storage=job.storage(),
        )
        inp = inp or resolve_input(job.input or defaults.sample_pairs(), job.format, job.storage())
        found = inp.schema.names
        queries = corpus = ids = None
        if job.corpus is not None:
            ids = IdColumns(query_id=job.query_id_column, pos_ids=job.pos_ids_column, neg_ids=job.neg_ids_column,
                            query=job.query_column, pos=job.pos_column, neg=job.neg_column)  # fmt: skip
            needed = [ids.query_id, ids.pos_ids]
            queries = resolve_input(job.queries, None, job.storage())
            corpus = resolve_input(job.corpus, None, job.storage())
            for table, cols in ((queries, (job.query_id_column, job.query_column)),
                                (corpus, (job.corpus_id_column, job.corpus_text_column))):  # fmt: skip
                absent = [c for c in cols if c not in table.schema.names]
                if absent:
                    raise InputError(f"{table.files[0]}: missing column(s) {absent}; found {table.schema.names}")
        else:
            needed = [job.query_column, job.pos_column]
        missing = [c for c in needed if c not in found]
        if missing:
            hint = "" if ids else " (for ID-keyed rows, also give --queries and --corpus)"
            raise InputError(f"{inp.files[0]}: missing column(s) {missing}; columns found: {found}{hint}")
        teacher = teacher_config(job, info, gpus_in_cluster, cpu_nodes)
        rows = TrainingRowsConfig(query_column=job.query_column, pos_column=job.pos_column, neg_column=job.neg_column)
    except (InputError, FileNotFoundError, ValueError) as e:
        raise ConfigError(str(e)) from e
    output = job.output or f"{defaults.DEFAULT_OUTPUT}/score"
    block_mb = block_mb_for(job.block_mb, teacher.num_gpus)
    return ScorePlan(job, inp, output, rows, teacher, block_mb, queries=queries, corpus=corpus, ids=ids)


def build_dataset(p: ScorePlan, out, tally: Tally):
    """read -> texts looked up by id (when the rows carry ids) -> validate -> teacher scores; None if all is done.
    ``tally``: the teacher actors count the rows they score there (``progress.Tally``)."""
    from ray.data import ActorPoolStrategy, DataContext

    job = p.job
    DataContext.get_current().target_max_block_size = int(p.block_mb * 2**20)
    ds = out.read(p.input, columns=None, num_cpus=job.io_num_cpus)
    if ds is None:
        return None
    if p.ids is not None:
        shards, cpus = job.text_store_shards, job.io_num_cpus
        stores = {
            "queries": build_store(p.queries, id_column=job.query_id_column, text_column=job.query_column,
                                   shards=shards, num_cpus=cpus),
            "docs": build_store(p.corpus, id_column=job.corpus_id_column, text_column=job.corpus_text_column,
                                shards=shards, num_cpus=cpus),
        }  # fmt: skip
        ds = ds.map_batches(
            resolve_texts,
            fn_kwargs={"cols": p.ids, **stores},
            batch_size=p.teacher.batch_size,
            num_cpus=job.io_num_cpus,
            udf_modifying_row_count=False,
        )
    # A block at a time (batch_size=None), so that Ray Data fuses validation into the read tasks (it fuses a read
    # only with a map that takes whole blocks), or into the text lookups before it: no trip through the object store
    # and no task of its own (embed's validation does the same, pipelines/embed.py).
    ds = ds.map_batches(
        validate_training_table,
        fn_kwargs={"cfg": p.rows},
        batch_size=None,
        num_cpus=job.io_num_cpus,
        udf_modifying_row_count=False,
    )
    return ds.map_batches(
        tally.counted(TeacherScorer),
        fn_constructor_kwargs={"cfg": p.teacher},
        batch_size=p.teacher.batch_size,
        compute=ActorPoolStrategy(size=p.teacher.replicas),
        num_gpus=p.teacher.num_gpus or None,
        num_cpus=p.teacher.num_cpus,
        udf_modifying_row_count=False,
        **POOL_ACTOR,
    )


def run(job: ScoreJobConfig) -> dict:
    """Score every valid training row (resuming an interrupted run); returns the manifest."""
    p = plan(job)
    weights_hash = weights_sha256(p.teacher.model)
    settings = to_dict(job)
    fingerprint = {k: settings[k] for k in OUTPUT_SETTINGS}
    fingerprint.update(input=job.input or "bundled sample pairs", teacher_weights_sha256=weights_hash)
    fingerprint.update(queries=job.queries, corpus=job.corpus)
    resolved = {}

    def build(out, gpus, tally):
        q = plan(job, gpus_in_cluster=gpus, cpu_nodes=cluster_cpu_nodes(), inp=p.input)
        resolved["plan"] = q
        suggest_cpu_bf16(job.compute_dtype, q.teacher.num_gpus)
        sink = RowSink(
            out.root,
            columns=q.output_columns(),
            output_format=job.output_format,
            rows_per_file=job.rows_per_file,
            filesystem=out.fs,
            attempt=out.attempt,
        )
        return build_dataset(q, out, tally), sink

    def describe() -> dict:
        t = resolved["plan"].teacher
        return {
            "teacher": {"name": t.model.name, "path": t.model.path, "kind": t.kind, "weights_sha256": weights_hash},
            "resolved": {
                "input": p.input.uri,
                "input_format": p.input.format,
                "output": p.output,
                "output_format": job.output_format,
                "max_length": t.max_length,
                "query_prompt": t.query_prompt,
                "pooling": t.pooling if t.kind == "bi-encoder" else None,
                "num_gpus": t.num_gpus,
                "replicas": t.replicas,
                "max_tokens": t.max_tokens,
                "block_mb": resolved["plan"].block_mb,
            },
        }

    return execute(
        "score",
        inp=p.input,
        output=p.output,
        storage=job.storage(),
        fingerprint=fingerprint,
        overwrite=job.overwrite,
        address=job.address,
        io_num_cpus=job.io_num_cpus,
        build=build,
        describe=describe,
        config=settings,
    )


if __name__ == "__main__":
    from pipelines.cli import main

    sys.exit(main(["score", *sys.argv[1:]]))
