"""Config loading: defaults < YAML < flags, and errors that name the bad key or value."""

from __future__ import annotations

import pytest

from pipelines.cli import build_parser, overrides_from
from pipelines.config import ConfigError, load
from pipelines.embed import EmbedJobConfig


def _load(tmp_path, yaml_text, argv):
    cfg = tmp_path / "embed.yaml"
    cfg.write_text(yaml_text)
    ns = build_parser().parse_args(["embed", *argv])
    return load(EmbedJobConfig, str(cfg), overrides_from(ns, EmbedJobConfig))


def test_precedence_defaults_yaml_flags(tmp_path):
    job = _load(tmp_path, "max_length: 128\ndims: [896, 256]\npooling: cls\n", ["--max-length", "64"])
    assert job.max_length == 64  # flag beats YAML
    assert job.dims == (896, 256)  # YAML beats default
    assert job.pooling == "cls"
    assert job.normalize is True  # default survives


def test_flags_parse_lists_and_booleans(tmp_path):
    job = _load(tmp_path, "normalize: true\n", ["--dims", "512,64", "--no-normalize", "--keep-columns", "a, b"])
    assert job.dims == (512, 64) and job.normalize is False and job.keep_columns == ("a", "b")


@pytest.mark.parametrize(
    ("yaml_text", "message"),
    [
        ("max_length: many\n", "max_length must be an integer, got 'many'"),
        ("normalize: 3\n", "normalize must be true or false, got 3"),
        ("dims: 512,abc\n", "dims must hold ints, got 'abc'"),
        ("text_kind: passage\n", "text_kind must be one of ['document', 'query'], got 'passage'"),
        ("poolin: mean\n", "unknown config key(s) ['poolin']"),
        ("replicas: many\n", "replicas must be an integer or one of ['auto'], got 'many'"),
        ("- a\n- b\n", "must hold a mapping"),
    ],
)
def test_bad_values_are_named(tmp_path, yaml_text, message):
    with pytest.raises(ConfigError) as e:
        _load(tmp_path, yaml_text, [])
    assert message in str(e.value)


def test_plan_resolves_resources_from_the_cluster(tiny_bert):
    from pipelines.embed import plan

    cpu = plan(EmbedJobConfig(model=tiny_bert, max_length=32), gpus_in_cluster=0)
    assert (cpu.embed.num_gpus, cpu.embed.replicas, cpu.embed.max_tokens, cpu.embed.num_cpus) == (0, 1, 2048, 0.5)
    gpu = plan(EmbedJobConfig(model=tiny_bert, max_length=32, num_gpus=0.5), gpus_in_cluster=4)
    assert (gpu.embed.num_gpus, gpu.embed.replicas, gpu.embed.max_tokens, gpu.embed.num_cpus) == (0.5, 8, 65536, 1.0)
    assert gpu.tokenize.replicas == 8 and gpu.embed.batch_size == 8192 and cpu.embed.batch_size == 1024
    # GPU: the tokenizer pool starts at one actor per model replica and may grow to 12 per GPU (8 x 0.5 GPU x 12);
    # a fixed pool when asked for; on CPU one, fixed
    assert (gpu.tokenize.max_replicas, cpu.tokenize.replicas, cpu.tokenize.max_replicas) == (48, 1, None)
    fixed = plan(EmbedJobConfig(model=tiny_bert, max_length=32, tokenizer_replicas=3), gpus_in_cluster=4)
    assert (fixed.tokenize.replicas, fixed.tokenize.max_replicas) == (3, None)
    # CPU: one replica per CPU up to four, at most one per 128 KiB of input (the bundled corpus is 398 KB: three),
    # and one tokenizer for them all
    for cpus, replicas in ((1, 1), (2, 2), (3, 3), (16, 3)):
        c = plan(EmbedJobConfig(model=tiny_bert, max_length=32), gpus_in_cluster=0, cpu_nodes=(cpus,))
        assert (c.embed.replicas, c.tokenize.replicas, c.embed.num_gpus) == (replicas, 1, 0)
    from pipelines import defaults

    queries = EmbedJobConfig(model=tiny_bert, input=str(defaults.SAMPLE_QUERIES), id_column="query_id",
                             text_column="query")  # fmt: skip
    assert plan(queries, gpus_in_cluster=0, cpu_nodes=(16,)).embed.replicas == 1  # 12 KB: one call's worth
    # Several CPU nodes: up to four replicas on each, spread by Ray, so the torch threads split a node's cores
    # between its own share of the pool, not the whole pool's.
    from pipelines.runtime import replicas_for, replicas_per_node

    assert replicas_for(None, 0.0, 0, "--replicas", (16.0, 16.0, 2.0)) == 10
    assert replicas_for(None, 0.0, 0, "--replicas", (16.0, 16.0, 2.0), input_bytes=3 * 2**17) == 3
    assert replicas_for(None, 0.0, 0, "--replicas", None) == 1  # nodes not known yet: the plan before Ray starts
    assert (replicas_per_node(10, (16.0, 16.0, 2.0)), replicas_per_node(3, None)) == (4, 3)
    two_nodes = plan(EmbedJobConfig(model=tiny_bert, max_length=32), gpus_in_cluster=0, cpu_nodes=(16.0, 16.0))
    assert (two_nodes.embed.replicas, two_nodes.embed.replicas_per_node) == (3, 2)  # the corpus caps it at 3
    from pipelines.embed import block_mb_for

    assert (block_mb_for(None, 0.0), block_mb_for(None, 0.25), block_mb_for(2.0, 0.0)) == (0.5, 8.0, 2.0)
    unset = plan(EmbedJobConfig(model=tiny_bert, max_length=32), gpus_in_cluster=2)
    assert (unset.embed.num_gpus, unset.embed.replicas) == (1.0, 2)


def test_replicas_auto_follows_the_cluster_and_a_number_is_kept(tmp_path, tiny_bert):
    from pipelines.embed import plan
    from pipelines.mine import MineJobConfig
    from pipelines.score import ScoreJobConfig, teacher_config

    job = _load(tmp_path, f"model: {tiny_bert}\nmax_length: 32\n", ["--replicas", "auto", "--num-gpus", "0.25"])
    assert job.replicas == "auto"
    assert plan(job, gpus_in_cluster=3).embed.replicas == 12  # four replicas on each of 3 GPUs
    tokenize = plan(job, gpus_in_cluster=3).tokenize
    assert (tokenize.replicas, tokenize.max_replicas) == (12, 36)
    cpu = _load(tmp_path, f"model: {tiny_bert}\nmax_length: 32\n", ["--replicas", "auto"])
    assert plan(cpu, gpus_in_cluster=0).embed.replicas == 1  # CPUs not known yet (the plan before Ray starts)
    assert plan(cpu, gpus_in_cluster=0, cpu_nodes=(2,)).embed.replicas == 2
    assert plan(fixed_cpu := EmbedJobConfig(model=tiny_bert, replicas=3), gpus_in_cluster=0,
                cpu_nodes=(16,)).embed.replicas == fixed_cpu.replicas  # fmt: skip
    fixed = _load(tmp_path, f"model: {tiny_bert}\nreplicas: auto\n", ["--replicas", "5"])
    assert fixed.replicas == 5 and plan(fixed, gpus_in_cluster=2).embed.replicas == 5  # the flag beats YAML
    with pytest.raises(ConfigError, match="replicas must be >= 1 or 'auto', got 0"):
        plan(EmbedJobConfig(model=tiny_bert, replicas=0), gpus_in_cluster=0)
    ns = build_parser().parse_args(["mine", "--teacher-replicas", "auto", "--replicas", "2"])
    mine_job = load(MineJobConfig, None, overrides_from(ns, MineJobConfig))
    assert (mine_job.replicas, mine_job.teacher_replicas) == (2, "auto")
    from operators.model import inspect_model

    teacher = ScoreJobConfig(teacher=tiny_bert, num_gpus=0.5, replicas="auto")
    assert teacher_config(teacher, inspect_model(tiny_bert), gpus_in_cluster=4).replicas == 8


def test_plan_takes_sentence_transformers_settings_of_the_default_model(default_model):
    from pipelines.embed import plan

    p = plan(EmbedJobConfig())
    assert p.tokenize.max_length == 256 and p.embed.pooling == "mean" and p.embed.model.hidden_size == 384
    q = plan(EmbedJobConfig(text_kind="query", task="find answers"))
    assert q.tokenize.prompt == "Instruct: find answers\nQuery: {text}"
    assert plan(EmbedJobConfig()).tokenize.prompt is None  # documents unprompted


def test_rows_per_file_targets_128mb_of_vectors_and_at_most_100k_rows(tiny_bert, default_model):
    from pipelines.embed import plan, rows_per_file

    p = plan(EmbedJobConfig(model=default_model))  # 384-d float32: 128 MB is 83,886 rows
    assert rows_per_file(p.embed) == 128 * 2**20 // (4 * 384 + 64)
    p16 = plan(EmbedJobConfig(model=default_model, dims=(384, 256, 128, 64), dtype="float16"))
    assert rows_per_file(p16.embed) == 128 * 2**20 // (2 * 832 + 64)
    # 32-d vectors would make 700k-row files, each buffered whole by its write task: capped
    assert rows_per_file(plan(EmbedJobConfig(model=tiny_bert, max_length=32)).embed) == 100_000


def test_store_limit_per_replica_and_never_under_eight_output_files(tiny_bert, default_model):
    from pipelines.embed import plan, rows_per_file, store_limit

    mb = 2**20
    tiny = plan(EmbedJobConfig(model=tiny_bert, max_length=32, replicas=2), gpus_in_cluster=0).embed
    assert store_limit(tiny, 100_000) == 2 * 128 * mb  # 8 files of 32-d rows are 8 x 100k x 192 B = 147 MB, less
    assert store_limit(tiny, 1_000_000) == 8 * 1_000_000 * (4 * 32 + 64)  # large files: room for 8 of them
    mini = plan(EmbedJobConfig(model=default_model, replicas=1), gpus_in_cluster=0).embed
    assert store_limit(mini, rows_per_file(mini)) == 8 * (128 * mb // (4 * 384 + 64)) * (4 * 384 + 64)  # ~1 GB
    gpu = plan(EmbedJobConfig(model=tiny_bert, max_length=32, num_gpus=0.5), gpus_in_cluster=2).embed
    assert gpu.replicas == 4 and store_limit(gpu, 100_000) == 4 * 1024 * mb


def test_gpus_asked_on_a_cluster_without_gpus_fails_instead_of_hanging(tiny_bert):
    from pipelines.config import ConfigError
    from pipelines.embed import plan

    with pytest.raises(ConfigError, match=r"num_gpus=1(\.0)? per replica, but the Ray cluster has no GPUs"):
        plan(EmbedJobConfig(model=tiny_bert, max_length=32, num_gpus=1), gpus_in_cluster=0)
    # an autoscaling cluster: the user fixes the replica count and the job waits for GPU nodes
    assert (
        plan(EmbedJobConfig(model=tiny_bert, max_length=32, num_gpus=1, replicas=2), gpus_in_cluster=0).embed.replicas
        == 2
    )


def test_teacher_cpu_threads_split_a_node_between_its_replicas_only(tiny_bert):
    """A CPU teacher pool spread over nodes splits each node's cores between the replicas on that node (as the
    embedder); on GPU it does not apply."""
    from operators.model import inspect_model
    from operators.teacher import TeacherConfig
    from pipelines.score import ScoreJobConfig, teacher_config

    info = inspect_model(tiny_bert)
    four = ScoreJobConfig(teacher=tiny_bert, num_gpus=0, replicas=4)
    assert teacher_config(four, info, 0, cpu_nodes=(8.0, 8.0)).replicas_per_node == 2
    assert teacher_config(four, info, 0, cpu_nodes=(8.0, 8.0)).embed_config().replicas_per_node == 2
    assert teacher_config(four, info, 0).replicas_per_node == 4  # nodes not known: all of them share
    assert teacher_config(ScoreJobConfig(teacher=tiny_bert, num_gpus=1), info, 2).replicas_per_node is None
    with pytest.raises(ValueError, match="replicas_per_node must be in 1..replicas"):
        TeacherConfig(model=info, replicas=2, replicas_per_node=3)


def test_score_blocks_follow_the_teacher_device(tiny_cross_encoder):
    """kalm score takes kalm embed's block sizes: about a call of rows per block on CPU, 8 MB on GPU."""
    from pipelines.score import ScoreJobConfig, plan

    def block(gpus: float, **kw):
        return plan(ScoreJobConfig(teacher=tiny_cross_encoder, teacher_kind="cross-encoder", **kw),
                    gpus_in_cluster=gpus).block_mb  # fmt: skip

    assert (block(0), block(2), block(0, block_mb=2.0)) == (0.5, 8.0, 2.0)


def test_each_local_ray_session_gets_its_own_system_config(monkeypatch):
    """ray.init writes the session's spill directory into the _system_config it is given: a second local session
    in the same process (kalm bench runs several) must not inherit the first one's, a directory gone with it."""
    import ray

    from pipelines import runtime

    given = []

    def init(**kwargs):
        cfg = kwargs["_system_config"]
        assert "object_spilling_config" not in cfg, cfg  # what Ray leaves in the dict of the session before
        cfg["object_spilling_config"] = '{"type": "filesystem", "params": {"directory_path": "/tmp/ray/s1"}}'
        given.append(cfg)

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", init)
    monkeypatch.setattr(ray, "shutdown", lambda: None)
    for _ in range(2):
        with runtime.ray_session():
            pass
    assert len(given) == 2 and given[0] is not given[1]
    assert "object_spilling_config" not in runtime.LOCAL_SYSTEM_CONFIG
    assert given[1]["idle_worker_killing_time_threshold_ms"] == runtime.LOCAL_SYSTEM_CONFIG[
        "idle_worker_killing_time_threshold_ms"]  # fmt: skip
