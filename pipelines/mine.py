"""``kalm mine``: hard negatives from ANN neighbours, with positive-aware filtering.

embed corpus (documents, no prompt) and queries (query prompt) with ``kalm embed``'s pipeline, into
``{output}/_work/`` (resumable; ``--corpus-embeddings`` reuses an earlier ``kalm embed`` output instead) ->
load the corpus vectors into ``ShardSearcher`` actors (``shard_rows`` each) -> ``QueryMiner`` over the query
vectors in streaming batches: fan-out search, exact top-k merge, positive scores, selection rules -> the ID-keyed
candidates table (``{output}/candidates/``), from which the training files are written.
Run it as ``kalm mine ...`` or ``python -m pipelines.mine ...``.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections import Counter
from dataclasses import dataclass
from typing import Literal

import pyarrow.parquet as pq

from operators.ann import IndexConfig, ShardSearcher
from operators.io import InputError, resolve_input
from operators.lookup import build_store
from operators.mine import MineConfig, QueryMiner, training_rows
from operators.negatives import SelectConfig, normalize_text
from operators.sink import RowSink
from operators.storage import resolve, write_json
from pipelines import defaults, embed
from pipelines.config import ConfigError, StorageSettings, to_dict
from pipelines.job import execute
from pipelines.runtime import ray_session

logger = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class MineJobConfig(StorageSettings):
    queries: str | None = None  # query_id, query, positive_ids; default: the bundled sample queries
    corpus: str | None = None  # id, text; default: the bundled sample corpus
    output: str | None = None  # default: kalm-out/mine
    model: str | None = None  # the retriever/student; default: the bundled all-MiniLM-L6-v2
    corpus_embeddings: str | None = None  # a kalm embed output of the corpus with the same model, reused
    query_id_column: str = "query_id"
    query_column: str = "query"
    positives_column: str = "positive_ids"
    corpus_id_column: str = "id"
    corpus_text_column: str = "text"
    task: str = defaults.DEFAULT_TASK
    query_prompt: str = defaults.KALM_QUERY_PROMPT
    max_length: int | None = None
    # index
    index_type: Literal["flat", "ivf", "ivfpq", "hnsw"] = "flat"
    shard_rows: int = 5_000_000
    nprobe: int = 32
    # selection (operators.negatives)
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
    search_batch: int = 1024  # queries per search call
    num_gpus: float | None = None
    overwrite: bool = False
    address: str | None = None

    def __post_init__(self):
        self.select()  # validates the rules before anything runs
        # The vector dimension is known after embedding (pq_m must divide it; checked when the shards are built).
        IndexConfig(dim=16, index_type=self.index_type, shard_rows=self.shard_rows, nprobe=self.nprobe)
        if self.search_batch < 1:
            raise ValueError(f"search_batch must be >= 1, got {self.search_batch}")

    def select(self) -> SelectConfig:
        return SelectConfig(
            num_negatives=self.num_negatives, range_min=self.range_min, range_max=self.range_max,
            min_score=self.min_score, max_score=self.max_score, absolute_margin=self.absolute_margin,
            relative_margin=self.relative_margin, sampling=self.sampling, seed=self.seed,
            consistency_rank=self.consistency_rank, too_few=self.too_few,
        )  # fmt: skip

    def output_uri(self) -> str:
        return self.output or f"{defaults.DEFAULT_OUTPUT}/mine"


def _embed_jobs(job: MineJobConfig) -> tuple[embed.EmbedJobConfig, embed.EmbedJobConfig]:
    out = job.output_uri().rstrip("/")
    common = dict(model=job.model, max_length=job.max_length, num_gpus=job.num_gpus, overwrite=job.overwrite,
                  address=job.address, storage_endpoint=job.storage_endpoint, storage_region=job.storage_region,
                  storage_retries=job.storage_retries)  # fmt: skip
    corpus = embed.EmbedJobConfig(
        input=job.corpus or str(defaults.SAMPLE_CORPUS),
        output=job.corpus_embeddings or f"{out}/_work/corpus",
        id_column=job.corpus_id_column,
        text_column=job.corpus_text_column,
        **common,
    )
    queries = embed.EmbedJobConfig(
        input=job.queries or str(defaults.SAMPLE_QUERIES),
        output=f"{out}/_work/queries",
        id_column=job.query_id_column,
        text_column=job.query_column,
        keep_columns=(job.query_column, job.positives_column),
        text_kind="query",
        task=job.task,
        query_prompt=job.query_prompt,
        **common,
    )
    return corpus, queries


def _check_inputs(job: MineJobConfig) -> None:
    try:
        q = resolve_input(job.queries or str(defaults.SAMPLE_QUERIES), None, job.storage())
        c = resolve_input(job.corpus or str(defaults.SAMPLE_CORPUS), None, job.storage())
    except InputError as e:
        raise ConfigError(str(e)) from e
    for inp, cols in ((q, (job.query_id_column, job.query_column, job.positives_column)),
                      (c, (job.corpus_id_column, job.corpus_text_column))):  # fmt: skip
        missing = [x for x in cols if x not in inp.schema.names]
        if missing:
            raise ConfigError(f"{inp.files[0]}: missing column(s) {missing}; columns found: {inp.schema.names}")


def _build_shards(job: MineJobConfig, corpus_manifest: dict, corpus_out: str):
    """Start the shard actors over the corpus embedding files, ``shard_rows`` vectors at most per shard."""
    import ray

    fs, root = resolve(corpus_out, job.storage())
    files = [f"{root}/{f}" for f in corpus_manifest["files"]]
    rows = [pq.ParquetFile(fs.open_input_file(f)).metadata.num_rows for f in files]
    groups, current, size = [], [], 0
    for f, n in zip(files, rows):
        if current and size + n > job.shard_rows:
            groups.append(current)
            current, size = [], 0
        current.append(f)
        size += n
    if current:
        groups.append(current)
    dim = corpus_manifest["model"]["hidden_size"]
    cfg = IndexConfig(dim=dim, index_type=job.index_type, shard_rows=job.shard_rows, nprobe=job.nprobe)
    actor = ray.remote(num_cpus=0.25)(ShardSearcher)
    shards = [actor.remote(cfg, job.shard_rows, i) for i in range(len(groups))]
    vec_col = corpus_manifest["columns"]["vectors"][0]
    sizes = ray.get([s.add_parquet.remote(fs, g, job.corpus_id_column, vec_col) for s, g in zip(shards, groups)])
    logger.info("index: %d shard(s), %d vectors (%s)", len(shards), sum(sizes), job.index_type)
    return shards, sum(sizes)


def run(job: MineJobConfig) -> dict:
    """Embed, index, search and select; returns the manifest of the candidates table."""
    t0 = time.perf_counter()
    _check_inputs(job)
    corpus_job, query_job = _embed_jobs(job)
    with ray_session(job.address):
        t = time.perf_counter()
        corpus_m = embed.run(corpus_job) if job.corpus_embeddings is None else None
        if corpus_m is None:  # reuse: its manifest says which files, model and columns
            fs, root = resolve(job.corpus_embeddings, job.storage())
            with fs.open_input_stream(f"{root}/_manifest.json") as f:
                corpus_m = json.loads(f.read())
        query_m = embed.run(query_job)
        embed_s = time.perf_counter() - t
        if corpus_m["model"]["weights_sha256"] != query_m["model"]["weights_sha256"]:
            raise ConfigError("--corpus-embeddings were made with another model than the one embedding the queries")
        t = time.perf_counter()
        shards, indexed = _build_shards(job, corpus_m, corpus_job.output)
        corpus_inp = resolve_input(corpus_job.input, None, job.storage())
        texts = build_store(corpus_inp, id_column=job.corpus_id_column, text_column=job.corpus_text_column,
                            shards=4, num_cpus=0.25)  # fmt: skip
        queries_inp = resolve_input(query_job.input, None, job.storage())
        by_text = build_store(queries_inp, id_column=job.query_column, text_column=job.positives_column, shards=2,
                              num_cpus=0.25, key_of=normalize_text, union=True)  # fmt: skip
        index_s = time.perf_counter() - t
        cfs, croot = resolve(corpus_job.output, job.storage())
        id_type = pq.read_schema(f"{croot}/{corpus_m['files'][0]}", filesystem=cfs).field(job.corpus_id_column).type
        mcfg = MineConfig(select=job.select(), query_id_column=job.query_id_column, query_column=job.query_column,
                          positives_column=job.positives_column, embedding_column=query_m["columns"]["vectors"][0],
                          text_rules=job.text_rules, id_type=id_type)  # fmt: skip
        vectors = resolve_input(query_job.output, "parquet", job.storage())

        def build(out, gpus):
            from ray.data import ActorPoolStrategy

            ds = out.read(vectors, columns=None, num_cpus=0.25)
            if ds is not None:
                ds = ds.map_batches(QueryMiner, fn_constructor_kwargs={"cfg": mcfg, "shards": shards,
                                                           "texts": texts if job.text_rules else None,
                                                           "positives_by_text": by_text},
                                    batch_size=job.search_batch, compute=ActorPoolStrategy(size=1), num_cpus=0.25,
                                    udf_modifying_row_count=False)  # fmt: skip
            sink = RowSink(out.root, filesystem=out.fs, attempt=out.attempt, rows_per_file=100_000,
                           id_column=job.query_id_column)  # fmt: skip
            return ds, sink

        settings = to_dict(job)
        fingerprint = {k: v for k, v in settings.items() if k not in ("overwrite", "address", "search_batch")}
        fingerprint.update(corpus_weights=corpus_m["model"]["weights_sha256"])
        manifest = execute(
            "mine",
            inp=vectors,
            output=f"{job.output_uri().rstrip('/')}/candidates",
            storage=job.storage(),
            fingerprint=fingerprint,
            overwrite=job.overwrite,
            address=job.address,
            io_num_cpus=0.25,
            build=build,
            describe=lambda: {"index": {"type": job.index_type, "shards": len(shards), "vectors": indexed}},
            config=settings,
        )
        train = _write_training(job, mcfg, texts, settings, corpus_m)
    report = _report(job, manifest, corpus_m, query_m, timings={"embed": embed_s, "index": index_s,
                                                               "total": time.perf_counter() - t0})  # fmt: skip
    report["training_file"] = {"path": f"{job.output_uri().rstrip('/')}/train", **train["counts"]}
    fs, root = resolve(job.output_uri(), job.storage())
    write_json(fs, f"{root}/_manifest.json", report)
    return report


def _write_training(job: MineJobConfig, mcfg: MineConfig, texts: list, settings: dict, corpus_m: dict) -> dict:
    """The candidates table as a KaLM/FlagEmbedding training file (JSONL) under ``{output}/train``."""
    root = job.output_uri().rstrip("/")
    candidates = resolve_input(f"{root}/candidates", "parquet", job.storage())
    prompt = job.query_prompt.replace("{task}", job.task).split("{text}")[0]

    def build(out, gpus):
        ds = out.read(candidates, columns=None, num_cpus=0.25)
        if ds is not None:
            ds = ds.map_batches(training_rows, fn_kwargs={"cfg": mcfg, "texts": texts, "prompt": prompt},
                                batch_size=4096, num_cpus=0.25, udf_modifying_row_count=False)  # fmt: skip
        cols = ("query", "pos", "neg", "pos_scores", "neg_scores", "prompt", job.query_id_column, "pos_ids", "neg_ids")
        sink = RowSink(out.root, columns=cols, output_format="jsonl", filesystem=out.fs, attempt=out.attempt,
                       rows_per_file=50_000, id_column=job.query_id_column, reject_columns=())  # fmt: skip
        return ds, sink

    fingerprint = {k: v for k, v in settings.items() if k not in ("overwrite", "address", "search_batch")}
    fingerprint.update(corpus_weights=corpus_m["model"]["weights_sha256"], prompt=prompt)
    return execute("mine-train", inp=candidates, output=f"{root}/train", storage=job.storage(),
                   fingerprint=fingerprint, overwrite=job.overwrite, address=job.address, io_num_cpus=0.25,
                   build=build, describe=dict, config=settings)  # fmt: skip


def _report(job, manifest, corpus_m, query_m, timings) -> dict:
    """Counts per stage and per rule, from the candidates table the run wrote."""
    fs, root = resolve(f"{job.output_uri().rstrip('/')}/candidates", job.storage())
    removed, dropped, negs = Counter(), Counter(), 0
    for f in manifest["files"]:
        t = pq.read_table(f"{root}/{f}", columns=["removed", "dropped", "neg_ids"], filesystem=fs)
        for r in t.column("removed").to_pylist():
            removed.update(json.loads(r))
        dropped.update(x for x in t.column("dropped").to_pylist() if x)
        negs += sum(len(x) for x in t.column("neg_ids").to_pylist())
    return {
        "command": "mine",
        "queries": {**manifest["counts"], "dropped_by_reason": dict(sorted(dropped.items()))},
        "negatives_chosen": negs,
        "candidates_removed_by_rule": dict(sorted(removed.items())),
        "corpus": corpus_m["counts"],
        "query_embedding": query_m["counts"],
        "index": manifest.get("index"),
        "config": to_dict(job),
        "timings_s": {k: round(v, 3) for k, v in timings.items()} | {"search": manifest["timings_s"]["pipeline"]},
    }


if __name__ == "__main__":
    from pipelines.cli import main

    sys.exit(main(["mine", *sys.argv[1:]]))
