"""Loading Hugging Face models from local folders, the way the embedding and teacher operators need them.

Never reaches a hub: every load is ``local_files_only`` and the folder must exist. Weights load from safetensors
only unless the caller allows pickle files explicitly (a ``pytorch_model.bin`` can run code when unpickled).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from operators.storage import StorageConfig, fetch_folder, is_local

logger = logging.getLogger(__name__)

COMPUTE_DTYPES = ("auto", "float32", "bfloat16", "float16")
ATTN_IMPLEMENTATIONS = ("auto", "sdpa", "flash_attention_2", "eager")
ST_POOLING_KEYS = {
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_cls_token": "cls",
    "pooling_mode_lasttoken": "last",
}


@dataclass(frozen=True)
class ModelInfo:
    """What the driver learns from a model folder's JSON files, without loading weights."""

    path: str
    name: str
    model_type: str
    hidden_size: int
    max_positions: int | None
    st_max_seq_length: int | None  # sentence-transformers' max_seq_length, when the folder is an ST model
    st_pooling: str | None  # sentence-transformers' pooling mode, when it is one we implement
    weight_files: tuple[str, ...]
    source: str | None = None  # the object-storage URI it was fetched from (each node fetches it into its cache)
    storage: StorageConfig | None = None

    def local_path(self) -> str:
        """The folder on this node: ``path`` where it exists (the driver's node), else fetched from ``source``."""
        if self.source is None or Path(self.path).is_dir():
            return self.path
        return fetch_folder(self.source, self.storage)


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    with path.open(encoding="utf-8") as f:
        return json.load(f)


def inspect_model(
    path: str, *, allow_pickle: bool = False, trust_remote_code: bool = False, storage: StorageConfig | None = None
) -> ModelInfo:
    """Read a model folder's config; fail with a clear message if it is not a loadable model folder, or if loading
    it would run code: pickle weights without ``allow_pickle``, the folder's own Python (``auto_map`` for a model
    type transformers does not know) without ``trust_remote_code``.

    ``path``: a local folder, or an object-storage prefix (``s3://bucket/models/x``) fetched once per node into
    the local cache (``storage.fetch_folder``); never a model hub.
    """
    if not is_local(path):
        info = inspect_model(fetch_folder(path, storage), allow_pickle=allow_pickle,
                             trust_remote_code=trust_remote_code)  # fmt: skip
        return dataclasses.replace(info, source=path, storage=storage)
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(
            f"model folder {path!r} does not exist (models load from local folders only, never a hub)"
        )
    cfg = _read_json(root / "config.json")
    if cfg is None:
        raise FileNotFoundError(
            f"model folder {path!r} has no config.json; found {sorted(p.name for p in root.iterdir())}"
        )
    weights = sorted(p.name for p in root.glob("*.safetensors"))
    if not weights:
        pickled = sorted(p.name for p in root.glob("*.bin"))
        if pickled and not allow_pickle:
            raise ValueError(
                f"model folder {path!r} has only pickle weights {pickled}; loading them can run arbitrary code. "
                "Convert them to safetensors, or pass --allow-pickle if you trust the source"
            )
        if not pickled:
            raise FileNotFoundError(f"model folder {path!r} has no *.safetensors weights")
        weights = pickled
    if cfg.get("auto_map") and not trust_remote_code:
        from transformers import CONFIG_MAPPING

        if cfg.get("model_type") not in CONFIG_MAPPING:  # a known type loads with transformers' own code
            raise ValueError(
                f"model folder {path!r} needs its own Python code (auto_map {sorted(cfg['auto_map'].values())}) for "
                f"model type {cfg.get('model_type')!r}; pass --trust-remote-code if you trust the source"
            )
    text_cfg = cfg.get("text_config", cfg)  # multimodal configs (Gemma 3) nest the LM's fields
    hidden = text_cfg.get("hidden_size") or text_cfg.get("d_model") or text_cfg.get("dim")
    if not hidden:
        raise ValueError(f"cannot tell the hidden size of model {path!r} from its config.json")
    st_cfg = _read_json(root / "sentence_bert_config.json") or {}
    st_pool = _read_json(root / "1_Pooling" / "config.json") or {}
    st_pooling = next((mode for key, mode in ST_POOLING_KEYS.items() if st_pool.get(key)), None)
    return ModelInfo(
        path=str(root.resolve()),
        name=cfg.get("_name_or_path") or root.resolve().name,
        model_type=cfg.get("model_type", "unknown"),
        hidden_size=int(hidden),
        max_positions=text_cfg.get("max_position_embeddings"),
        st_max_seq_length=st_cfg.get("max_seq_length"),
        st_pooling=st_pooling,
        weight_files=tuple(weights),
    )


def weights_sha256(info: ModelInfo) -> str:
    """sha256 over the weight files in name order: identifies the exact weights a run used (~1-2 s per GB)."""
    h = hashlib.sha256()
    for name in info.weight_files:
        h.update(name.encode() + b"\0")
        with open(Path(info.local_path()) / name, "rb") as f:
            while chunk := f.read(1 << 22):
                h.update(chunk)
    return h.hexdigest()


def cpu_has_amx_bf16(capabilities: Mapping | None = None) -> bool:
    """Whether this CPU multiplies bf16 matrices in hardware (Intel AMX: Xeon Sapphire Rapids and later).

    ``capabilities``: ``torch.cpu.get_capabilities()`` (what CPUID and the OS allow), asked when None; a torch too old
    to have it answers False. On such a CPU oneDNN runs bf16 matmuls on the AMX tiles: all-MiniLM-L6-v2 embedded
    175-210 rows/s on one core in bf16 against 62-64 in float32, and ``kalm bench`` on 2 cores measured 2.9x
    (issue 9 note). AVX512-BF16 alone (Cooper Lake, AMD Zen 4) and Arm's bf16 were not measured.
    """
    if capabilities is None:
        import torch

        get = getattr(torch.cpu, "get_capabilities", None)
        capabilities = get() if get is not None else {}
    return bool(capabilities.get("amx_bf16"))


def resolve_compute_dtype(name: str, device: str):
    """'auto' means bf16 on CUDA (KaLM's inference dtype) and float32 on CPU: most CPUs have no bf16 matrix unit,
    and float32 gives the same vectors on every CPU. On a CPU with AMX (``cpu_has_amx_bf16``) 'bfloat16' is ~3x
    faster, within cosine 0.999 of float32; it is asked for, not chosen, since a cluster's nodes may differ."""
    import torch

    if name not in COMPUTE_DTYPES:
        raise ValueError(f"compute_dtype must be one of {COMPUTE_DTYPES}, got {name!r}")
    if name == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return getattr(torch, name)


def make_bidirectional(model) -> int:
    """Remove the causal mask of a decoder LM, as KaLM-Embedding V2 does. Returns how many modules were switched.

    Two switches, both needed: ``config.is_causal = False`` makes transformers' mask builder return a padding-only
    (bidirectional) mask; each attention module's ``is_causal`` flag is what SDPA/flash kernels read when the mask
    builder skips the mask (no padding in the batch), which would otherwise silently fall back to causal.
    """
    configs = [model.config] + [getattr(model.config, k) for k in ("text_config",) if hasattr(model.config, k)]
    for cfg in configs:
        cfg.is_causal = False
        if hasattr(cfg, "use_bidirectional_attention"):  # Gemma 3's own switch (EmbeddingGemma)
            cfg.use_bidirectional_attention = True
    layer_types = set(getattr(model.config, "layer_types", None) or [])
    if "sliding_attention" in layer_types and not hasattr(model.config, "use_bidirectional_attention"):
        raise ValueError(
            f"bidirectional attention is not supported for {model.config.model_type} models with sliding-window layers"
        )
    switched = 0
    for module in model.modules():
        if getattr(module, "is_causal", None) is True:
            module.is_causal = False
            switched += 1
    return switched


def attention_candidates(requested: str, device: str, dtype) -> list[str]:
    """Attention implementations to try, best first. ``auto``: flash-attn 2 on CUDA in half precision where the
    package is installed (its varlen kernels skip padded positions), then SDPA, then eager for architectures that
    transformers has no SDPA path for (MPNet...). An explicit choice is kept, with eager as its only fallback."""
    import importlib.util

    import torch

    if requested != "auto":
        return [requested] if requested == "eager" else [requested, "eager"]
    flash = (device.startswith("cuda") and dtype in (torch.bfloat16, torch.float16)
             and importlib.util.find_spec("flash_attn") is not None)  # fmt: skip
    return (["flash_attention_2"] if flash else []) + ["sdpa", "eager"]


def load_model(
    info: ModelInfo,
    *,
    device: str,
    compute_dtype: str = "auto",
    attn_implementation: str = "auto",
    bidirectional: bool = False,
    trust_remote_code: bool = False,
    auto_class: str = "AutoModel",
):
    """Load weights onto ``device`` in eval mode; on CUDA, bf16/fp16 with flash-attn or SDPA
    (``attention_candidates``)."""
    import torch
    import transformers

    dtype = resolve_compute_dtype(compute_dtype, device)
    cls = getattr(transformers, auto_class)
    # transformers renamed torch_dtype to dtype in 4.56; GPU images often carry an older release.
    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    dtype_kw = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"
    kwargs = {
        dtype_kw: dtype,
        "local_files_only": True,
        "use_safetensors": info.weight_files[0].endswith(".safetensors"),
        "trust_remote_code": trust_remote_code,
    }
    path = info.local_path()
    candidates = attention_candidates(attn_implementation, device, dtype)
    for k, attn in enumerate(candidates):
        try:
            model = cls.from_pretrained(path, attn_implementation=attn, **kwargs)
            break
        except (ValueError, ImportError) as e:
            # An architecture without this attention path in transformers (MPNet has no SDPA, many have no
            # flash-attn): its next-best implementation computes the same, slower.
            if k == len(candidates) - 1 or not ("attention" in str(e).lower() or "flash" in str(e).lower()):
                raise
            logger.info("%s: no %s attention (%s); trying %s", info.name, attn, str(e).splitlines()[0],
                        candidates[k + 1])  # fmt: skip
    if bidirectional:
        n = make_bidirectional(model)
        logger.info("bidirectional attention: %d attention modules switched off causal", n)
    model.to(device).eval()
    torch.set_grad_enabled(False)
    return model


def load_tokenizer(info: ModelInfo, *, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(info.local_path(), local_files_only=True, trust_remote_code=trust_remote_code)


def select_device(device: str, num_gpus: float) -> str:
    """'cuda' or 'cpu' for a replica given ``num_gpus`` by Ray. A GPU replica that sees no CUDA device fails:
    a node with a broken driver must not silently run on CPU (logical GPUs in a test cluster say device='cpu')."""
    import torch

    if num_gpus > 0 and device != "cpu" and not torch.cuda.is_available():
        raise RuntimeError(
            "this replica was given a GPU by Ray but torch sees no CUDA device (device='cpu' forces CPU)"
        )
    return "cuda" if device == "cuda" or (device == "auto" and num_gpus > 0 and torch.cuda.is_available()) else "cpu"


def node_cpus(cgroup_cpu_max: str = "/sys/fs/cgroup/cpu.max") -> int:
    """The cores this process may use: its CPU affinity, capped by a cgroup v2 CPU quota (a Kubernetes pod's CPU
    limit). ``os.cpu_count()`` reports the host's cores, so a pod limited to 8 CPUs on a 96-core host would run 96
    torch threads and spend its time switching between them."""
    import os

    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        with open(cgroup_cpu_max) as f:
            quota, period = f.read().split()[:2]
        if quota != "max":
            n = min(n, max(1, -(-int(quota) // int(period))))
    except (OSError, ValueError):
        pass
    return n


def cpu_threads(torch_threads: int | None, replicas: int) -> int:
    """Torch threads of a CPU replica: the node's usable cores (``node_cpus``) split between the replicas that
    share it."""
    return torch_threads or max(1, node_cpus() // replicas)


def to_device(device: str, *arrays: np.ndarray):
    """numpy -> torch on ``device``; on CUDA through pinned memory so the copy overlaps the previous compute."""
    import torch

    out = [torch.from_numpy(a) for a in arrays]
    if device == "cuda":
        out = [t.pin_memory().to(device, non_blocking=True) for t in out]
    return out
