"""Negative-selection rules against hand-built score lists, properties over random ones (hypothesis), and the
exact merge of per-shard top-k lists against a single exact search."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from operators.negatives import SelectConfig, merge_topk, select_negatives


def _select(scores, *, pos_ids=(), pos_scores=(), **cfg):
    ids = [f"d{i}" for i in range(len(scores))]
    sel = select_negatives(ids, np.array(scores), positive_ids=set(pos_ids), positive_scores=np.array(pos_scores),
                           cfg=SelectConfig(**cfg), query_id="q")  # fmt: skip
    return [ids[i] for i in sel.chosen], sel


def test_top_window_skips_positives_and_range_min():
    got, sel = _select([0.9, 0.8, 0.7, 0.6, 0.5], pos_ids={"d1"}, pos_scores=[0.8], num_negatives=2, range_min=1)
    # survivors by score: d0, d2, d3, d4 -> skip the first -> d2, d3
    assert got == ["d2", "d3"] and sel.removed == {"positive_id": 1}


def test_absolute_margin_against_the_lowest_positive():
    # positives score 0.9 and 0.6: the margin is measured from 0.6; drop if neg + 0.1 > 0.6, i.e. neg > 0.5
    got, sel = _select([0.95, 0.55, 0.5, 0.45, 0.2], pos_scores=[0.9, 0.6], num_negatives=3, absolute_margin=0.1)
    assert got == ["d2", "d3", "d4"] and sel.removed == {"absolute_margin": 2}


def test_relative_margin_is_correct_for_negative_scores():
    # pos = -0.5: threshold = -0.5 - 0.5 * 0.1 = -0.55; keep neg <= -0.55 (a (1 - m) * pos rule would give -0.45)
    got, sel = _select([-0.4, -0.5, -0.54, -0.56, -0.9], pos_scores=[-0.5], num_negatives=2, relative_margin=0.1)
    assert got == ["d3", "d4"] and sel.removed == {"relative_margin": 3}
    got, _ = _select([0.9, 0.76, 0.7], pos_scores=[0.8], num_negatives=1, relative_margin=0.05)  # keep <= 0.76
    assert got == ["d1"]


def test_min_max_score_and_counts_by_first_rule():
    got, sel = _select([0.99, 0.8, 0.5, 0.1, 0.05], num_negatives=2, max_score=0.9, min_score=0.2)
    assert got == ["d1", "d2"] and sel.removed == {"max_score": 1, "min_score": 2}


def test_text_rules_drop_positive_text_query_text_and_duplicates():
    ids = ["a", "b", "c", "d", "e"]
    texts = ["The  answer", "the answer", "What is X?", "other", "OTHER "]
    sel = select_negatives(ids, np.array([0.9, 0.8, 0.7, 0.6, 0.5]), positive_ids={"p"},
                           positive_scores=np.array([0.95]), positive_texts=["the answer"], query_text="what is x?",
                           cand_texts=texts, cfg=SelectConfig(num_negatives=3), query_id="q")  # fmt: skip
    assert [ids[i] for i in sel.chosen] == ["d"]
    assert sel.removed == {"positive_text": 2, "query_text": 1, "duplicate_text": 1} and sel.short == 2


def test_ranking_consistency_drops_the_query():
    _, sel = _select([0.9, 0.8, 0.7, 0.6], pos_ids={"d3"}, pos_scores=[0.6], num_negatives=1, consistency_rank=3)
    assert sel.dropped == "ranking_consistency" and len(sel.chosen) == 0  # 3 candidates rank above the positive
    got, sel = _select([0.9, 0.8, 0.7, 0.6], pos_ids={"d2"}, pos_scores=[0.7], num_negatives=1, consistency_rank=3)
    assert not sel.dropped and got == ["d0"]


def test_too_few_keep_drop_pad():
    kw = dict(pos_scores=[0.5], num_negatives=3, range_max=3, absolute_margin=0.0)
    got, sel = _select([0.9, 0.4, 0.3, 0.2, 0.1], too_few="keep", **kw)  # window over survivors: d1 d2 d3
    assert got == ["d1", "d2", "d3"] and sel.short == 0
    got, sel = _select([0.9, 0.6, 0.4, 0.3], too_few="keep", **kw)
    assert got == ["d2", "d3"] and sel.short == 1
    _, sel = _select([0.9, 0.6, 0.4, 0.3], too_few="drop", **kw)
    assert sel.dropped == "too_few_negatives"
    got, sel = _select([0.9, 0.4, 0.3], too_few="pad", pos_scores=[0.5], num_negatives=2, range_min=1, range_max=3,
                       absolute_margin=0.0)  # fmt: skip
    assert got == ["d1", "d2"] and sel.padded == 1 and sel.short == 0  # window held d2; d1 padded from outside


def test_random_sampling_is_seeded_per_query():
    scores = np.linspace(0.9, 0.1, 30)
    ids = [f"d{i}" for i in range(30)]
    cfg = SelectConfig(num_negatives=4, range_max=30, sampling="random", seed=7)
    a = select_negatives(ids, scores, positive_ids=set(), positive_scores=np.array([]), cfg=cfg, query_id="q1")
    b = select_negatives(ids, scores, positive_ids=set(), positive_scores=np.array([]), cfg=cfg, query_id="q1")
    c = select_negatives(ids, scores, positive_ids=set(), positive_scores=np.array([]), cfg=cfg, query_id="q2")
    assert a.chosen.tolist() == b.chosen.tolist() != c.chosen.tolist()
    assert list(scores[a.chosen]) == sorted(scores[a.chosen], reverse=True)


def test_config_errors_name_the_problem():
    with pytest.raises(ValueError, match="sampling must be one of"):
        SelectConfig(sampling="best")
    with pytest.raises(ValueError, match="fewer than num_negatives"):
        SelectConfig(num_negatives=5, range_min=10, range_max=12)


@settings(max_examples=200, deadline=None)
@given(
    scores=st.lists(st.floats(-1, 1, allow_nan=False), min_size=1, max_size=40),
    n_pos=st.integers(0, 3),
    num=st.integers(1, 5),
    range_min=st.integers(0, 3),
    margin=st.one_of(st.none(), st.floats(0, 0.5)),
    rel=st.one_of(st.none(), st.floats(0, 0.5)),
    max_score=st.one_of(st.none(), st.floats(-1, 1)),
    sampling=st.sampled_from(["top", "random"]),
)
def test_selection_properties(scores, n_pos, num, range_min, margin, rel, max_score, sampling):
    scores = np.array(sorted(scores, reverse=True))
    ids = list(range(len(scores)))
    pos_ids = set(ids[:n_pos])
    pos_scores = scores[:n_pos]
    cfg = SelectConfig(num_negatives=num, range_min=range_min, absolute_margin=margin, relative_margin=rel,
                       max_score=max_score, sampling=sampling)  # fmt: skip
    sel = select_negatives(ids, scores, positive_ids=pos_ids, positive_scores=pos_scores, cfg=cfg, query_id=1)
    chosen = sel.chosen.tolist()
    assert len(chosen) <= num and len(set(chosen)) == len(chosen) and not pos_ids & set(chosen)
    assert list(scores[chosen]) == sorted(scores[chosen], reverse=True)
    for i in chosen:  # every chosen negative passes every rule
        if n_pos and margin is not None:
            assert scores[i] + margin <= pos_scores.min()
        if n_pos and rel is not None:
            assert scores[i] <= pos_scores.min() - abs(pos_scores.min()) * rel
        if max_score is not None:
            assert scores[i] <= max_score
    survivors = len(scores) - sum(sel.removed.values())
    assert len(chosen) == min(num, max(0, min(survivors, cfg.window_end()) - range_min))  # top-up to the window
    assert sel.short == num - len(chosen)


@given(
    n=st.integers(1, 60),
    shards=st.integers(1, 4),
    k=st.integers(1, 10),
    q=st.integers(1, 4),
    seed=st.integers(0, 10_000),
)
@settings(max_examples=100, deadline=None)
def test_merge_topk_equals_single_exact_search(n, shards, k, q, seed):
    rng = np.random.default_rng(seed)
    scores = np.round(rng.normal(size=(q, n)), 1)  # rounded: ties happen, and must break the same way
    ids = np.arange(n)
    parts = np.array_split(rng.permutation(n), shards)
    shard_scores, shard_ids = [], []
    for part in parts:
        part = np.sort(part)
        kk = min(k, len(part))
        order = np.lexsort((np.broadcast_to(part, (q, len(part))), -scores[:, part]), axis=1)[:, :kk]
        shard_scores.append(np.take_along_axis(scores[:, part], order, axis=1))
        shard_ids.append(part[order])
    got_scores, got_ids = merge_topk(shard_scores, shard_ids, k)
    order = np.lexsort((np.broadcast_to(ids, (q, n)), -scores), axis=1)[:, :k]  # one exact search over all
    want_ids = np.pad(ids[order], ((0, 0), (0, max(0, k - n))), constant_values=-1)
    assert np.array_equal(got_ids, want_ids)
    assert np.allclose(got_scores[:, : min(k, n)], np.take_along_axis(scores, order, axis=1))
