"""``kalm submit`` and ``kalm jobs``: run a pipeline as a Ray job on a cluster through the Ray Jobs API.

The repository is shipped as the job's ``working_dir`` (so ``python -m pipelines.<name>`` runs the same code the
user has), without the virtualenv, git data, caches and outputs; ``.gitignore`` patterns are honoured by Ray too.
Dependencies: by default the cluster's image is expected to hold them (torch and the CUDA stack are what cluster
images are built for; installing them per job on every node costs minutes and GBs); ``--deps pip`` adds the
project's own requirements from ``pyproject.toml`` as a ``pip`` runtime_env for a bare Ray image.

Equivalent by hand: ``ray job submit --address http://HEAD:8265 --working-dir . -- python -m pipelines.embed ...``
(each pipeline module is also an entrypoint; ``python -m pipelines.cli select ...`` for ``kalm select``).
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from pathlib import Path

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
PIPELINES = ("embed", "score", "mine", "select", "distill")
# Never shipped: environments, VCS data, caches and outputs (data and outputs belong in object storage).
EXCLUDES = [".venv/", "venv/", ".git/", "**/__pycache__/", "*.egg-info/", ".pytest_cache/", ".ruff_cache/",
            "kalm-out/", "out/", ".whl/", ".gpu/", "tests/"]  # fmt: skip
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
AGENT_WAIT_S = 120  # how long a submission waits for a freshly started head's job agent


def project_requirements() -> list[str]:
    """The runtime requirements of the installed kalm-pipeline (pyproject's ``dependencies``, no extras)."""
    from importlib import metadata

    return [r for r in metadata.requires("kalm-pipeline") or [] if "extra ==" not in r]


def runtime_env(*, deps: str = "image", env_vars: dict[str, str] | None = None, root: Path = REPO_ROOT) -> dict:
    """The job's runtime_env: the repository as working_dir, minus EXCLUDES; with ``deps="pip"`` also the
    project's requirements. Model hubs stay off on every worker (models load from local paths or s3://)."""
    if deps not in ("image", "pip"):
        raise ValueError(f"deps must be one of ['image', 'pip'], got {deps!r}")
    from pipelines.runtime import WORKER_ENV  # the same worker environment as a local run

    env = {"working_dir": str(root), "excludes": list(EXCLUDES), "env_vars": {**WORKER_ENV, **(env_vars or {})}}
    if deps == "pip":
        env["pip"] = {"packages": project_requirements(), "pip_check": False}
    return env


def entrypoint(pipeline: str, args: list[str]) -> str:
    """The job's shell command: the ``kalm`` CLI as a module of the shipped working_dir (no install needed)."""
    import shlex

    if pipeline not in PIPELINES:
        raise ValueError(f"pipeline must be one of {list(PIPELINES)}, got {pipeline!r}")
    return shlex.join(["python", "-m", "pipelines.cli", pipeline, *args])


def client(address: str | None):
    """A JobSubmissionClient for ``address`` (http://HEAD:8265), else RAY_API_SERVER_ADDRESS / RAY_ADDRESS."""
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(address)


def submit(pipeline: str, args: list[str], *, address: str | None = None, deps: str = "image",
           submission_id: str | None = None, env_vars: dict[str, str] | None = None, entrypoint_num_cpus: float = 0.5,
           wait: bool = True, out=sys.stdout) -> tuple[str, str | None]:  # fmt: skip
    """Submit ``pipeline args`` as a Ray job. With ``wait``, follow its logs to ``out`` until it ends. Returns
    (submission id, final status or None when not waited for). The driver reserves a fraction of a CPU so it
    never waits behind the job's own actors for a slot."""
    c = client(address)
    ep = entrypoint(pipeline, args)
    env = runtime_env(deps=deps, env_vars=env_vars)
    deadline = time.monotonic() + AGENT_WAIT_S
    while True:
        try:
            job_id = c.submit_job(entrypoint=ep, runtime_env=env, submission_id=submission_id,
                                  entrypoint_num_cpus=entrypoint_num_cpus)  # fmt: skip
            break
        except RuntimeError as e:
            # A head that has just started answers before its job agent is up; Ray says to try again later.
            if "No available agent" not in str(e) or time.monotonic() > deadline:
                raise
            logger.info("the cluster's job agent is not up yet; retrying")
            time.sleep(2)
    logger.info("submitted %s as %s", ep, job_id)
    if not wait:
        return job_id, None
    return job_id, follow(c, job_id, out=out)


def follow(c, job_id: str, out=sys.stdout, poll_s: float = 1.0) -> str:
    """Print the job's logs as they come until it ends; returns its final status."""

    async def tail():
        async for chunk in c.tail_job_logs(job_id):
            out.write(chunk)
            out.flush()

    try:
        asyncio.run(tail())
    except RuntimeError as e:  # the log stream closed early (head restart, proxy timeout): fall back to polling
        logger.warning("log stream of %s ended early (%s); polling its status", job_id, e)
    while (s := status(c, job_id)) not in TERMINAL:
        time.sleep(poll_s)
    return s


def status(c, job_id: str) -> str:
    """The job's status as its plain name (SUCCEEDED, RUNNING...)."""
    return str(c.get_job_status(job_id)).split(".")[-1]


def exit_code(status: str) -> int:
    return 0 if status == "SUCCEEDED" else 1
