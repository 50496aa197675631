"""Job submission pieces that need no cluster: the runtime_env shipped with a job, the entrypoint, and the checks
`kalm submit` makes before anything reaches a cluster."""

from __future__ import annotations

from pathlib import Path

import pytest

from cluster.submit import REPO_ROOT, entrypoint, runtime_env
from pipelines.cli import EXIT_BAD_CONFIG, EXIT_RUN_FAILED, main


def test_runtime_env_ships_the_repository_without_environments_or_outputs():
    env = runtime_env()
    assert env["working_dir"] == str(REPO_ROOT) and (Path(env["working_dir"]) / "pipelines" / "cli.py").is_file()
    assert {".venv/", ".git/", "kalm-out/", "**/__pycache__/"} <= set(env["excludes"])
    assert "pip" not in env and env["env_vars"]["HF_HUB_OFFLINE"] == "1"
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    with open(REPO_ROOT / "pyproject.toml", "rb") as f:  # the independent reference: the project's own file
        declared = tomllib.load(f)["project"]["dependencies"]
    shipped = runtime_env(deps="pip")["pip"]["packages"]
    norm = lambda r: r.replace(" ", "").split(";")[0].lower()  # noqa: E731
    key = lambda r: norm(r).split("<")[0].split(">")[0].split("=")[0].split("[")[0]  # noqa: E731
    assert sorted(map(key, shipped)) == sorted(map(key, declared))
    with pytest.raises(ValueError, match="deps must be one of"):
        runtime_env(deps="conda")


def test_entrypoint_runs_the_cli_module_with_the_flags_quoted():
    assert entrypoint("embed", ["--input", "s3://b/in dir", "--dims", "256,64"]) == (
        "python -m pipelines.cli embed --input 's3://b/in dir' --dims 256,64"
    )
    with pytest.raises(ValueError, match="pipeline must be one of"):
        entrypoint("train", [])


def test_submit_refuses_bad_flags_and_values_before_contacting_a_cluster(capsys):
    # No cluster listens on this address: reaching it would fail differently (and slowly).
    addr = ["--address", "http://127.0.0.1:9"]
    with pytest.raises(SystemExit) as e:
        main(["submit", *addr, "embed", "--no-such-flag", "1"])
    assert e.value.code == EXIT_BAD_CONFIG
    assert main(["submit", *addr, "embed", "--block-mb", "-1"]) == EXIT_BAD_CONFIG
    assert "block_mb" in capsys.readouterr().err
    # Valid flags, no cluster: a clear error naming the address, not a traceback.
    assert main(["submit", *addr, "embed", "--block-mb", "4"]) == EXIT_RUN_FAILED
    assert "cannot reach the Ray cluster at http://127.0.0.1:9" in capsys.readouterr().err
