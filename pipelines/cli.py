"""The ``kalm`` command line. Flags are generated from each job's config dataclass, so YAML keys and flags are
the same names (``max_length`` <-> ``--max-length``) and cannot drift apart.

Exit codes: 0 done; 2 bad config or input, found before any work; 3 storage refused (no bucket, access denied,
retries exhausted); 4 a stage stalled (no row finished for ``KALM_STALL_S``); 1 the run failed otherwise; 130
interrupted. Every failure ends with one line naming it; what was committed stays, and rerunning the command
resumes. Error text never holds a credential (``storage.redact``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import typing

from cluster.submit import PIPELINES
from operators.storage import StorageError, redact
from pipelines import config as config_mod
from pipelines.faults import StallError

EXIT_BAD_CONFIG = 2
EXIT_RUN_FAILED = 1
EXIT_STORAGE = 3
EXIT_STALLED = 4

EMBED_HELP = {
    "format": "input format: parquet, jsonl, csv or hf (default: from file names)",
    "model": "local model folder (default: the bundled all-MiniLM-L6-v2)",
    "add_ids": "derive stable ids from file + row position when the input has no id column",
    "tokenizer_replicas": "a fixed pool of this many Tokenizer actors (default: on GPU one per model replica, "
    "autoscaled up to 12 per GPU while they hold the models back; on CPU one)",
    "keep_columns": "comma-separated input columns to copy to the output",
    "text_kind": "document (default) or query: which prompt applies",
    "task": "the task filled into {task} of the query prompt",
    "query_prompt": "query template; {task} and {text} are filled",
    "document_prompt": "document template (default: none)",
    "max_length": "max tokens per text, prompt included (default: model's ST max_seq_length, else 512)",
    "pooling": "mean, cls or last (default: the model's ST pooling, else mean)",
    "dims": "Matryoshka dimensions, e.g. 896,256,64: one column each",
    "dtype": "stored vector dtype: float32 or float16",
    "compute_dtype": "auto (bf16 on GPU, fp32 on CPU), float32, bfloat16 (~3x fp32 on CPUs with AMX), float16",
    "bidirectional": "run a decoder LM without its causal mask (KaLM-Embedding V2)",
    "attn_implementation": "auto (flash_attention_2 on GPU where flash-attn is installed, else sdpa), sdpa, "
    "flash_attention_2 or eager",
    "compile": "torch.compile the model (dynamic shapes; minutes of compiling, then fused kernels)",
    "num_gpus": "GPUs per model replica, fractional allowed (default: 1 if the cluster has GPUs)",
    "replicas": "model replicas, or auto: the cluster's GPUs / num_gpus, 1 on CPU (default: auto)",
    "max_tokens": "padded-token budget per forward pass",
    "address": "Ray cluster address (default: RAY_ADDRESS, else a local Ray)",
    "overwrite": "replace what the output holds (without it, a rerun with the same settings resumes)",
    "input": "input file, folder, glob, `datasets` save_to_disk folder, local or s3://bucket/prefix "
    "(default: the bundled sample corpus)",
    "output": "output folder or s3://bucket/prefix (default: kalm-out/embed)",
    "storage_endpoint": "S3-compatible endpoint URL, e.g. http://minio:9000 (default: AWS_ENDPOINT_URL, else AWS)",
    "storage_region": "object storage region (default: AWS_REGION / AWS_DEFAULT_REGION)",
    "storage_retries": "attempts per storage request, with exponential backoff and jitter",
}


SCORE_HELP = {
    "input": "KaLM/FlagEmbedding training rows {query, pos, neg, prompt?}: JSONL or Parquet, local or s3:// "
    "(default: the bundled sample)",
    "output": "output folder or s3://bucket/prefix (default: kalm-out/score)",
    "output_format": "jsonl (FlagEmbedding) or parquet",
    "teacher": "local teacher model folder (default: the bundled all-mpnet-base-v2)",
    "teacher_kind": "bi-encoder (cosine of pooled embeddings) or cross-encoder (sequence classification logit)",
    "query_prompt": "bi-encoder query template with {task}/{text} (default: KaLM's; none for the bundled teacher)",
    "pair_template": "cross-encoder input as one text, e.g. '{query} [SEP] {document}' (default: tokenizer pairs)",
    "activation": "cross-encoder score: none (raw logit) or sigmoid",
    "temperature": "also write teacher_probs = softmax([pos_scores, neg_scores] / temperature), e.g. 0.05",
    "num_gpus": "GPUs per teacher replica (default: 1 if the cluster has GPUs)",
    "overwrite": EMBED_HELP["overwrite"],
    "storage_endpoint": EMBED_HELP["storage_endpoint"],
}


MINE_HELP = {
    "queries": "query_id, query, positive_ids (list of corpus ids): Parquet/JSONL, local or s3:// "
    "(default: the bundled sample queries)",
    "corpus": "id, text: Parquet/JSONL, local or s3:// (default: the bundled sample corpus)",
    "output": "output folder or s3:// prefix: candidates/, train/ (JSONL), train-st/ (Parquet), _manifest.json",
    "model": "the student/retriever model folder (default: the bundled all-MiniLM-L6-v2)",
    "corpus_embeddings": "reuse a kalm embed output of the corpus (same model) instead of embedding it",
    "index": "load a saved index folder (an earlier run's <output>/_work/index) instead of building one",
    "index_type": "flat (exact), ivf, ivfpq or hnsw",
    "shard_memory_gb": "memory per index shard actor, reserved from Ray; sets the vectors per shard",
    "shard_rows": "vectors per index shard actor (overrides --shard-memory-gb)",
    "pos_column": "positives as texts (KaLM/FlagEmbedding rows), used when the positive-ids column is absent",
    "neg_column": "with positives as texts and no --corpus, these texts join the candidate pool",
    "pool": "neighbours kept per query in the candidates table, for later kalm select runs "
    "(default: what the rules need)",
    "num_negatives": "negatives per query",
    "range_min": "skip the first N surviving candidates (the likeliest false negatives)",
    "range_max": "select within the first N surviving candidates (default: range_min + num_negatives, x10 with "
    "a score rule)",
    "absolute_margin": "drop a candidate scoring above (lowest positive score - margin)",
    "relative_margin": "drop a candidate scoring above (lowest positive - |lowest positive| x margin), "
    "NV-Retriever's TopK-PercPos",
    "consistency_rank": "KaLM ranking consistency: drop a query with this many candidates above its best positive",
    "too_few": "when fewer negatives survive: keep fewer, drop the query, or pad randomly",
    "text_rules": "exclude candidates whose text equals a positive's or the query's, and duplicate texts",
    "teacher": "rescore positives and candidates with this teacher (selection and labels use its scores)",
    "teacher_kind": "bi-encoder or cross-encoder",
    "teacher_query_prompt": "teacher's query template with {task}/{text} (default: KaLM's; '' for none)",
    "candidates": "a kalm mine output folder whose candidates table to select from",
    "st_columns": "also write sentence-transformers columns anchor, positive, negative_1..n (train-st/)",
    "miners": "QueryMiner actors searching in parallel",
    "num_gpus": "GPUs per student replica, fractional allowed (default: 1 if the cluster has GPUs)",
    "replicas": "student replicas, or auto: the cluster's GPUs / num_gpus, 1 on CPU (default: auto)",
    "teacher_num_gpus": "GPUs per teacher replica, fractional allowed (default: as --num-gpus)",
    "teacher_replicas": "teacher replicas, or auto: the cluster's GPUs / teacher GPUs per replica, 1 on CPU "
    "(default: auto)",
}


DISTILL_HELP = {
    **MINE_HELP,
    "output": "output folder or s3:// prefix: train/ (JSONL with teacher pos_scores/neg_scores), train-st/, "
    "candidates/, report.html, _manifest.json (default: kalm-out/distill)",
    "teacher": "teacher model folder (default: the bundled all-mpnet-base-v2)",
    "query_prompt": "student query template with {task}/{text} (default: KaLM's; none for the bundled student)",
    "teacher_query_prompt": "teacher's query template (default: KaLM's; none for the bundled teacher)",
    "report": "write report.html and its PNG plots next to the output",
    "report_samples": "training rows shown in the report",
    "report_max_queries": "candidates-table rows the report's score plots read",
}


def _flag_type(hint):
    if typing.get_origin(hint) is tuple:
        return str  # comma-separated; config._coerce splits and types the items
    args = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
    base = args[0]
    if typing.get_origin(base) is tuple:
        return str  # comma-separated; config._coerce splits and types the items
    if base in (int, float):
        return _number_or_word(base) if len(args) > 1 else base
    return str


def _number_or_word(kind):
    """``--replicas 4`` or ``--replicas auto``: a number becomes one; a word goes to config._coerce to check."""

    def parse(text: str):
        try:
            return kind(text)
        except ValueError:
            return text

    parse.__name__ = kind.__name__
    return parse


def add_config_flags(parser: argparse.ArgumentParser, cls, help_texts: dict[str, str]) -> None:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        flag = "--" + f.name.replace("_", "-")
        hint = hints[f.name]
        default = f.default if f.default is not dataclasses.MISSING else None
        text = help_texts.get(f.name, "") + (f" [default: {default}]" if default not in (None, "", ()) else "")
        if hint is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=text)
        else:
            parser.add_argument(flag, type=_flag_type(hint), default=argparse.SUPPRESS, help=text, metavar="V")


def overrides_from(ns: argparse.Namespace, cls) -> dict:
    """Only the flags the user gave (argparse.SUPPRESS keeps the rest out), so YAML values are not masked."""
    return {f.name: getattr(ns, f.name) for f in dataclasses.fields(cls) if f.init and hasattr(ns, f.name)}


def build_parser() -> argparse.ArgumentParser:
    from pipelines.distill import DistillJobConfig
    from pipelines.embed import EmbedJobConfig
    from pipelines.mine import MineJobConfig, SelectJobConfig
    from pipelines.score import ScoreJobConfig

    parser = argparse.ArgumentParser(prog="kalm", description="KaLM-style embedding pipelines on Ray Data")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text, cls, helps in (
        ("embed", "bulk-embed a corpus to Parquet", EmbedJobConfig, EMBED_HELP),
        ("score", "teacher scores (pos_scores/neg_scores) for {query, pos, neg} training rows", ScoreJobConfig,
         SCORE_HELP),
        ("mine", "hard negatives from ANN neighbours, with positive-aware filtering", MineJobConfig, MINE_HELP),
        ("select", "re-apply selection rules to a kalm mine output, without searching again", SelectJobConfig,
         MINE_HELP),
        ("distill", "queries + corpus -> hard negatives with teacher soft labels, and a report", DistillJobConfig,
         DISTILL_HELP),
    ):  # fmt: skip
        job = sub.add_parser(name, help=text)
        job.add_argument("--config", help=f"YAML file of {name} settings (flags override it)")
        job.add_argument("--print-config", action="store_true", help="print the resolved settings and exit")
        add_config_flags(job, cls, helps)
    sb = sub.add_parser(
        "submit",
        help="run a pipeline as a Ray job on a cluster (Ray Jobs API)",
        description="Ships this repository as the job's working_dir and runs `python -m pipelines.cli "
        "PIPELINE ARGS` there; follows its logs; exits with the job's status (0 succeeded, 1 not).",
    )
    sb.add_argument("--address", help="the cluster's dashboard, http://HEAD:8265 (default: RAY_API_SERVER_ADDRESS, "
                    "then RAY_ADDRESS)")  # fmt: skip
    sb.add_argument(
        "--deps",
        choices=["image", "pip"],
        default="image",
        help="image: the cluster's image holds the "
        "dependencies (default); pip: install pyproject's requirements per job (a bare Ray image)",
    )
    sb.add_argument("--no-wait", action="store_true", help="print the job id and return without following the logs")
    sb.add_argument("--submission-id", help="the job's id (default: generated)")
    sb.add_argument("pipeline", choices=PIPELINES)
    sb.add_argument("args", nargs=argparse.REMAINDER, help="the pipeline's own flags, as for `kalm PIPELINE`")
    jb = sub.add_parser("jobs", help="status, logs or stop of a submitted job")
    jb.add_argument("action", choices=["status", "logs", "stop"])
    jb.add_argument("job_id")
    jb.add_argument("--address", help="as for kalm submit")
    jb.add_argument("--follow", action="store_true", help="logs: follow until the job ends")
    b = sub.add_parser("bench", help="measure the matmul peak, the model, kalm embed/score/mine and "
                       "sentence-transformers on the same texts, in one run")  # fmt: skip
    b.add_argument("--parts", help="comma-separated subset of peak,forward,st,pipeline,score,mine (default: all)")
    b.add_argument("--input", help="texts to embed (default: the bundled corpus)")
    b.add_argument("--model", help="student model folder (default: the bundled all-MiniLM-L6-v2)")
    b.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="where the model runs")
    b.add_argument("--compute-dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU), float32, bfloat16 "
                   "(~3x fp32 on CPUs with AMX), float16")  # fmt: skip
    b.add_argument("--bidirectional", action="store_true", help="decoder LM without its causal mask")
    b.add_argument("--compile", action="store_true", help="torch.compile the model")
    b.add_argument("--max-tokens", type=int, help="padded tokens per forward pass (default: the pipeline's)")
    b.add_argument("--replicas", type=int, help="model replicas of the pipeline part (default: auto; on CPU each "
                   "gets the node's cores / replicas torch threads)")  # fmt: skip
    b.add_argument("--batch-size", type=int, default=32, help="sentence-transformers batch size")
    b.add_argument("--repeat", type=int, default=4, help="extra copies of the texts in the large pipeline run")
    b.add_argument("--json", help="also write the results to this JSON file")
    b.add_argument("--score", choices=["bi-encoder", "cross-encoder"], help="teacher kind of the score part "
                   "(default: bi-encoder)")  # fmt: skip
    b.add_argument("--teacher", help="teacher model folder (default: the bundled all-mpnet-base-v2)")
    b.add_argument("--score-input", help="JSONL training rows to score (default: the bundled sample)")
    b.add_argument("--score-rows", type=int, default=40, help="training rows of the sample to score")
    b.add_argument("--memory", help="instead: peak memory of kalm embed runs of these row counts, e.g. "
                   "100000,1000000 (a tiny random model)")  # fmt: skip
    b.add_argument("--mine", action="store_true", help="instead: kalm mine against mine_hard_negatives at scale")
    b.add_argument("--mine-passages", default="100000", help="corpus sizes, comma-separated, e.g. 25000,100000")
    b.add_argument("--mine-queries", type=int, default=10000, help="queries per mining run")
    b.add_argument("--mine-max-length", type=int, default=128, help="token limit for both tools")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if ns.verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        if ns.command in ("embed", "score"):
            from pipelines import embed, score

            module = embed if ns.command == "embed" else score
            cls = embed.EmbedJobConfig if ns.command == "embed" else score.ScoreJobConfig
            job = config_mod.load(cls, ns.config, overrides_from(ns, cls))
            if ns.print_config:
                print(json.dumps(config_mod.to_dict(job), indent=2))
                return 0
            manifest = module.run(job)
            c, a = manifest["counts"], manifest["attempt"]
            resumed = f"; resumed: {a['rows_already_committed']} rows were already committed" if a["number"] else ""
            verb = "embedded" if ns.command == "embed" else "scored"
            print(
                f"{verb} {c['rows_out']} of {c['rows_in']} rows ({c['rows_rejected']} rejected "
                f"{c['rejected_by_reason']}, {c['rows_truncated']} truncated) in "
                f"{manifest['timings_s']['pipeline']} s -> {manifest['resolved']['output']}{resumed}"
            )
            return 0
        if ns.command in ("mine", "select", "distill"):
            from pipelines import distill, mine

            cls, run, resolved = {
                "mine": (mine.MineJobConfig, mine.run, config_mod.to_dict),
                "select": (mine.SelectJobConfig, mine.run_select, config_mod.to_dict),
                "distill": (distill.DistillJobConfig, distill.run, distill.resolved),
            }[ns.command]
            job = config_mod.load(cls, ns.config, overrides_from(ns, cls))
            if ns.print_config:
                print(json.dumps(resolved(job), indent=2))
                return 0
            report = run(job)
            q = report["queries"]
            files = ", ".join(f"{k}: {v['rows_out']} rows" for k, v in report["training_files"].items())
            print(
                f"{'selected' if ns.command == 'select' else 'mined'} {report['negatives_chosen']} negatives for "
                f"{q['rows_out']} of {q['rows_in']} queries ({q['rows_rejected']} rejected "
                f"{q['rejected_by_reason']}, dropped {q['dropped_by_reason']}, "
                f"{report['positives_missing_from_corpus']} positives missing from the corpus); removed by rule "
                f"{report['candidates_removed_by_rule']}; training files {files} -> {job.output_uri()}"
            )
            if report.get("report_html"):
                print(f"report: {report['report_html']}")
            return 0
        if ns.command == "submit":
            return _submit(parser, ns)
        if ns.command == "jobs":
            return _jobs(ns)
        if ns.command == "bench":
            if ns.mine:
                from pipelines import bench_mine

                bench_mine.main(ns)
                return 0
            from pipelines import bench

            bench.main(ns)
            return 0
    except config_mod.ConfigError as e:
        print(f"kalm {ns.command}: error: {redact(str(e))}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    except StorageError as e:
        print(f"kalm {ns.command}: storage error: {redact(str(e))}", file=sys.stderr)
        return EXIT_STORAGE
    except StallError as e:
        print(f"kalm {ns.command}: stalled: {redact(str(e))}", file=sys.stderr)
        return EXIT_STALLED
    except KeyboardInterrupt:
        print(f"kalm {ns.command}: interrupted; committed rows are kept, rerun to resume", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - the traceback is logged; the last line says what failed, in one line
        logging.getLogger("kalm").error("run failed", exc_info=True)
        first = (str(e).strip().splitlines() or [""])[0][:500]
        print(f"kalm {ns.command}: run failed: {type(e).__name__}: {redact(first)}; committed rows are kept, rerun "
              "the same command to resume", file=sys.stderr)  # fmt: skip
        return EXIT_RUN_FAILED
    return EXIT_RUN_FAILED


def _submit(parser: argparse.ArgumentParser, ns: argparse.Namespace) -> int:
    """Check the pipeline's flags and config here, before anything reaches the cluster, then submit."""
    from cluster import submit
    from pipelines.distill import DistillJobConfig
    from pipelines.embed import EmbedJobConfig
    from pipelines.mine import MineJobConfig, SelectJobConfig
    from pipelines.score import ScoreJobConfig

    cls = {"embed": EmbedJobConfig, "score": ScoreJobConfig, "mine": MineJobConfig, "select": SelectJobConfig,
           "distill": DistillJobConfig}[ns.pipeline]  # fmt: skip
    inner = parser.parse_args([ns.pipeline, *ns.args])  # exits 2 on an unknown flag, as `kalm PIPELINE` would
    config_mod.load(cls, inner.config, overrides_from(inner, cls))  # bad values: ConfigError, exit 2
    try:
        job_id, status = submit.submit(ns.pipeline, ns.args, address=ns.address, deps=ns.deps,
                                       submission_id=ns.submission_id, wait=not ns.no_wait)  # fmt: skip
    except ConnectionError as e:
        where = ns.address or "RAY_API_SERVER_ADDRESS / RAY_ADDRESS"
        print(f"kalm submit: error: cannot reach the Ray cluster at {where}: {e}", file=sys.stderr)
        return EXIT_RUN_FAILED
    print(f"job {job_id}" + (f": {status}" if status else " submitted; follow it with: kalm jobs logs --follow "
                             + job_id), file=sys.stderr)  # fmt: skip
    return 0 if status is None else submit.exit_code(status)


def _jobs(ns: argparse.Namespace) -> int:
    from cluster import submit

    c = submit.client(ns.address)
    if ns.action == "status":
        print(submit.status(c, ns.job_id))
        return 0
    if ns.action == "stop":
        print("stopped" if c.stop_job(ns.job_id) else "not running")
        return 0
    if ns.follow:
        return submit.exit_code(submit.follow(c, ns.job_id))
    print(c.get_job_logs(ns.job_id), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
