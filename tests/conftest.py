"""Shared fixtures: tiny random models built offline from configs, and one Ray session per test run."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # pipelines/operators import from the repo root, as a Ray job's working_dir does
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Object-storage credentials as a user sets them: in the environment, before Ray starts (its workers inherit them).
# The secret is distinctive so tests can grep every artifact for it. No instance-metadata lookups on a dev box.
TEST_SECRET = "kalm-TEST-secret-8c1f2e0b7a"
os.environ.update(
    AWS_ACCESS_KEY_ID="kalmtestkeyid",
    AWS_SECRET_ACCESS_KEY=TEST_SECRET,
    AWS_DEFAULT_REGION="us-east-1",
    AWS_EC2_METADATA_DISABLED="true",
)
for _var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
    os.environ.pop(_var, None)

WORDS = (
    "the a of to and in is it that for on with as was python list dict string function class module error file "
    "import return value loop object method type data code test run call key set map read write line"
).split()


def make_tokenizer(path: Path, *, kind: str) -> None:
    """A tokenizer built offline with `tokenizers`, saved so AutoTokenizer.from_pretrained loads it.

    kind="bert": word-level, [CLS] text [SEP]. kind="decoder": byte-level BPE trained on a few sentences, no
    special tokens around the text (as Qwen2 encodes plain text); transformers maps a Qwen2 folder to its
    Qwen2Tokenizer, which reads the vocab and merges from tokenizer.json.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
    if kind == "bert":
        vocab = {t: i for i, t in enumerate(specials + WORDS)}
        tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
        )
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]")
    else:
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        )
        sentences = [" ".join(WORDS[i:] + WORDS[:i]) for i in range(len(WORDS))]
        tok.train_from_iterator(sentences, trainer)
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|endoftext|>", eos_token="<|endoftext|>")
    fast.save_pretrained(path)


def _save(model, path: Path) -> str:
    model.save_pretrained(path, safe_serialization=True)
    return str(path)


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> str:
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-bert")
    make_tokenizer(path, kind="bert")
    cfg = BertConfig(
        vocab_size=len(WORDS) + 4,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    return _save(BertModel(cfg).eval(), path)


@pytest.fixture(scope="session")
def tiny_cross_encoder(tmp_path_factory) -> str:
    """A random BertForSequenceClassification (one logit), the shape of an ms-marco cross-encoder."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("tiny-cross")
    make_tokenizer(path, kind="bert")
    cfg = BertConfig(
        vocab_size=len(WORDS) + 4,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        num_labels=1,
    )
    return _save(BertForSequenceClassification(cfg).eval(), path)


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory) -> str:
    import torch
    from transformers import Qwen2Config, Qwen2Model

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-qwen2")
    make_tokenizer(path, kind="decoder")
    cfg = Qwen2Config(
        vocab_size=300,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        pad_token_id=0,
    )
    return _save(Qwen2Model(cfg).eval(), path)


@pytest.fixture(scope="session")
def default_model() -> str:
    from pipelines.defaults import default_student

    return default_student()


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the whole run (start-up costs seconds). 2 logical CPUs, as on CI."""
    import ray

    from pipelines.runtime import init_local_ray

    init_local_ray(address="local", num_cpus=2, log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-compatible server (moto's server mode) on 127.0.0.1 for the whole run. Yields its URL."""
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one log line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.fixture
def s3_bucket(s3_server, request):
    """A fresh bucket per test; yields (endpoint, bucket name, boto3 client)."""
    import re

    import boto3

    client = boto3.client("s3", endpoint_url=s3_server)
    name = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:50].strip("-")
    client.create_bucket(Bucket=name)
    return s3_server, name, client


def _running(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster():
    """A head with the dashboard (2 CPUs) and two worker nodes with 2 CPUs and one logical GPU each, on 127.0.0.1;
    one per test module. Shut down in ``finally``; the teardown fails if any of its processes is left."""
    from ray.cluster_utils import Cluster

    # The job's driver runs `python -m pipelines.cli` in the head's environment: this virtualenv's python first.
    mp = pytest.MonkeyPatch()
    mp.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    mp.delenv("RAY_ADDRESS", raising=False)
    dash = _free_port()
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": True,
                                                      "dashboard_host": "127.0.0.1", "dashboard_port": dash,
                                                      # the shared test Ray's agent holds the default port
                                                      "dashboard_agent_listen_port": _free_port(),
                                                      "resources": {"head": 1},
                                                      # a killed node is declared dead in ~3 s, not ~15 s
                                                      "_system_config": {"health_check_failure_threshold": 3,
                                                                         "health_check_period_ms": 1000}})  # fmt: skip
    try:
        gpu_nodes = [c.add_node(num_cpus=2, num_gpus=1, resources={"gpu_node": 1}) for _ in range(2)]
        c.wait_for_nodes()
        yield {"cluster": c, "dashboard": f"http://127.0.0.1:{dash}", "gpu_nodes": gpu_nodes}
    finally:
        pids = [i.process.pid for nd in c.list_all_nodes() for infos in nd.all_processes.values() for i in infos]
        c.shutdown()
        mp.undo()
    left = [p for p in pids if _running(p)]
    assert pids and not left, f"processes of the test cluster still running: {left}"  # no raylet or GCS left
