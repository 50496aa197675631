"""``kalm mine`` and ``kalm select``: hard negatives from ANN neighbours, with positive-aware filtering.

mine: embed corpus (documents, no prompt) and queries (query prompt) with ``kalm embed``'s pipeline into
``{output}/_work/`` (resumable; ``--corpus-embeddings`` reuses an earlier ``kalm embed`` output) -> load the corpus
vectors into ``ShardSearcher`` actors (``shard_memory_gb`` or ``shard_rows`` each), saved to
``{output}/_work/index`` (``--index`` loads a saved one) -> over the query vectors in streaming batches:
``QueryMiner`` (fan-out search, exact top-k merge, positive scores) -> ``CandidateTeacher`` when ``--teacher`` is
given -> ``NegativeSelector`` -> the ID-keyed candidates table ``{output}/candidates/`` -> the training files
``{output}/train/`` (KaLM/FlagEmbedding JSONL) and ``{output}/train-st/`` (sentence-transformers columns, Parquet)
-> ``{output}/_manifest.json``. Queries naming positives by text (KaLM/FlagEmbedding rows) are first turned into
ID-keyed queries and a pool of their texts (``_work/text-queries``, ``_work/pool``).
select: the candidates table of a mine run -> ``NegativeSelector`` with other rules -> the same outputs.
Run them as ``kalm mine|select ...`` or ``python -m pipelines.mine ...``.
"""

from __future__ import annotations

import json
import logging
import posixpath
import sys
import time
from collections import Counter
from dataclasses import dataclass, replace
from typing import Literal

import pyarrow as pa
import pyarrow.parquet as pq

from operators.ann import IndexConfig, ShardSearcher
from operators.io import InputError, InputFiles, check_type, is_id, is_text, resolve_input
from operators.lookup import build_store, fill_store
from operators.mine import (
    CandidateTeacher,
    MineConfig,
    NegativeSelector,
    QueryMiner,
    st_columns,
    st_rows,
    training_rows,
)
from operators.model import inspect_model
from operators.negatives import SelectConfig, normalize_text
from operators.sink import RowSink
from operators.storage import exists, read_json, resolve, write_json
from pipelines import config as config_mod
from pipelines import defaults, embed
from pipelines.config import ConfigError, Replicas, StorageSettings, check_ranges, to_dict
from pipelines.faults import INDEX_ACTOR, POOL_ACTOR, StallError, stall_s
from pipelines.job import execute, stage_row
from pipelines.progress import Tally
from pipelines.runtime import cluster_cpu_nodes, cluster_gpus, ray_session

logger = logging.getLogger(__name__)

INDEX_MANIFEST = "_index.json"
# Settings that do not change what is written (resources, batch sizes): a resumed run may change them.
RUN_ONLY = (
    "overwrite",
    "address",
    "search_batch",
    "miners",
    "num_gpus",
    "replicas",
    "teacher_num_gpus",
    "teacher_replicas",
)


@dataclass(frozen=True, kw_only=True)
class SelectionSettings:
    """The negative-selection rules (``operators.negatives``), shared by ``kalm mine`` and ``kalm select``."""

    num_negatives: int = 7
    range_min: int = 0
    range_max: int | None = None
    min_score: float | None = None
    max_score: float | None = None
    absolute_margin: float | None = None
    relative_margin: float | None = None
    sampling: Literal["top", "random"] = "top"
    seed: int = 0
    consistency_rank: int | None = None
    too_few: Literal["keep", "drop", "pad"] = "keep"
    text_rules: bool = True

    def select(self) -> SelectConfig:
        return SelectConfig(
            num_negatives=self.num_negatives, range_min=self.range_min, range_max=self.range_max,
            min_score=self.min_score, max_score=self.max_score, absolute_margin=self.absolute_margin,
            relative_margin=self.relative_margin, sampling=self.sampling, seed=self.seed,
            consistency_rank=self.consistency_rank, too_few=self.too_few,
        )  # fmt: skip


@dataclass(frozen=True, kw_only=True)
class MineJobConfig(StorageSettings, SelectionSettings):
    queries: str | None = None  # query_id, query, positive_ids; default: the bundled sample queries
    corpus: str | None = None  # id, text; default: the bundled sample corpus
    output: str | None = None  # default: kalm-out/mine
    model: str | None = None  # the retriever/student; default: the bundled all-MiniLM-L6-v2
    corpus_embeddings: str | None = None  # a kalm embed output of the corpus with the same model, reused
    index: str | None = None  # a saved index folder (from an earlier run's _work/index) to load instead of building
    query_id_column: str = "query_id"
    query_column: str = "query"
    positives_column: str = "positive_ids"
    pos_column: str = "pos"  # positives given as texts (KaLM/FlagEmbedding rows) when positives_column is absent
    neg_column: str = "neg"  # with positives as texts and no corpus, these texts join the candidate pool
    corpus_id_column: str = "id"
    corpus_text_column: str = "text"
    task: str = defaults.DEFAULT_TASK
    query_prompt: str = defaults.KALM_QUERY_PROMPT
    max_length: int | None = None
    # index
    index_type: Literal["flat", "ivf", "ivfpq", "hnsw"] = "flat"
    shard_memory_gb: float = 8.0  # memory per index shard actor (reserved from Ray); sets the vectors per shard
    shard_rows: int | None = None  # vectors per shard, overriding shard_memory_gb
    nprobe: int = 32
    pool: int | None = None  # neighbours kept per query in the candidates table; default: what the rules need
    # teacher rescoring of positives and candidates (scores for selection and for the training labels)
    teacher: str | None = None
    teacher_kind: Literal["bi-encoder", "cross-encoder"] = "bi-encoder"
    teacher_query_prompt: str | None = None  # bi-encoder; None: KaLM's, "" for none
    pair_template: str | None = None
    activation: Literal["none", "sigmoid"] = "none"
    teacher_max_length: int | None = None
    st_columns: bool = True  # also write the sentence-transformers column form
    search_batch: int = 1024  # queries per search call
    miners: int = 2  # QueryMiner actors (each fans its batches out to every shard)
    num_gpus: float | None = None  # per student replica; default: 1 when the cluster has GPUs, else 0 (CPU)
    replicas: Replicas = None  # student replicas; default: all GPUs / num_gpus, or one per CPU up to 4 a node (CPU)
    teacher_num_gpus: float | None = None  # per teacher replica; default: as num_gpus
    teacher_replicas: Replicas = None  # default: all GPUs / teacher_num_gpus, or 1 on CPU
    overwrite: bool = False
    address: str | None = None

    def __post_init__(self):
        check_ranges(self)
        sel = self.select()  # validates the rules before anything runs
        # The vector dimension is known after embedding (pq_m must divide it; checked when the shards are built).
        IndexConfig(dim=16, index_type=self.index_type, shard_rows=self.shard_rows or 1, nprobe=self.nprobe)
        if not self.shard_memory_gb > 0:
            raise ValueError(f"shard_memory_gb must be > 0, got {self.shard_memory_gb}")
        if self.pool is not None and self.pool < sel.candidates_needed(1):
            raise ValueError(f"pool ({self.pool}) must hold the rules' window: >= {sel.candidates_needed(1)}")
        if self.index is not None and self.corpus_embeddings is not None:
            raise ValueError("give --index or --corpus-embeddings, not both (a saved index already holds them)")
        self.storage()

    def output_uri(self) -> str:
        return (self.output or f"{defaults.DEFAULT_OUTPUT}/mine").rstrip("/")


@dataclass(frozen=True, kw_only=True)
class SelectJobConfig(StorageSettings, SelectionSettings):
    candidates: str  # a kalm mine output folder (or its candidates/ folder)
    output: str | None = None  # default: kalm-out/select
    st_columns: bool = True
    overwrite: bool = False
    address: str | None = None

    def __post_init__(self):
        self.select()
        self.storage()

    def output_uri(self) -> str:
        return (self.output or f"{defaults.DEFAULT_OUTPUT}/select").rstrip("/")


@dataclass(frozen=True)
class Inputs:
    """What the run embeds: the queries (ID-keyed) and one or more corpora (``id``/``text`` column names each)."""

    queries: str
    query_id_column: str
    corpora: tuple[tuple[str, str, str, str], ...]  # (input, embeddings output, id column, text column)
    text_mode: bool = False


def _inputs(job: MineJobConfig, text_mode: bool) -> Inputs:
    out = job.output_uri()
    corpora = []
    if job.corpus is not None or not text_mode:
        corpus = job.corpus or str(defaults.SAMPLE_CORPUS)
        corpora.append((corpus, job.corpus_embeddings or f"{out}/_work/corpus", job.corpus_id_column,
                        job.corpus_text_column))  # fmt: skip
    if not text_mode:
        return Inputs(job.queries or str(defaults.SAMPLE_QUERIES), job.query_id_column, tuple(corpora))
    corpora.append((f"{out}/_work/pool", f"{out}/_work/pool-vectors", "id", "text"))
    return Inputs(f"{out}/_work/text-queries", job.query_id_column, tuple(corpora), text_mode=True)


def _embed_jobs(job: MineJobConfig, inputs: Inputs) -> tuple[list[embed.EmbedJobConfig], embed.EmbedJobConfig]:
    common = dict(model=job.model, max_length=job.max_length, num_gpus=job.num_gpus, replicas=job.replicas,
                  overwrite=job.overwrite,
                  address=job.address, storage_endpoint=job.storage_endpoint, storage_region=job.storage_region,
                  storage_retries=job.storage_retries)  # fmt: skip
    corpora = [embed.EmbedJobConfig(input=i, output=o, id_column=idc, text_column=tc, **common)
               for i, o, idc, tc in inputs.corpora]  # fmt: skip
    queries = embed.EmbedJobConfig(
        input=inputs.queries,
        output=f"{job.output_uri()}/_work/queries",
        id_column=job.query_id_column,
        text_column=job.query_column,
        keep_columns=(job.query_column, job.positives_column),
        text_kind="query",
        task=job.task,
        query_prompt=job.query_prompt,
        **common,
    )
    return corpora, queries


def _rows_config(job: MineJobConfig):
    from operators.validate import TrainingRowsConfig

    return TrainingRowsConfig(query_column=job.query_column, pos_column=job.pos_column, neg_column=job.neg_column)


def _prepare_text_queries(job: MineJobConfig, q: InputFiles) -> None:
    """KaLM/FlagEmbedding rows (positives as texts) -> ``_work/text-queries`` (query_id, query, positive_ids by
    ``text_id``) and ``_work/pool`` (id, text: the positives, and the negatives when no corpus is given). Both are
    ordinary resumable outputs; rows that cannot be mined are set aside there, with their reasons."""
    from operators.mine import pool_texts, text_queries

    out, rows = job.output_uri(), _rows_config(job)
    derive_ids = job.query_id_column not in q.schema.names
    fingerprint = {"queries": job.queries, "columns": [job.query_id_column, job.query_column, job.pos_column,
                   job.neg_column], "negatives_in_pool": job.corpus is None}  # fmt: skip

    def queries(o, gpus, tally):
        ds = o.read(q, columns=None, num_cpus=0.25, add_ids=derive_ids, id_column=job.query_id_column)
        if ds is not None:
            ds = ds.map_batches(tally.counted(text_queries),
                                fn_kwargs={"rows": rows, "query_id_column": job.query_id_column,
                                           "positives_column": job.positives_column},
                                batch_size=4096, num_cpus=0.25, udf_modifying_row_count=False)  # fmt: skip
        cols = (job.query_id_column, job.query_column, job.positives_column)
        return ds, RowSink(o.root, columns=cols, filesystem=o.fs, attempt=o.attempt, id_column=job.query_id_column,
                           reject_columns=())  # fmt: skip

    def pool(o, gpus, tally):
        ds = o.read(q, columns=None, num_cpus=0.25)
        if ds is not None:
            ds = ds.map_batches(tally.counted(pool_texts), fn_kwargs={"rows": rows, "negatives": job.corpus is None},
                                batch_size=4096, num_cpus=0.25, udf_modifying_row_count=True)  # fmt: skip
        return ds, RowSink(o.root, columns=("id", "text"), filesystem=o.fs, attempt=o.attempt, id_column="id",
                           reject_columns=())  # fmt: skip

    manifests = {}
    for name, build in (("text-queries", queries), ("pool", pool)):
        manifests[name] = execute(f"mine-{name}", inp=q, output=f"{out}/_work/{name}", storage=job.storage(),
                                  fingerprint=fingerprint, overwrite=job.overwrite, address=job.address,
                                  io_num_cpus=0.25, build=build, describe=dict, config={})  # fmt: skip
    return manifests


def _has_rows(inp: InputFiles) -> bool:
    """Whether any file of ``inp`` holds a row (Parquet: its footer; text formats: a non-blank byte)."""
    for f in inp.files:
        if inp.format == "parquet":
            with inp.fs.open_input_file(f) as fh:
                if pq.ParquetFile(fh).metadata.num_rows:
                    return True
        elif inp.format == "hf":
            return True
        else:
            with inp.fs.open_input_stream(f) as fh:
                while chunk := fh.read(1 << 16):
                    if chunk.strip():
                        return True
    return False


def _id_kind(t: pa.DataType) -> str:
    """Id types that compare equal across files: any integer width, any string width."""
    if pa.types.is_integer(t):
        return "int"
    return "str" if pa.types.is_string(t) or pa.types.is_large_string(t) else str(t)


def _check_inputs(job: MineJobConfig) -> tuple[bool, InputFiles]:
    """Everything that can be checked before Ray starts: inputs exist, have rows and the columns, models load.
    Returns whether the queries name their positives by text (KaLM/FlagEmbedding rows), and the queries input."""
    try:
        q = resolve_input(job.queries or str(defaults.SAMPLE_QUERIES), None, job.storage())
        c = None if job.corpus is None and job.queries is not None else \
            resolve_input(job.corpus or str(defaults.SAMPLE_CORPUS), None, job.storage())  # fmt: skip
    except InputError as e:
        raise ConfigError(str(e)) from e
    names = q.schema.names
    text_mode = job.positives_column not in names and job.pos_column in names
    if c is None and not text_mode:
        raise ConfigError(f"{q.files[0]}: with no --corpus, the queries must be KaLM/FlagEmbedding rows whose "
                          f"'{job.pos_column}' (and '{job.neg_column}') texts form the candidate pool; columns "
                          f"found: {names}")  # fmt: skip
    q_cols = (job.query_column, job.pos_column) if text_mode else (job.query_id_column, job.query_column,
                                                                    job.positives_column)  # fmt: skip
    checks = [(q, q_cols, "queries")] + ([(c, (job.corpus_id_column, job.corpus_text_column), "corpus")] if c else [])
    for inp, cols, what in checks:
        if not _has_rows(inp):
            raise ConfigError(f"the {what} ({inp.uri}) has no rows: nothing to mine")
        missing = [x for x in cols if x not in inp.schema.names]
        if missing:
            hint = f" (positives by id in '{job.positives_column}', or as texts in '{job.pos_column}')" \
                if what == "queries" else ""  # fmt: skip
            raise ConfigError(f"{inp.files[0]}: missing column(s) {missing}; columns found: {inp.schema.names}{hint}")
    try:
        if c is not None:
            check_type(c, job.corpus_text_column, "strings", is_text)
            check_type(c, job.corpus_id_column, "strings or integers", is_id)
        check_type(q, job.query_column, "strings", is_text)
        if not text_mode:
            check_type(q, job.query_id_column, "strings or integers", is_id)
    except InputError as e:
        raise ConfigError(str(e)) from e
    if not text_mode and c is not None:
        pos_t, id_t = q.schema.field(job.positives_column).type, c.schema.field(job.corpus_id_column).type
        item_t = pos_t.value_type if pa.types.is_list(pos_t) or pa.types.is_large_list(pos_t) else None
        if item_t is None or (not pa.types.is_null(item_t) and _id_kind(item_t) != _id_kind(id_t)):
            raise ConfigError(f"{q.files[0]}: '{job.positives_column}' must be a list of corpus ids of the corpus "
                              f"id type ({id_t}); found {pos_t}")  # fmt: skip
    if text_mode and c is not None and job.corpus_embeddings is None and job.index is None:
        if not pa.types.is_string(c.schema.field(job.corpus_id_column).type):
            raise ConfigError(f"{c.files[0]}: with positives given as texts, corpus ids must be strings (the pool of "
                              f"positives is keyed by text hashes); '{job.corpus_id_column}' is "
                              f"{c.schema.field(job.corpus_id_column).type}")  # fmt: skip
    if job.index is not None:
        fs, root = resolve(job.index, job.storage())
        if not exists(fs, f"{root}/{INDEX_MANIFEST}"):
            raise ConfigError(f"--index {job.index!r} holds no saved index ({INDEX_MANIFEST} missing)")
    if job.teacher is not None:
        try:
            inspect_model(job.teacher, storage=job.storage())
        except (FileNotFoundError, ValueError) as e:
            raise ConfigError(f"--teacher: {e}") from e
    return text_mode, q


def _teacher(job: MineJobConfig):
    """The teacher's TeacherConfig (``kalm score``'s resolution of placement, prompt and limits), or None."""
    if job.teacher is None:
        return None
    from pipelines import score

    sj = score.ScoreJobConfig(teacher=job.teacher, teacher_kind=job.teacher_kind, task=job.task,
                              query_prompt=job.teacher_query_prompt, pair_template=job.pair_template,
                              activation=job.activation, max_length=job.teacher_max_length,
                              num_gpus=job.num_gpus if job.teacher_num_gpus is None else job.teacher_num_gpus,
                              replicas=job.teacher_replicas, batch_size=min(job.search_batch, 64))  # fmt: skip
    info = inspect_model(job.teacher, storage=job.storage())
    return score.teacher_config(sj, info, cluster_gpus(), cluster_cpu_nodes())


def _index_source(job: MineJobConfig, sources: list[tuple[dict, str, str]]) -> dict:
    """What an index is built from: a saved one is reused only if all of this matches."""
    return {"embeddings": [[out, m["files"], idc] for m, out, idc in sources],
            "weights_sha256": sources[0][0]["model"]["weights_sha256"], "index_type": job.index_type,
            "shard_rows": job.shard_rows, "shard_memory_gb": job.shard_memory_gb}  # fmt: skip


def _index_config(job: MineJobConfig, dim: int) -> IndexConfig:
    cfg = IndexConfig(dim=dim, index_type=job.index_type, nprobe=job.nprobe)
    return replace(cfg, shard_rows=job.shard_rows or cfg.rows_for_memory(job.shard_memory_gb))


def _start_shards(job: MineJobConfig, dim: int, sizes: list[int], saved: list[tuple] | None = None) -> list:
    """One actor per shard, reserving the memory its vectors need (``IndexConfig.bytes_per_vector``, +25% and 256 MB
    for faiss's work space), so Ray places each shard on a node with room for it. Shards started from ``saved``
    files (filesystem, prefix) are restartable (``faults.INDEX_ACTOR``): a restarted one loads its shard again."""
    import ray

    cfg = _index_config(job, dim)
    saved = saved or [None] * len(sizes)
    return [ray.remote(ShardSearcher).options(num_cpus=0.25, memory=int(n * cfg.bytes_per_vector() * 1.25) + 2**28,
                                              **(INDEX_ACTOR if s else {}))
            .remote(cfg, max(n, 1), i, s) for i, (n, s) in enumerate(zip(sizes, saved))]  # fmt: skip


def _ready(shards: list, job: MineJobConfig) -> list[int]:
    """The shards' sizes once they have started. A shard no node can hold (the memory it reserves) would wait
    forever: after ``KALM_STALL_S`` this ends with a StallError naming the setting to lower."""
    import ray

    try:
        return ray.get([s.size.remote() for s in shards], timeout=stall_s() or None)
    except ray.exceptions.GetTimeoutError:
        raise StallError(f"index shards did not start within {stall_s():.0f} s: no node has the memory they reserve "
                         f"(shard_memory_gb={job.shard_memory_gb}, shard_rows={job.shard_rows}); lower "
                         "--shard-memory-gb or add nodes (KALM_STALL_S sets this limit)") from None  # fmt: skip


def _load_index(job: MineJobConfig, uri: str, meta: dict) -> list:
    fs, root = resolve(uri, job.storage())
    shards = _start_shards(job, meta["dim"], meta.get("sizes") or [meta["vectors"] // len(meta["shards"])] * len(
        meta["shards"]), saved=[(fs, f"{root}/{p}") for p in meta["shards"]])  # fmt: skip
    sizes = _ready(shards, job)
    if sum(sizes) != meta["vectors"]:
        raise ConfigError(f"index {uri!r}: {sum(sizes)} vectors loaded, its manifest says {meta['vectors']}")
    logger.info("index loaded from %s: %d shard(s), %d vectors", uri, len(shards), sum(sizes))
    return shards


def _open_index(job: MineJobConfig, sources: list[tuple[dict, str, str]]) -> tuple[list, dict, bool]:
    """The index shards: loaded from ``--index``, reused from this output's ``_work/index`` when built from the same
    embeddings and settings (a rerun or resume), else built from the corpus embeddings and saved there.
    ``sources``: (embedding manifest, its output URI, its id column) per corpus. Returns the shard actors, the
    index manifest and whether it was built by this run."""
    import ray

    if job.index is not None:
        fs, root = resolve(job.index, job.storage())
        meta = read_json(fs, f"{root}/{INDEX_MANIFEST}")
        return _load_index(job, job.index, meta), meta, False
    saved = f"{job.output_uri()}/_work/index"
    fs, root = resolve(saved, job.storage())
    source = _index_source(job, sources)
    if not job.overwrite and exists(fs, f"{root}/{INDEX_MANIFEST}"):
        meta = read_json(fs, f"{root}/{INDEX_MANIFEST}")
        if meta.get("source") == source:
            return _load_index(job, saved, meta), meta, False
    parts = []  # (filesystem, path, id column, vector column, rows) in corpus order
    for m, out, idc in sources:
        cfs, croot = resolve(out, job.storage())
        for f in m["files"]:
            rows = pq.ParquetFile(cfs.open_input_file(f"{croot}/{f}")).metadata.num_rows
            parts.append((cfs, f"{croot}/{f}", idc, m["columns"]["vectors"][0], rows))
    dim = sources[0][0]["model"]["hidden_size"]
    shard_rows = _index_config(job, dim).shard_rows
    groups, size = [], 0
    for part in parts:
        if not groups or (size + part[4] > shard_rows and groups[-1]):
            groups.append([])
            size = 0
        groups[-1].append(part)
        size += part[4]
    if not sum(p[4] for p in parts):
        counts = [m["counts"] for m, _, _ in sources]
        raise ConfigError(f"the corpus has no embeddable rows ({sum(c['rows_in'] for c in counts)} read, "
                          f"{sum(c['rows_rejected'] for c in counts)} rejected "
                          f"{[c['rejected_by_reason'] for c in counts]}): nothing to search")  # fmt: skip
    shards = _start_shards(job, dim, [sum(p[4] for p in g) for g in groups])
    _ready(shards, job)
    calls = []
    for s, group in zip(shards, groups):  # an actor runs its calls in order, so positions stay contiguous
        for cfs, path, idc, vec, _ in group:
            calls.append(s.add_parquet.remote(cfs, [path], idc, vec))
    ray.get(calls)
    sizes = ray.get([s.size.remote() for s in shards])
    names = [f"shard-{i:05d}" for i in range(len(shards))]
    fs.create_dir(root, recursive=True)
    ray.get([s.save.remote(fs, f"{root}/{n}") for s, n in zip(shards, names)])
    meta = {"source": source, "dim": dim, "shards": names, "sizes": sizes, "vectors": sum(sizes),
            "index_type": job.index_type,
            "weights_sha256": source["weights_sha256"]}  # fmt: skip
    write_json(fs, f"{root}/{INDEX_MANIFEST}", meta)  # last: a half-saved index has no manifest and is rebuilt
    logger.info("index built: %d shard(s), %d vectors (%s), saved to %s", len(shards), sum(sizes), job.index_type,
                saved)  # fmt: skip
    # Search from shards started from the saved files: a shard lost mid-search is restarted and reloads itself,
    # which the building actors (their state made by add calls) could not. Loading also leaves faiss's build-time
    # buffers behind. The builders go first, so their memory is free for the searchers.
    for s in shards:
        ray.kill(s)
    return _load_index(job, saved, meta), meta, True


def _id_type(job: MineJobConfig, index_uri: str, meta: dict):
    fs, root = resolve(index_uri, job.storage())
    return pq.read_schema(f"{root}/{meta['shards'][0]}.ids.parquet", filesystem=fs).field("id").type


def run(job: MineJobConfig, command: str = "mine") -> dict:
    """Embed, index, search, rescore and select; returns the run's report (also ``{output}/_manifest.json``)."""
    import ray

    t0 = time.perf_counter()
    text_mode, q_inp = _check_inputs(job)
    inputs = _inputs(job, text_mode)
    corpus_jobs, query_job = _embed_jobs(job, inputs)
    stages = []  # one line per stage, in order: rows in/out/rejected, rows done by this run, seconds, rows/s
    with ray_session(job.address):
        if text_mode:
            for name, m in _prepare_text_queries(job, q_inp).items():
                stages.append(stage_row(f"prepare {name}", m))
        sources = []  # (embedding manifest, output, id column) per corpus
        if job.index is None:
            for cj in corpus_jobs:
                what = "embed pool" if cj.output.endswith("/_work/pool-vectors") else "embed corpus"
                if cj.output == job.corpus_embeddings:  # reuse: its manifest says which files, model and columns
                    fs, root = resolve(job.corpus_embeddings, job.storage())
                    m = read_json(fs, f"{root}/_manifest.json")
                    stages.append(stage_row(f"{what} (reused {cj.output})", m, reused=True))
                else:
                    m = embed.run(cj)
                    stages.append(stage_row(what, m))
                sources.append((m, cj.output, cj.id_column))
        query_m = embed.run(query_job)
        stages.append(stage_row("embed queries", query_m))
        t = time.perf_counter()
        shards, meta, built = _open_index(job, sources)
        if meta["weights_sha256"] != query_m["model"]["weights_sha256"]:
            raise ConfigError("the corpus vectors (--corpus-embeddings or --index) were made with another model "
                              "than the one embedding the queries")  # fmt: skip
        index_s = time.perf_counter() - t
        stages.append({"stage": f"index ({'built' if built else 'loaded'}, {job.index_type})",
                       "rows_in": meta["vectors"], "rows_out": meta["vectors"], "rows_rejected": 0,
                       "rows_this_run": meta["vectors"] if built else 0, "seconds": round(index_s, 3),
                       "rows_per_s": round(meta["vectors"] / index_s, 2) if index_s > 0 else None})  # fmt: skip
        texts = _text_store(job, inputs)
        queries_inp = resolve_input(query_job.input, None, job.storage())
        by_text = build_store(queries_inp, id_column=job.query_column, text_column=job.positives_column, shards=2,
                              num_cpus=0.25, key_of=normalize_text, union=True)  # fmt: skip
        max_positives = max(ray.get([s.longest_list.remote() for s in by_text]), default=0)
        index_uri = job.index or f"{job.output_uri()}/_work/index"
        mcfg = MineConfig(select=job.select(), query_id_column=job.query_id_column, query_column=job.query_column,
                          positives_column=job.positives_column, embedding_column=query_m["columns"]["vectors"][0],
                          text_rules=job.text_rules, id_type=_id_type(job, index_uri, meta),
                          max_positives=max(1, max_positives), pool=job.pool)  # fmt: skip
        teacher = _teacher(job)
        vectors = resolve_input(query_job.output, "parquet", job.storage())

        def build(out, gpus, tally):
            from ray.data import ActorPoolStrategy

            ds = out.read(vectors, columns=None, num_cpus=0.25)
            if ds is not None:
                ds = ds.map_batches(QueryMiner, fn_constructor_kwargs={"cfg": mcfg, "shards": shards,
                                                                       "positives_by_text": by_text},
                                    batch_size=job.search_batch, compute=ActorPoolStrategy(min_size=1,
                                    max_size=job.miners), num_cpus=0.25, udf_modifying_row_count=False,
                                    **POOL_ACTOR)  # fmt: skip
                if teacher is not None:
                    ds = ds.map_batches(
                        CandidateTeacher,
                        fn_constructor_kwargs={"cfg": mcfg, "teacher": teacher, "texts": texts},
                        batch_size=teacher.batch_size,
                        compute=ActorPoolStrategy(size=teacher.replicas),
                        num_gpus=teacher.num_gpus or None,
                        num_cpus=teacher.num_cpus,
                        udf_modifying_row_count=False,
                        **POOL_ACTOR,
                    )
                # The teacher's batch size: a selector batch gathering 1024 teacher outputs would hold back both the
                # write and the progress count for 16 teacher calls.
                ds = _selected(ds, mcfg, texts, tally, batch_size=teacher.batch_size if teacher else job.search_batch)
            return ds, _candidates_sink(out, job.query_id_column)

        settings = to_dict(job)
        fingerprint = {k: v for k, v in settings.items() if k not in RUN_ONLY}
        fingerprint.update(corpus_weights=meta["weights_sha256"])
        teacher_info = None if teacher is None else {"name": teacher.model.name, "kind": teacher.kind,
                                                     "path": teacher.model.path}  # fmt: skip
        manifest = execute(
            "search" + (", teacher" if teacher else "") + ", select", inp=vectors,
            output=f"{job.output_uri()}/candidates", storage=job.storage(),
            fingerprint=fingerprint, overwrite=job.overwrite, address=job.address, io_num_cpus=0.25, build=build,
            describe=lambda: {"index": {k: meta[k] for k in ("index_type", "shards", "vectors")} | {"path": index_uri},
                              "pool": mcfg.pool_size(), "max_positives": mcfg.max_positives,
                              "teacher": teacher_info},
            config=settings,
        )  # fmt: skip
        stages.append(stage_row(manifest["command"], manifest))
        train = write_training(job, job, job.output_uri(), mcfg, texts, fingerprint)
        stages += [stage_row(f"write {name}", m) for name, m in train.items()]
    report = _report(command, job.output_uri(), job.storage(), manifest, train, stages, time.perf_counter() - t0,
                     to_dict(job))  # fmt: skip
    report.update(
        corpus={out: m["counts"] for m, out, _ in sources} or {"index": index_uri},
        query_embedding=query_m["counts"],
        text_positives=text_mode,
    )
    fs, root = resolve(job.output_uri(), job.storage())
    write_json(fs, f"{root}/_manifest.json", report)
    return report


def _text_store(job, inputs: Inputs) -> list:
    """One id -> text map over every corpus the run searched (the user's corpus and the pool of inline texts)."""
    texts = None
    for inp_uri, _, id_column, text_column in inputs.corpora:
        inp = resolve_input(inp_uri, None, job.storage())
        kw = dict(id_column=id_column, text_column=text_column, num_cpus=0.25)
        texts = build_store(inp, shards=None, **kw) if texts is None else fill_store(texts, inp, **kw)
    return texts


def _selected(ds, mcfg: MineConfig, texts: list, tally: Tally, batch_size: int = 1024):
    """``ds`` through the NegativeSelector actors, which count their output rows in ``tally``."""
    return ds.map_batches(tally.counted(NegativeSelector), fn_constructor_kwargs={"cfg": mcfg, "texts": texts},
                          batch_size=batch_size, compute=_cpu_pool(), num_cpus=0.25, udf_modifying_row_count=False,
                          **POOL_ACTOR)  # fmt: skip


def _cpu_pool():
    from ray.data import ActorPoolStrategy

    return ActorPoolStrategy(min_size=1, max_size=2)


def _candidates_sink(out, id_column: str) -> RowSink:
    return RowSink(out.root, filesystem=out.fs, attempt=out.attempt, rows_per_file=100_000, id_column=id_column)


def _instruction(job: MineJobConfig) -> str:
    """The query instruction the training rows carry in ``prompt`` (FlagEmbedding prepends it to the query)."""
    return job.query_prompt.replace("{task}", job.task).split("{text}")[0]


def write_training(job, mined: MineJobConfig, root: str, mcfg: MineConfig, texts: list, fingerprint: dict) -> dict:
    """The candidates table as training files: KaLM/FlagEmbedding JSONL under ``{root}/train`` and, with
    ``job.st_columns``, sentence-transformers columns (Parquet) under ``{root}/train-st``. ``mined``: the mine run's
    settings (its query prompt). Returns their manifests."""
    candidates = resolve_input(f"{root}/candidates", "parquet", job.storage())
    prompt = _instruction(mined)
    fingerprint = {**fingerprint, "prompt": prompt}
    qid = mcfg.query_id_column

    def jsonl(out, gpus, tally):
        ds = out.read(candidates, columns=None, num_cpus=0.25)
        if ds is not None:
            ds = ds.map_batches(tally.counted(training_rows),
                                fn_kwargs={"cfg": mcfg, "texts": texts, "prompt": prompt}, batch_size=4096,
                                num_cpus=0.25, udf_modifying_row_count=False)  # fmt: skip
        cols = ("query", "pos", "neg", "pos_scores", "neg_scores", "prompt", qid, "pos_ids", "neg_ids")
        sink = RowSink(out.root, columns=cols, output_format="jsonl", filesystem=out.fs, attempt=out.attempt,
                       rows_per_file=50_000, id_column=qid, reject_columns=())  # fmt: skip
        return ds, sink

    def st(out, gpus, tally):
        ds = out.read(candidates, columns=None, num_cpus=0.25)
        if ds is not None:
            ds = ds.map_batches(tally.counted(st_rows), fn_kwargs={"cfg": mcfg, "texts": texts}, batch_size=4096,
                                num_cpus=0.25, udf_modifying_row_count=True)  # fmt: skip
        sink = RowSink(out.root, columns=st_columns(mcfg.select.num_negatives), filesystem=out.fs,
                       attempt=out.attempt, rows_per_file=100_000, id_column=qid, reject_columns=())  # fmt: skip
        return ds, sink

    result = {}
    for name, build, on in (("train", jsonl, True), ("train-st", st, job.st_columns)):
        if on:
            result[name] = execute(f"training-file:{name}", inp=candidates, output=f"{root}/{name}",
                                   storage=job.storage(), fingerprint=fingerprint, overwrite=job.overwrite,
                                   address=job.address, io_num_cpus=0.25, build=build, describe=dict,
                                   config={})  # fmt: skip
    return result


def _report(
    command: str, root: str, storage, manifest: dict, train: dict, stages: list[dict], total_s: float, config: dict
) -> dict:
    """Counts per stage and per rule, from the candidates table the run wrote."""
    fs, croot = resolve(f"{root}/candidates", storage)
    removed, dropped, negs, missing = Counter(), Counter(), 0, 0
    for f in manifest["files"]:
        t = pq.read_table(f"{croot}/{f}", columns=["removed", "dropped", "neg_ids", "missing_positives"],
                          filesystem=fs)  # fmt: skip
        for r in t.column("removed").to_pylist():
            removed.update(json.loads(r))
        dropped.update(x for x in t.column("dropped").to_pylist() if x)
        negs += sum(len(x) for x in t.column("neg_ids").to_pylist())
        missing += sum(t.column("missing_positives").to_pylist())
    files = {name: {"path": f"{root}/{name}", **{k: m["counts"][k] for k in ("rows_in", "rows_out", "rows_rejected",
                                                                             "rejected_by_reason")}}
             for name, m in train.items()}  # fmt: skip
    return {
        "command": command,
        "queries": {**manifest["counts"], "dropped_by_reason": dict(sorted(dropped.items()))},
        "negatives_chosen": negs,
        "positives_missing_from_corpus": missing,
        "candidates_removed_by_rule": dict(sorted(removed.items())),
        "index": manifest.get("index"),
        "pool": manifest.get("pool"),
        "max_positives": manifest.get("max_positives"),
        "teacher": manifest.get("teacher"),
        "training_files": files,
        "config": config,
        "stages": stages,
        "timings_s": {"total": round(total_s, 3)},
    }


def _mine_root(job: SelectJobConfig) -> tuple[str, dict]:
    """The mine output a select job reads, and that run's report."""
    uri = job.candidates.rstrip("/")
    for root in (uri, posixpath.dirname(uri)):
        fs, path = resolve(root, job.storage())
        if exists(fs, f"{path}/_manifest.json") and exists(fs, f"{path}/candidates/_manifest.json"):
            report = read_json(fs, f"{path}/_manifest.json")
            if report.get("command") in ("mine", "select", "distill"):
                return root, report
    raise ConfigError(f"--candidates {job.candidates!r} is not a finished kalm mine output (no candidates/ and "
                      "_manifest.json written by kalm mine)")  # fmt: skip


def run_select(job: SelectJobConfig) -> dict:
    """Re-apply selection rules to a mine run's candidates table, without searching again."""
    t0 = time.perf_counter()
    src, report = _mine_root(job)
    if job.output_uri() == src:
        raise ConfigError("--output must differ from the mine output it selects from")
    mine_job = config_mod.build(MineJobConfig, {**report["config"], "overwrite": False, "address": None})
    max_positives, have = report["max_positives"], report["pool"]
    need = job.select().candidates_needed(max_positives)
    if need > have:
        raise ConfigError(f"these rules need {need} candidates per query (window {job.select().window_end()} + "
                          f"{max_positives} positives), but {src} kept {have}; rerun kalm mine with --pool {need} or "
                          "more")  # fmt: skip
    candidates = resolve_input(f"{src}/candidates", "parquet", job.storage())
    with ray_session(job.address):
        id_type = candidates.schema.field("candidate_ids").type.value_type
        mcfg = MineConfig(select=job.select(), query_id_column=mine_job.query_id_column,
                          query_column=mine_job.query_column, positives_column=mine_job.positives_column,
                          text_rules=job.text_rules, id_type=id_type, max_positives=max_positives,
                          pool=have)  # fmt: skip
        texts = _text_store(job, _inputs(replace(mine_job, output=src), report.get("text_positives", False)))

        def build(out, gpus, tally):
            ds = out.read(candidates, columns=None, num_cpus=0.25)
            selected = None if ds is None else _selected(ds, mcfg, texts, tally)
            return selected, _candidates_sink(out, mcfg.query_id_column)

        settings = to_dict(job)
        fingerprint = {k: v for k, v in settings.items() if k not in RUN_ONLY}
        manifest = execute("select", inp=candidates, output=f"{job.output_uri()}/candidates", storage=job.storage(),
                           fingerprint=fingerprint, overwrite=job.overwrite, address=job.address, io_num_cpus=0.25,
                           build=build, describe=lambda: {"pool": have, "max_positives": max_positives,
                                                          "teacher": report.get("teacher"),
                                                          "index": report.get("index")},
                           config=settings)  # fmt: skip
        train = write_training(job, mine_job, job.output_uri(), mcfg, texts, fingerprint)
    stages = [stage_row("select", manifest)] + [stage_row(f"write {name}", m) for name, m in train.items()]
    out = _report("select", job.output_uri(), job.storage(), manifest, train, stages, time.perf_counter() - t0,
                  settings)  # fmt: skip
    out["source"] = {"mine_output": src, "queries_rejected_there": report["queries"]["rejected_by_reason"]}
    fs, root = resolve(job.output_uri(), job.storage())
    write_json(fs, f"{root}/_manifest.json", out)
    return out


if __name__ == "__main__":
    from pipelines.cli import main

    sys.exit(main(["mine", *sys.argv[1:]]))
