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


CLUSTER = REPO_ROOT / "cluster"
UNITS = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "": 1}


def _bytes(q) -> int:
    q = str(q)
    unit = next(u for u in UNITS if u and q.endswith(u)) if not q.isdigit() else ""
    return int(float(q[: len(q) - len(unit)]) * UNITS[unit])


def _ray_range():
    from importlib import metadata

    from packaging.requirements import Requirement

    return next(Requirement(r).specifier for r in metadata.requires("kalm-pipeline") if r.startswith("ray"))


def _check_ray_cluster_spec(spec: dict, where: str):
    assert spec["rayVersion"] in _ray_range(), f"{where}: rayVersion outside pyproject's ray range"
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0" and head["rayStartParams"]["dashboard-host"] == "0.0.0.0"
    containers = list(head["template"]["spec"]["containers"])
    for group in spec["workerGroupSpecs"]:
        pod = group["template"]["spec"]
        (c,) = pod["containers"]
        containers.append(c)
        gpus = int(c["resources"]["limits"]["nvidia.com/gpu"])
        assert int(group["rayStartParams"]["num-gpus"]) == gpus == int(c["resources"]["requests"]["nvidia.com/gpu"])
        shm = next(v for v in pod["volumes"] if v["name"] == "dshm")["emptyDir"]
        assert shm["medium"] == "Memory" and {"name": "dshm", "mountPath": "/dev/shm"} in c["volumeMounts"]
        store = int(group["rayStartParams"]["object-store-memory"])
        assert store < _bytes(shm["sizeLimit"]) < _bytes(c["resources"]["limits"]["memory"]), where
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    assert len({c["image"] for c in containers}) == 1, f"{where}: head and workers must run the same image"
    for c in containers:  # credentials only from the Secret, never inline
        env = {e["name"]: e for e in c["env"]}
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            assert "value" not in env[key] and env[key]["valueFrom"]["secretKeyRef"]["key"] == key
        assert env["HF_HUB_OFFLINE"]["value"] == "1"


def test_kuberay_manifests_parse_and_hold_what_the_pipelines_rely_on():
    import shlex

    import yaml

    from pipelines import config as config_mod
    from pipelines.cli import build_parser, overrides_from
    from pipelines.distill import DistillJobConfig

    job = yaml.safe_load((CLUSTER / "rayjob.yaml").read_text())
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:3] == ["python", "-m", "pipelines.cli"] and argv[3] == "distill"
    ns = build_parser().parse_args(argv[3:])  # the entrypoint's flags are this version's flags
    config_mod.load(DistillJobConfig, None, overrides_from(ns, DistillJobConfig))
    env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])
    assert env["working_dir"].startswith("s3://") and env["working_dir"].endswith(".zip")
    assert job["spec"]["shutdownAfterJobFinishes"] is True and job["spec"]["entrypointNumCpus"] > 0
    _check_ray_cluster_spec(job["spec"]["rayClusterSpec"], "rayjob.yaml")

    cluster = yaml.safe_load((CLUSTER / "raycluster.yaml").read_text())
    assert (cluster["apiVersion"], cluster["kind"]) == ("ray.io/v1", "RayCluster")
    _check_ray_cluster_spec(cluster["spec"], "raycluster.yaml")
    ports = {
        p["containerPort"] for p in cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["ports"]
    }
    assert 8265 in ports  # kalm submit talks to the Jobs API there


def test_aws_launcher_config_has_a_driver_only_head_and_gpu_workers():
    import re

    import yaml

    cfg = yaml.safe_load((CLUSTER / "aws.yaml").read_text())
    types = cfg["available_node_types"]
    assert cfg["provider"]["type"] == "aws" and cfg["head_node_type"] in types
    assert types[cfg["head_node_type"]]["resources"]["CPU"] == 0
    workers = [t for name, t in types.items() if name != cfg["head_node_type"]]
    assert workers and all(t["resources"]["GPU"] > 0 and t["min_workers"] <= t["max_workers"] for t in workers)
    assert cfg["max_workers"] >= sum(t["max_workers"] for t in workers)
    shm = next(o for o in cfg["docker"]["run_options"] if o.startswith("--shm-size"))
    store = int(re.search(r"--object-store-memory=(\d+)", " ".join(cfg["worker_start_ray_commands"])).group(1))
    assert store < int(shm.split("=")[1].rstrip("g")) * 10**9
