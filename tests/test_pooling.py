"""Pure math against hand computations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from operators.pooling import flatten, l2_normalize, matryoshka, pad_flat, plan_token_batches, pool, select_rows

HIDDEN = torch.tensor(
    [
        [[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]],  # row 0: 2 real tokens, 1 pad
        [[0.0, 1.0], [2.0, 3.0], [4.0, 5.0]],  # row 1: 3 real tokens
    ]
)
MASK = torch.tensor([[1, 1, 0], [1, 1, 1]])


def test_mean_pooling_ignores_padding():
    out = pool(HIDDEN, MASK, "mean")
    assert torch.allclose(out, torch.tensor([[2.0, 3.0], [2.0, 3.0]]))


def test_cls_and_last_pooling():
    assert torch.equal(pool(HIDDEN, MASK, "cls"), torch.tensor([[1.0, 2.0], [0.0, 1.0]]))
    # last real token: position 1 for row 0 (position 2 is padding), position 2 for row 1
    assert torch.equal(pool(HIDDEN, MASK, "last"), torch.tensor([[3.0, 4.0], [4.0, 5.0]]))


def test_pooling_runs_in_float32_from_bf16():
    out = pool(HIDDEN.to(torch.bfloat16), MASK, "mean")
    assert out.dtype == torch.float32


def test_unknown_pooling_names_valid_ones():
    with pytest.raises(ValueError, match=r"pooling must be one of \('mean', 'cls', 'last'\), got 'max'"):
        pool(HIDDEN, MASK, "max")


def test_l2_normalize_hand_values_and_zero_row():
    out = l2_normalize(np.array([[3.0, 4.0], [0.0, 0.0]]))
    assert np.allclose(out, [[0.6, 0.8], [0.0, 0.0]])


def test_matryoshka_takes_prefix_and_renormalises():
    x = np.array([[3.0, 4.0, 12.0]]) / 13.0  # unit norm overall
    out = matryoshka(x, (2, 3))
    assert np.allclose(out[2], [[0.6, 0.8]])  # first 2 comps (3, 4)/13 renormalised to (0.6, 0.8)
    assert np.allclose(out[3], x)
    with pytest.raises(ValueError, match="out of range"):
        matryoshka(x, (4,))


def test_token_batches_hand_example():
    lengths = np.array([5, 50, 10, 40, 3])
    batches = plan_token_batches(lengths, max_tokens=100, max_rows=8)
    # sorted desc: 50(1), 40(3), 10(2), 5(0), 3(4); 100 // 50 = 2 rows; then 100 // 10 = 10 rows -> rest
    assert [b.tolist() for b in batches] == [[1, 3], [2, 0, 4]]


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.integers(min_value=1, max_value=600), min_size=1, max_size=300),
    st.integers(min_value=1, max_value=4096),
    st.integers(min_value=1, max_value=64),
)
def test_token_batches_cover_every_row_once_within_budget(lengths, max_tokens, max_rows):
    lengths = np.array(lengths)
    batches = plan_token_batches(lengths, max_tokens, max_rows)
    flat = np.concatenate(batches)
    assert sorted(flat.tolist()) == list(range(len(lengths)))
    for b in batches:
        assert len(b) <= max_rows
        # padded cost within budget, unless a single row is longer than the whole budget
        assert len(b) * lengths[b].max() <= max_tokens or len(b) == 1


# rows [7, 8, 9], [5], [1, 2] back to back
VALUES = np.array([7, 8, 9, 5, 1, 2], dtype=np.int32)
OFFSETS = np.array([0, 3, 4, 6])


def test_pad_flat_hand_example():
    tokens, lengths = pad_flat(VALUES, OFFSETS, np.array([2, 0]), pad_id=-1)
    assert tokens.tolist() == [[1, 2, -1], [7, 8, 9]] and lengths.tolist() == [2, 3]
    tokens, _ = pad_flat(VALUES, OFFSETS, np.array([1]), pad_id=0, multiple=4)  # rounded up to a multiple of 4
    assert tokens.tolist() == [[5, 0, 0, 0]]


def test_flatten_hand_example():
    values, offsets = flatten([[7, 8, 9], [], (5,)])  # lists, an empty row, any sequence
    assert values.tolist() == [7, 8, 9, 5] and values.dtype == np.int32 and offsets.tolist() == [0, 3, 3, 4]
    values, offsets = flatten([])
    assert values.tolist() == [] and offsets.tolist() == [0]


def test_select_rows_hand_example():
    values, offsets = select_rows(VALUES, OFFSETS, np.array([0, 2]))
    assert values.tolist() == [7, 8, 9, 1, 2] and offsets.tolist() == [0, 3, 5]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(st.integers(0, 1000), min_size=1, max_size=20), min_size=1, max_size=40), st.data())
def test_pad_flat_equals_row_by_row_padding(rows, data):
    """``flatten`` then the vectorised gather gives what padding each row in a loop gives, for any row selection."""
    values, offsets = flatten(rows)
    assert values.tolist() == [t for r in rows for t in r] and np.diff(offsets).tolist() == [len(r) for r in rows]
    pick = np.array(data.draw(st.lists(st.integers(0, len(rows) - 1), min_size=1, max_size=len(rows))))
    tokens, lengths = pad_flat(values, offsets, pick, pad_id=0)
    longest = max(len(rows[i]) for i in pick)
    want = [rows[i] + [0] * (longest - len(rows[i])) for i in pick]  # the loop, row by row
    assert tokens.tolist() == want and lengths.tolist() == [len(rows[i]) for i in pick]
    sub_values, sub_offsets = select_rows(values, offsets, pick)
    assert [sub_values[a:b].tolist() for a, b in zip(sub_offsets[:-1], sub_offsets[1:])] == [rows[i] for i in pick]
