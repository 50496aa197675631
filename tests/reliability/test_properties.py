"""Properties of row validation over random rows (hypothesis): every row gets exactly one outcome, the reason an
independent reading of the rules gives, and each valid id is owned by exactly one row however the rows are split
into batches and however often a batch is retried. (Negative selection's properties: tests/test_negatives.py.)"""

from __future__ import annotations

import math

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from operators.validate import IdRegistry, id_key, reject_reasons, row_owner

ids = st.one_of(st.none(), st.just(float("nan")), st.integers(-3, 3), st.sampled_from(["a", "b", "1", "", " "]))
texts = st.one_of(
    st.none(),
    st.just(float("nan")),
    st.integers(),
    st.lists(st.text(max_size=3), max_size=2),
    st.text(alphabet=" \t\n", max_size=3),
    st.text(max_size=20),
)


def _expected(rid, text) -> str:
    """The rules as the README states them, written out independently of reject_reasons."""
    if rid is None or (isinstance(rid, float) and math.isnan(rid)):
        return "id_null"
    if text is None or (isinstance(text, float) and math.isnan(text)):
        return "text_null"
    if not isinstance(text, str):
        return "text_not_string"
    return "" if text.strip() else "text_empty"


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(ids, texts), max_size=40))
def test_every_row_gets_the_reason_the_rules_give(rows):
    got = reject_reasons(np.array([r[0] for r in rows], dtype=object), np.array([r[1] for r in rows], dtype=object))
    assert got.tolist() == [_expected(*r) for r in rows]


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.one_of(st.integers(0, 5), st.sampled_from(["0", "1", "x", "y"])), min_size=1, max_size=30),
    st.data(),
)
def test_each_id_is_owned_by_exactly_one_row_whatever_the_batches_and_retries(row_ids, data):
    registry = [IdRegistry(), IdRegistry()]  # two shards, as the pipeline spreads ids over several
    cuts = sorted(data.draw(st.sets(st.integers(1, len(row_ids) - 1), max_size=5)) if len(row_ids) > 1 else [])
    batches = [list(range(a, b)) for a, b in zip([0, *cuts], [*cuts, len(row_ids)])]
    owner: dict[int, bool] = {}
    for batch in batches:
        keys = [id_key(row_ids[i]) for i in batch]
        owners = [row_owner("file.parquet", i) for i in batch]
        answers = None
        for _ in range(data.draw(st.integers(1, 3))):  # a retried task claims the same rows again
            got = np.zeros(len(batch), dtype=bool)
            for s, reg in enumerate(registry):
                sel = [j for j, k in enumerate(keys) if k[0] % 2 == s]
                if sel:
                    got[sel] = reg.claim([keys[j] for j in sel], [owners[j] for j in sel])
            assert answers is None or got.tolist() == answers  # a retry gets the same answer
            answers = got.tolist()
        owner.update(zip(batch, answers))
    for rid in set(map(repr, row_ids)):  # 1 and "1" are different ids
        rows = [i for i, x in enumerate(row_ids) if repr(x) == rid]
        assert [i for i in rows if owner[i]] == rows[:1]  # the first row with the id owns it, no other


@settings(max_examples=300, deadline=None)
@given(st.lists(st.lists(st.tuples(st.integers(0, 30), st.integers(0, 3)), max_size=12), max_size=15),
       st.lists(st.integers(0, 30), max_size=6))  # fmt: skip
def test_compact_registry_answers_like_a_dict(calls, preloaded):
    """The sorted-array registry against the obvious dict model, with keys that share their high 64 bits (the
    rare case its lookup resolves by the low word): every claim answered the same, every id held once."""
    from operators.validate import COMMITTED, IdRegistry

    def key(k: int) -> bytes:  # ids 0..30 over 4 high words: many share a high word, differ in the low one
        return (k % 4).to_bytes(8, "big") + k.to_bytes(8, "big")

    reg, model = IdRegistry(), {}
    reg.preload([key(k) for k in preloaded])
    for k in preloaded:
        model.setdefault(key(k), COMMITTED)
    for call in calls:
        keys = [key(k) for k, _ in call]
        owners = [f"row-{o}".encode().ljust(16, b"-") for _, o in call]
        want = [model.setdefault(k, o) == o for k, o in zip(keys, owners)]
        assert reg.claim(keys, owners).tolist() == want
    assert reg.size() == len(model)
