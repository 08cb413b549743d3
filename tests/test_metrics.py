"""fastap.metrics: exact AP, embedding retrieval metrics and the revisited Oxford/Paris protocol,
checked against hand-computed values, brute-force enumeration of tie orders, outside oracles
(scikit-learn, pytorch-metric-learning), and straightforward
loop implementations of the definitions."""

from __future__ import annotations

import itertools
import math
from fractions import Fraction

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import fastap
from fastap.metrics import TIES, average_precision, retrieval_metrics, revisited_map

# --------------------------------------------------------------------------------------------
# helpers: metrics of one explicit ranking, and brute force over the orders of tied entries
# --------------------------------------------------------------------------------------------


def ranking_metrics(rel: list[bool], ks=()) -> tuple[float, list[float], float]:
    """(AP, [recall@k], mAP@R) of one ranking given as its relevance list, best first."""
    npos = sum(rel)
    hits, ap, ap_r = 0, 0.0, 0.0
    for i, x in enumerate(rel, 1):
        if x:
            hits += 1
            ap += hits / i
            if i <= npos:
                ap_r += hits / i
    recalls = [float(any(rel[:k])) for k in ks]
    return ap / max(npos, 1), recalls, ap_r / max(npos, 1)


def tie_orders(scores: list[float]):
    """All orders of the indices that sort the scores in non-increasing order."""
    for perm in itertools.permutations(range(len(scores))):
        if all(scores[perm[a]] >= scores[perm[a + 1]] for a in range(len(perm) - 1)):
            yield perm


def brute_force(scores: list[float], rel: list[bool], ks=()) -> dict[str, tuple]:
    """Per tie rule, (AP, [recall@k], mAP@R): the mean over all tie orders ("average"), the
    minimum ("pessimistic") and the maximum ("optimistic"). All three metrics only grow when a
    positive moves ahead of a negative, so min and max are the pessimistic and optimistic
    orders."""
    results = [ranking_metrics([rel[j] for j in p], ks) for p in tie_orders(scores)]
    aps = [r[0] for r in results]
    recalls = [[r[1][j] for r in results] for j in range(len(ks))]
    ap_rs = [r[2] for r in results]
    return {
        "average": (
            sum(aps) / len(aps),
            [sum(v) / len(v) for v in recalls],
            sum(ap_rs) / len(ap_rs),
        ),
        "pessimistic": (min(aps), [min(v) for v in recalls], min(ap_rs)),
        "optimistic": (max(aps), [max(v) for v in recalls], max(ap_rs)),
    }


# --------------------------------------------------------------------------------------------
# 1. average_precision
# --------------------------------------------------------------------------------------------


def test_ap_hand_computed():
    scores = torch.tensor([[0.9, 0.8, 0.7, 0.6, 0.5]])
    rel = torch.tensor([[1, 0, 1, 0, 1]])
    # positives at ranks 1, 3, 5: (1/1 + 2/3 + 3/5) / 3 = 34/45
    assert average_precision(scores, rel).item() == pytest.approx(34 / 45, abs=1e-12)
    # the same ranking with the columns shuffled
    perm = torch.tensor([3, 0, 4, 2, 1])
    assert average_precision(scores[:, perm], rel[:, perm]).item() == pytest.approx(34 / 45)
    # ignoring the negative at rank 2: P P N P -> (1 + 2/2 + 3/4) / 3 = 11/12
    ignore = torch.tensor([[0, 1, 0, 0, 0]], dtype=torch.bool)
    assert average_precision(scores, rel, ignore).item() == pytest.approx(11 / 12)
    # ignoring the positive at rank 3: P N N P -> (1 + 2/4) / 2 = 3/4
    ignore = torch.tensor([[0, 0, 1, 0, 0]], dtype=torch.bool)
    assert average_precision(scores, rel, ignore).item() == pytest.approx(3 / 4)


def test_ap_query_without_positives_is_zero_and_flagged():
    scores = torch.tensor([[0.3, 0.2, 0.1], [0.1, 0.2, 0.3], [0.5, 0.4, 0.6], [0.5, 0.4, 0.6]])
    rel = torch.tensor([[0, 1, 1], [0, 0, 0], [1, 0, 0], [0, 1, 0]], dtype=torch.bool)
    ignore = torch.tensor([[0, 0, 0], [0, 0, 0], [1, 0, 0], [0, 0, 0]], dtype=torch.bool)
    ap, valid = average_precision(scores, rel, ignore, return_valid=True)
    # row 0: N P P -> (1/2 + 2/3) / 2 = 7/12; row 1: no positive; row 2: its positive ignored;
    # row 3: its one positive at rank 3 -> 1/3
    assert ap.tolist() == pytest.approx([7 / 12, 0.0, 0.0, 1 / 3])
    assert valid.tolist() == [True, False, False, True]
    assert ap.dtype == torch.float64
    assert torch.equal(average_precision(scores, rel, ignore), ap)


def test_ap_ties_hand_computed():
    # one tie group of 4 with 2 positives: the 6 placements of the positives give
    # APs 1, 5/6, 3/4, 7/12, 1/2, 5/12 -> mean 49/72; worst 5/12; best 1
    scores = torch.ones(1, 4)
    rel = torch.tensor([[1, 0, 0, 1]])
    assert average_precision(scores, rel).item() == pytest.approx(49 / 72, abs=1e-12)
    assert average_precision(scores, rel, ties="pessimistic").item() == pytest.approx(5 / 12)
    assert average_precision(scores, rel, ties="optimistic").item() == pytest.approx(1.0)


def closed_form_group_contribution(c: int, cp: int, before: int, before_pos: int) -> Fraction:
    """The stated closed form: the expected sum of the precisions at the positives of a tie group
    of c entries with cp positives, after `before` entries with `before_pos` positives."""
    if c == 1:
        return Fraction(cp * (before_pos + 1), before + 1)
    return Fraction(cp, c) * sum(
        (before_pos + 1 + Fraction((i - 1) * (cp - 1), c - 1)) / (before + i)
        for i in range(1, c + 1)
    )


@pytest.mark.parametrize(
    ("c", "cp", "before", "before_pos"),
    [(1, 1, 0, 0), (1, 1, 3, 2), (2, 1, 1, 1), (3, 2, 2, 0), (4, 4, 1, 1), (5, 2, 2, 1)],
)
def test_tie_group_closed_form_matches_enumeration(c, cp, before, before_pos):
    """Derivation check: the closed form equals the exact mean over all orders of the group
    (computed with fractions), and average_precision equals it."""
    group = [True] * cp + [False] * (c - cp)
    orders = list(itertools.permutations(group))
    total = Fraction(0)
    for order in orders:
        hits = before_pos
        for i, x in enumerate(order, 1):
            if x:
                hits += 1
                total += Fraction(hits, before + i)
    expected = total / len(orders)
    assert closed_form_group_contribution(c, cp, before, before_pos) == expected
    # the same through average_precision: `before` distinct higher scores, then the group
    prefix_rel = [True] * before_pos + [False] * (before - before_pos)
    scores = torch.tensor([[float(10 + before - j) for j in range(before)] + [1.0] * c])
    rel = torch.tensor([prefix_rel + group])
    # the prefix positives hold ranks 1..before_pos: precision 1 each
    ap = average_precision(scores, rel).item()
    assert ap == pytest.approx(float((before_pos + expected) / (before_pos + cp)), abs=1e-12)


def test_ties_match_brute_force_enumeration():
    gen = torch.Generator().manual_seed(0)
    for _ in range(60):
        m = int(torch.randint(1, 8, (1,), generator=gen))
        scores = torch.randint(0, 3, (3, m), generator=gen).double()  # many ties
        rel = torch.rand(3, m, generator=gen) < 0.5
        ignore = torch.rand(3, m, generator=gen) < 0.2
        got = {t: average_precision(scores, rel, ignore, ties=t) for t in TIES}
        for row in range(3):
            keep = [j for j in range(m) if not ignore[row, j]]
            row_rel = [bool(rel[row, j]) for j in keep]
            if not any(row_rel):
                assert all(got[t][row].item() == 0.0 for t in TIES)
                continue
            expected = brute_force([float(scores[row, j]) for j in keep], row_rel)
            for t in TIES:
                assert got[t][row].item() == pytest.approx(expected[t][0], abs=1e-12)
        assert bool((got["pessimistic"] <= got["average"] + 1e-12).all())
        assert bool((got["average"] <= got["optimistic"] + 1e-12).all())


# Score levels of the random problems: few, so that ties are common, with the infinities.
FLOAT_LEVELS = (-math.inf, -1.5, 0.0, 0.25, 2.0, math.inf)
INT_LEVELS = (-3, 0, 1, 7)


@given(st.data())
def test_average_precision_matches_enumeration_on_random_problems(data):
    """Small random problems against the enumeration of their tie orders: few score levels (ties
    everywhere, infinities), every score dtype, relevance as bool or 0/1 numbers, an ignore mask
    or none, empty rows, non-contiguous views and any chunk size."""
    n, m = data.draw(st.integers(1, 4)), data.draw(st.integers(0, 7))
    dtype = data.draw(
        st.sampled_from([torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64])
    )
    pool = FLOAT_LEVELS if dtype.is_floating_point else INT_LEVELS
    levels = data.draw(st.lists(st.sampled_from(pool), min_size=1, max_size=4, unique=True))
    values = data.draw(st.lists(st.sampled_from(levels), min_size=n * m, max_size=n * m))
    positive = data.draw(st.lists(st.booleans(), min_size=n * m, max_size=n * m))
    ignored = data.draw(st.none() | st.lists(st.booleans(), min_size=n * m, max_size=n * m))
    transposed = data.draw(st.booleans())

    def matrix(flat, dtype):  # [n, m]; a transposed view of an [m, n] tensor if transposed
        if transposed:
            return torch.tensor(flat, dtype=dtype).reshape(m, n).T
        return torch.tensor(flat, dtype=dtype).reshape(n, m)

    scores = matrix(values, dtype)
    relevance = matrix(positive, data.draw(st.sampled_from([torch.bool, torch.float32, dtype])))
    ignore = None if ignored is None else matrix(ignored, torch.bool)
    chunk = data.draw(st.none() | st.integers(1, 4))
    for t in TIES:
        ap, valid = average_precision(
            scores, relevance, ignore, ties=t, return_valid=True, chunk_size=chunk
        )
        assert ap.dtype == torch.float64 and ap.shape == valid.shape == (n,)
        for row in range(n):
            keep = [j for j in range(m) if ignore is None or not ignore[row, j]]
            row_rel = [bool(relevance[row, j]) for j in keep]
            assert bool(valid[row]) == any(row_rel)
            if not any(row_rel):
                assert ap[row].item() == 0.0
                continue
            expected = brute_force([float(scores[row, j]) for j in keep], row_rel)[t][0]
            assert ap[row].item() == pytest.approx(expected, abs=1e-12), (t, row)


def test_no_ties_all_rules_equal_plain_ap():
    gen = torch.Generator().manual_seed(1)
    scores = torch.randn(7, 40, generator=gen)
    rel = torch.rand(7, 40, generator=gen) < 0.3
    expected = []
    for row in range(7):
        order = torch.argsort(scores[row], descending=True)
        expected.append(ranking_metrics(rel[row, order].tolist())[0])
    for t in TIES:
        assert average_precision(scores, rel, ties=t).tolist() == pytest.approx(expected, abs=1e-12)


def test_scikit_learn_agrees():
    # An outside oracle: scikit-learn's average_precision_score is the plain AP without ties; in a
    # tie group it gives every positive the precision at the group's end, never below the
    # pessimistic order (not bounded by the optimistic one: see the next test).
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    gen = torch.Generator().manual_seed(3)
    rel = torch.rand(9, 57, generator=gen) < 0.3
    rel[:, 0] = True
    for scores, tied in ((torch.rand(9, 57, generator=gen, dtype=torch.float64), False),
                         (torch.randint(0, 6, (9, 57), generator=gen).double(), True)):  # fmt: skip
        theirs = torch.tensor(
            [sklearn_metrics.average_precision_score(rel[i].numpy(), scores[i].numpy())
             for i in range(9)], dtype=torch.float64,
        )  # fmt: skip
        ours = {t: average_precision(scores, rel, ties=t) for t in TIES}
        if not tied:
            for t in TIES:
                torch.testing.assert_close(ours[t], theirs, rtol=0, atol=1e-12)
        else:
            assert bool((ours["pessimistic"] <= theirs + 1e-12).all())
            assert not torch.allclose(ours["average"], theirs)  # a different rule


def test_ap_chunking_and_dtypes_do_not_change_the_result():
    gen = torch.Generator().manual_seed(2)
    scores = torch.randint(0, 5, (11, 9), generator=gen).float()
    rel = (torch.rand(11, 9, generator=gen) < 0.4).float()  # 0/1 floats are accepted
    ignore = torch.rand(11, 9, generator=gen) < 0.1
    full = average_precision(scores, rel, ignore)
    for chunk in (1, 2, 4, 11, 100):
        assert torch.allclose(average_precision(scores, rel, ignore, chunk_size=chunk), full)
    assert torch.allclose(average_precision(scores.double(), rel.bool(), ignore), full)
    assert torch.allclose(average_precision(scores.long(), rel.int(), ignore.int()), full)


def test_ap_infinite_scores_and_empty_database():
    scores = torch.tensor([[math.inf, 1.0, -math.inf, -math.inf]])
    rel = torch.tensor([[0, 1, 1, 0]])
    # N P {P, N tied at -inf}: average = (1/2 + E[precision of the tied positive]) / 2 with
    # E = 1/2 * 2/3 + 1/2 * 2/4 = 7/12 -> (1/2 + 7/12) / 2 = 13/24
    assert average_precision(scores, rel).item() == pytest.approx(13 / 24)
    ap, valid = average_precision(torch.zeros(3, 0), torch.zeros(3, 0), return_valid=True)
    assert ap.tolist() == [0.0, 0.0, 0.0] and valid.tolist() == [False, False, False]


# --------------------------------------------------------------------------------------------
# 2. retrieval_metrics
# --------------------------------------------------------------------------------------------


def reference_retrieval(queries, database, labels, ref_labels, ks, exclude_self):
    """The metrics from the full score matrix, one query at a time (scores without ties)."""
    scores = F.normalize(queries.double(), dim=1) @ F.normalize(database.double(), dim=1).T
    sums = {"map": 0.0, "map@r": 0.0, **{f"recall@{k}": 0.0 for k in ks}}
    count = 0
    for i in range(scores.shape[0]):
        cols = [j for j in range(scores.shape[1]) if not (exclude_self and j == i)]
        cols.sort(key=lambda j: -float(scores[i, j]))
        rel = [bool(ref_labels[j] == labels[i]) for j in cols]
        if not any(rel):
            continue
        count += 1
        ap, recalls, ap_r = ranking_metrics(rel, ks)
        sums["map"] += ap
        sums["map@r"] += ap_r
        for k, r in zip(ks, recalls):
            sums[f"recall@{k}"] += r
    return {key: value / count for key, value in sums.items()}, count


def assert_metrics_close(got: dict, expected: dict, count: int, tol: float = 1e-10):
    assert got["num_queries"] == count
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=tol), key


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_retrieval_matches_full_matrix_reference(seed):
    gen = torch.Generator().manual_seed(seed)
    n, m, d = 13, 17, 5
    queries = torch.randn(n, d, generator=gen, dtype=torch.float64)
    database = torch.randn(m, d, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, 4, (n,), generator=gen)
    ref_labels = torch.randint(0, 4, (m,), generator=gen)
    ks = (1, 3, 5)
    exp_db, cnt_db = reference_retrieval(queries, database, labels, ref_labels, ks, False)
    exp_self, cnt_self = reference_retrieval(queries, queries, labels, labels, ks, True)
    exp_incl, cnt_incl = reference_retrieval(queries, queries, labels, labels, ks, False)
    for chunk in (None, 1, 2, 4, 5, 13, 50):
        got = retrieval_metrics(
            queries, database, labels=labels, ref_labels=ref_labels, ks=ks, chunk_size=chunk
        )
        assert_metrics_close(got, exp_db, cnt_db)
        # database=None: the queries are the database, self-matches excluded by default
        got = retrieval_metrics(queries, labels=labels, ks=ks, chunk_size=chunk)
        assert_metrics_close(got, exp_self, cnt_self)
        got = retrieval_metrics(
            queries,
            queries,
            labels=labels,
            ref_labels=labels,
            ks=ks,
            chunk_size=chunk,
            exclude_self=True,
        )
        assert_metrics_close(got, exp_self, cnt_self)
        # recall alone takes the torch.topk path instead of the full sort
        got = retrieval_metrics(queries, labels=labels, ks=ks, chunk_size=chunk, metrics="recall")
        recalls = {key: v for key, v in exp_self.items() if key.startswith("recall")}
        assert_metrics_close(got, recalls, cnt_self)
        assert set(got) == {*recalls, "num_queries"}
        got = retrieval_metrics(queries, labels=labels, ks=ks, chunk_size=chunk, exclude_self=False)
        assert_metrics_close(got, exp_incl, cnt_incl)
        # without ties every tie rule gives the same
        for t in ("pessimistic", "optimistic"):
            got = retrieval_metrics(queries, labels=labels, ks=ks, chunk_size=chunk, ties=t)
            assert_metrics_close(got, exp_self, cnt_self)


def test_retrieval_float32_and_metric_selection():
    gen = torch.Generator().manual_seed(3)
    queries = torch.randn(9, 4, generator=gen)
    labels = torch.randint(0, 3, (9,), generator=gen)
    expected, count = reference_retrieval(queries, queries, labels, labels, (1, 2), True)
    got = retrieval_metrics(queries, labels=labels, ks=(1, 2), chunk_size=4)
    assert_metrics_close(got, expected, count, tol=1e-6)
    half = queries.half()
    expected_half, _ = reference_retrieval(half, half, labels, labels, (2,), True)
    only = retrieval_metrics(half, labels=labels, ks=(2,), metrics=("recall",))
    assert list(only) == ["recall@2", "num_queries"]
    assert only["recall@2"] == pytest.approx(expected_half["recall@2"], abs=1e-6)
    only = retrieval_metrics(queries, labels=labels, metrics="map_at_r", chunk_size=3)
    assert list(only) == ["map@r", "num_queries"]
    assert only["map@r"] == pytest.approx(expected["map@r"], abs=1e-6)


def test_retrieval_float64_scores_resolve_what_float32_ties():
    # cos(q, a) = 1 - 5e-15 > cos(q, b) = 1 - 2e-14 in float64; in float32 both are 1, a tie.
    # Float64 embeddings (either set) are scored in float64: negative a first, then positives b
    # and c: AP (1/2 + 2/3) / 2 = 7/12, recall@1 = 0, mAP@R (R = 2) = (1/2) / 2.
    q = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    db = torch.tensor([[1.0, 1e-7], [1.0, 2e-7], [0.0, 1.0]], dtype=torch.float64)
    labels, ref_labels = torch.tensor([0]), torch.tensor([1, 0, 0])
    for queries, database in ((q, db), (q.float(), db), (q, db.float())):
        got = retrieval_metrics(queries, database, labels=labels, ref_labels=ref_labels, ks=(1,))
        assert got["map"] == pytest.approx(7 / 12, abs=1e-15)
        assert got["recall@1"] == 0.0
        assert got["map@r"] == pytest.approx(1 / 4, abs=1e-15)
    # The same in float32: a and b tie (average over their orders).
    got = retrieval_metrics(q.float(), db.float(), labels=labels, ref_labels=ref_labels, ks=(1,))
    assert got["recall@1"] == 0.5


def test_retrieval_is_computed_in_float32_inside_autocast():
    # Autocast would compute the scores in bf16, whose ties change recall and mAP (both did, for
    # these embeddings); the metrics are exact evaluation, the same inside the block as outside.
    gen = torch.Generator().manual_seed(0)
    queries = torch.randn(200, 16, generator=gen)
    database = torch.randn(150, 16, generator=gen)
    labels = torch.randint(0, 10, (200,), generator=gen)
    ref_labels = torch.randint(0, 10, (150,), generator=gen)
    for args in ((queries,), (queries, database)):
        kwargs = {"labels": labels, "ref_labels": ref_labels if len(args) == 2 else None}
        outside = retrieval_metrics(*args, **kwargs)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            inside = retrieval_metrics(*args, **kwargs)
            assert torch.is_autocast_enabled("cpu")  # (and still on after)
        assert inside == outside


def test_retrieval_recall_with_one_candidate():
    # In-batch pairs (each query's one candidate is the other) and a database of one row, on the
    # recall-only path and with mAP: every query finds its positive at rank 1.
    emb = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    for metrics in (("recall",), ("map", "recall")):
        got = retrieval_metrics(emb, labels=torch.tensor([3, 3]), ks=(1, 5), metrics=metrics)
        assert got["recall@1"] == got["recall@5"] == 1.0 and got["num_queries"] == 2
        got = retrieval_metrics(emb, emb[:1], labels=torch.tensor([3, 4]),
                                ref_labels=torch.tensor([3]), ks=(1,), metrics=metrics)  # fmt: skip
        assert got["recall@1"] == 1.0 and got["num_queries"] == 1


def test_retrieval_hand_computed():
    # Unit vectors at these angles; the cosine order is the order of angular distance.
    #   A 0 (label 0), B 10 (1), C 30 (0), D 100 (0), E 210 (1)
    # query A: B C D E  rel 0 1 1 0  AP (1/2 + 2/3)/2 = 7/12  R=2 top2: 0 1 -> (1/2)/2 = 1/4
    # query B: A C D E  rel 0 0 0 1  AP 1/4                   R=1 top1: 0   -> 0
    # query C: B A D E  rel 0 1 1 0  AP 7/12                  R=2 -> 1/4
    # query D: C B A E  rel 1 0 1 0  AP (1 + 2/3)/2 = 5/6     R=2 top2: 1 0 -> 1/2
    # query E: D A B C  rel 0 0 1 0  AP 1/3                   R=1 -> 0
    # recall@1: only D hits -> 1/5; recall@3: all but B -> 4/5
    angles = torch.tensor([0.0, 10.0, 30.0, 100.0, 210.0], dtype=torch.float64) * math.pi / 180
    emb = torch.stack([angles.cos(), angles.sin()], dim=1)
    labels = torch.tensor([0, 1, 0, 0, 1])
    got = retrieval_metrics(emb, labels=labels, ks=(1, 3))
    assert got["map"] == pytest.approx((7 / 12 + 1 / 4 + 7 / 12 + 5 / 6 + 1 / 3) / 5)
    assert got["map"] == pytest.approx(31 / 60)
    assert got["recall@1"] == pytest.approx(1 / 5)
    assert got["recall@3"] == pytest.approx(4 / 5)
    assert got["map@r"] == pytest.approx(1 / 5)
    assert got["num_queries"] == 5
    assert list(got) == ["map", "recall@1", "recall@3", "map@r", "num_queries"]


def test_retrieval_ties_hand_computed():
    # query e1 (label 0); database: e1 (1), e1 (0), e1 (1), e2 (0)
    # -> a tie group of 3 at the top holding 1 positive, then a positive at rank 4
    e1, e2 = torch.eye(2, dtype=torch.float64)
    database = torch.stack([e1, e1, e1, e2])
    ref_labels = torch.tensor([1, 0, 1, 0])
    labels = torch.tensor([0])

    def run(ties):
        return retrieval_metrics(
            e1[None], database, labels=labels, ref_labels=ref_labels, ks=(1, 2, 3), ties=ties
        )

    avg, pes, opt = run("average"), run("pessimistic"), run("optimistic")
    # recall@1: P(positive first of 3) = 1/3; recall@2: 1 - C(2,2)/C(3,2) = 2/3
    assert (avg["recall@1"], avg["recall@2"], avg["recall@3"]) == pytest.approx((1 / 3, 2 / 3, 1))
    assert (pes["recall@1"], pes["recall@2"], pes["recall@3"]) == pytest.approx((0, 0, 1))
    assert (opt["recall@1"], opt["recall@2"], opt["recall@3"]) == pytest.approx((1, 1, 1))
    # AP: the group's positive contributes (1/3)(1/1 + 1/2 + 1/3) = 11/18, the last 2/4
    assert avg["map"] == pytest.approx((11 / 18 + 1 / 2) / 2)
    assert pes["map"] == pytest.approx((1 / 3 + 1 / 2) / 2)
    assert opt["map"] == pytest.approx((1 + 1 / 2) / 2)
    # mAP@R, R = 2: E[P(1) rel(1) + P(2) rel(2)] = 1/3 * 1 + 1/3 * 1/2 = 1/2 -> / 2
    assert (avg["map@r"], pes["map@r"], opt["map@r"]) == pytest.approx((1 / 4, 0, 1 / 2))


def test_retrieval_recall_of_a_tie_group_of_negatives_is_exactly_zero():
    """k falls in a group of c tied negatives, the one positive below it: no order of the ties
    puts a positive in the top k, so recall@k is 0 under every tie rule, exactly (the average
    rule's C(c, t) / C(c, t) in logarithms left up to 1e-13 on either side of 0), and a group
    with positives gives a probability within [0, 1]."""
    query = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    for c in range(1, 60):
        tied = torch.tensor([[1.0, 0.1]], dtype=torch.float64).repeat(c, 1)
        database = torch.cat([tied, torch.tensor([[0.0, 1.0]], dtype=torch.float64)])
        ref_labels = torch.tensor([0] * c + [1])
        ks = tuple(range(1, c + 1))
        for ties in TIES:
            got = retrieval_metrics(
                query, database, labels=torch.tensor([1]), ref_labels=ref_labels, ks=ks,
                metrics=("recall",), ties=ties,
            )  # fmt: skip
            assert all(got[f"recall@{k}"] == 0.0 for k in ks), (c, ties, got)
        # One of the group a positive: recall@k = k / c under the average rule.
        ref_labels[0] = 1
        got = retrieval_metrics(
            query, database, labels=torch.tensor([1]), ref_labels=ref_labels, ks=ks,
            metrics=("recall",),
        )  # fmt: skip
        for k in ks:
            assert 0.0 <= got[f"recall@{k}"] <= 1.0
            assert got[f"recall@{k}"] == pytest.approx(k / c, rel=1e-12, abs=1e-13)


def enumerated_metrics(
    scores: torch.Tensor, labels, ref_labels, ks, exclude_self: bool
) -> tuple[dict, int]:
    """The metrics of every tie rule by enumeration, query i against database entries j
    (scores[i, j], entry i left out with exclude_self): ({tie rule: {metric: mean}}, queries
    counted)."""
    expected = {t: {"map": 0.0, "map@r": 0.0, **{f"recall@{k}": 0.0 for k in ks}} for t in TIES}
    count = 0
    for i in range(len(labels)):
        cols = [j for j in range(len(ref_labels)) if not (exclude_self and j == i)]
        rel = [bool(ref_labels[j] == labels[i]) for j in cols]
        if not any(rel):
            continue
        count += 1
        bf = brute_force([float(scores[i, j]) for j in cols], rel, ks)
        for t in TIES:
            expected[t]["map"] += bf[t][0]
            expected[t]["map@r"] += bf[t][2]
            for k, r in zip(ks, bf[t][1]):
                expected[t][f"recall@{k}"] += r
    share = 1 / max(count, 1)
    means = {t: {key: value * share for key, value in e.items()} for t, e in expected.items()}
    return means, count


def in_batch_brute_force(scores: torch.Tensor, labels: torch.Tensor, ks) -> tuple[dict, int]:
    """enumerated_metrics of each query against the others (the rows of scores)."""
    return enumerated_metrics(scores, labels, labels, ks, exclude_self=True)


def test_retrieval_ties_match_brute_force():
    # Vectors whose cosines are exact (sums with zeros), so equal scores are exactly equal.
    a = 1 / math.sqrt(2)
    pool = torch.tensor(
        [[1, 0, 0], [0, 1, 0], [0, 0, 1], [a, a, 0], [0, a, a]], dtype=torch.float64
    )
    gen = torch.Generator().manual_seed(4)
    ks = (1, 2, 3)
    for _ in range(6):
        emb = pool[torch.randint(0, 5, (7,), generator=gen)]
        labels = torch.randint(0, 3, (7,), generator=gen)
        scores = emb @ emb.T  # exactly what the metric sees (normalised rows stay the same)
        expected, count = in_batch_brute_force(scores, labels, ks)
        if count == 0:
            continue
        for t in TIES:
            for chunk in (1, 3, None):
                got = retrieval_metrics(emb, labels=labels, ks=ks, chunk_size=chunk, ties=t)
                assert_metrics_close(got, expected[t], count, tol=1e-12)


def test_retrieval_duplicates_tie_whatever_the_chunk():
    """Copies of one float32 vector (duplicate images): a matrix product may round their scores
    differently by column and by the rows multiplied at once, which made ties of them orderings
    that changed with chunk_size. They are scored once, so they tie as the tie rules say."""
    gen = torch.Generator().manual_seed(8)
    ks = (1, 2)
    for _ in range(4):
        pool = torch.randn(3, 128, generator=gen)
        picks = torch.randint(0, 3, (7,), generator=gen)
        emb, labels = pool[picks], torch.randint(0, 2, (7,), generator=gen)
        # Distinct pool rows give distinct scores (random vectors): ties are the copies alone.
        unit = F.normalize(pool.double(), dim=1)
        pool_scores = unit @ unit.T
        expected, count = in_batch_brute_force(pool_scores[picks][:, picks], labels, ks)
        if count == 0:
            continue
        for t in TIES:
            for chunk in (1, 2, 3, None):
                got = retrieval_metrics(emb, labels=labels, ks=ks, chunk_size=chunk, ties=t)
                assert_metrics_close(got, expected[t], count, tol=1e-12)


# Unit vectors (and one to normalise) whose cosines are sums of 0, +-1/4 and +-1 only: exact in
# any order of summation, so equal cosines are equal bit for bit however a matrix product is
# blocked, and the ties of the random problems below are exact.
EXACT_COSINE_POOL = torch.tensor(
    [
        [1.0, 0.0, 0.0, 0.0],
        [0.0, 1.0, 0.0, 0.0],
        [0.0, 0.0, 1.0, 0.0],
        [-1.0, 0.0, 0.0, 0.0],
        [0.0, 0.0, 0.0, 2.0],
        [0.5, 0.5, 0.5, 0.5],
        [0.5, -0.5, 0.5, -0.5],
        [-0.5, -0.5, 0.5, 0.5],
    ],
    dtype=torch.float64,
)


@given(st.data())
def test_retrieval_matches_enumeration_on_random_problems(data):
    """Small random problems against the enumeration of their tie orders: in batch or against a
    database, self exclusion on or off, any ks (beyond the candidates too), metric subsets,
    chunk sizes, tie rules and embedding dtypes; queries without positives, or none with one."""
    pick = st.integers(0, len(EXACT_COSINE_POOL) - 1)
    n = data.draw(st.integers(1, 5))
    queries = EXACT_COSINE_POOL[data.draw(st.lists(pick, min_size=n, max_size=n))]
    labels = torch.tensor(data.draw(st.lists(st.integers(0, 2), min_size=n, max_size=n)))
    kwargs = {}
    if data.draw(st.booleans()):  # in batch
        database, ref_labels, exclude_self = queries, labels, True
        if data.draw(st.booleans()):
            exclude_self = kwargs["exclude_self"] = data.draw(st.booleans())
    else:
        exclude_self = data.draw(st.booleans())
        m = n if exclude_self else data.draw(st.integers(1, 7))
        database = EXACT_COSINE_POOL[data.draw(st.lists(pick, min_size=m, max_size=m))]
        ref_labels = torch.tensor(data.draw(st.lists(st.integers(0, 2), min_size=m, max_size=m)))
        kwargs.update(database=database, ref_labels=ref_labels)
        if exclude_self or data.draw(st.booleans()):
            kwargs["exclude_self"] = exclude_self
    ks = tuple(data.draw(st.lists(st.integers(1, 9), min_size=1, max_size=3, unique=True)))
    metrics = data.draw(
        st.lists(st.sampled_from(["map", "recall", "map_at_r"]), min_size=1, unique=True)
    )
    ties = data.draw(st.sampled_from(TIES))
    chunk = data.draw(st.none() | st.integers(1, 4))
    dtype = data.draw(st.sampled_from([torch.float64, torch.float32, torch.bfloat16]))
    if "database" in kwargs:
        kwargs["database"] = database.to(dtype)
    got = retrieval_metrics(
        queries.to(dtype), labels=labels, ks=ks, metrics=metrics, ties=ties, chunk_size=chunk,
        **kwargs,
    )  # fmt: skip

    unit = F.normalize(EXACT_COSINE_POOL, dim=1)
    scores = F.normalize(queries, dim=1) @ F.normalize(database, dim=1).T
    assert set((unit @ unit.T).flatten().tolist()) <= {-1.0, -0.5, 0.0, 0.5, 1.0}
    expected, count = enumerated_metrics(scores, labels, ref_labels, ks, exclude_self)
    keys = (
        ["map"] * ("map" in metrics)
        + [f"recall@{k}" for k in ks] * ("recall" in metrics)
        + ["map@r"] * ("map_at_r" in metrics)
    )
    assert list(got) == [*keys, "num_queries"]
    assert got["num_queries"] == count
    for key in keys:
        if count == 0:
            assert math.isnan(got[key]), key
        else:
            assert got[key] == pytest.approx(expected[ties][key], abs=1e-12), key


def test_retrieval_agrees_with_pytorch_metric_learning():
    # An outside oracle: pytorch-metric-learning's AccuracyCalculator (exact cosine k-NN, no
    # faiss) gives the same precision@1 (our recall@1) and MAP@R, in-batch (self excluded) and
    # against a reference set. float64 embeddings: no ties, whose order the two could break apart.
    accuracy = pytest.importorskip("pytorch_metric_learning.utils.accuracy_calculator")
    inference = pytest.importorskip("pytorch_metric_learning.utils.inference")
    distances = pytest.importorskip("pytorch_metric_learning.distances")
    calculator = accuracy.AccuracyCalculator(
        include=("precision_at_1", "mean_average_precision_at_r"),
        k="max_bin_count",
        knn_func=inference.CustomKNN(distances.CosineSimilarity()),
    )
    gen = torch.Generator().manual_seed(5)
    queries = torch.randn(150, 12, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, 6, (150,), generator=gen)
    database = torch.randn(230, 12, generator=gen, dtype=torch.float64)
    ref_labels = torch.randint(0, 6, (230,), generator=gen)
    for theirs, ours in (
        (calculator.get_accuracy(query=queries, query_labels=labels),
         retrieval_metrics(queries, labels=labels, ks=(1,), metrics=("recall", "map_at_r"))),
        (calculator.get_accuracy(query=queries, query_labels=labels, reference=database,
                                 reference_labels=ref_labels, ref_includes_query=False),
         retrieval_metrics(queries, database, labels=labels, ref_labels=ref_labels, ks=(1,),
                           metrics=("recall", "map_at_r"))),
    ):  # fmt: skip
        assert ours["recall@1"] == pytest.approx(theirs["precision_at_1"], abs=1e-12)
        assert ours["map@r"] == pytest.approx(theirs["mean_average_precision_at_r"], abs=1e-12)


def test_retrieval_skips_queries_without_positives():
    gen = torch.Generator().manual_seed(5)
    queries = torch.randn(6, 3, generator=gen, dtype=torch.float64)
    database = torch.randn(8, 3, generator=gen, dtype=torch.float64)
    labels = torch.tensor([0, 1, 0, 1, 2, 0])
    ref_labels = torch.tensor([0, 1, 1, 0, 1, 0, 0, 1])
    base = retrieval_metrics(queries, database, labels=labels, ref_labels=ref_labels, ks=(1, 2))
    assert base["num_queries"] == 5  # label 2 has no positive in the database
    keep = labels != 2
    same = retrieval_metrics(
        queries[keep], database, labels=labels[keep], ref_labels=ref_labels, ks=(1, 2)
    )
    assert base == pytest.approx(same, abs=1e-12)
    # nobody has a positive: NaN metrics, zero queries
    none = retrieval_metrics(queries, database, labels=labels + 10, ref_labels=ref_labels)
    assert none["num_queries"] == 0
    assert all(math.isnan(v) for key, v in none.items() if key != "num_queries")
    # k beyond the 7 candidates of a query (self excluded) retrieves them all
    big = retrieval_metrics(database, labels=ref_labels, ks=(1, 7, 50), metrics="recall")
    assert big["recall@7"] == 1.0 and big["recall@50"] == 1.0 and big["num_queries"] == 8
    # a single query that is its own database has no candidate: nothing counts
    single = retrieval_metrics(queries[:1], labels=labels[:1])
    assert single["num_queries"] == 0 and math.isnan(single["recall@1"])
    # a lone label in the self-retrieval setting: only its own entry matches, which is excluded
    lone = retrieval_metrics(queries[:3], labels=torch.tensor([0, 1, 1]), ks=(1,))
    assert lone["num_queries"] == 2


# --------------------------------------------------------------------------------------------
# 3. revisited_map
# --------------------------------------------------------------------------------------------

HAND_GND = [
    {"easy": [2, 5], "hard": [7], "junk": [1]},
    {"easy": [0, 3], "hard": [], "junk": []},
]
HAND_RANKING = torch.tensor(
    [
        [1, 2, 3, 7, 5, 0, 4, 6, 8, 9],
        [9, 3, 8, 0, 1, 2, 4, 5, 6, 7],
    ]
)


def ranking_to_scores(ranking: torch.Tensor) -> torch.Tensor:
    scores = torch.empty(ranking.shape, dtype=torch.float32)
    values = torch.arange(ranking.shape[1], 0, -1, dtype=torch.float32)
    for q in range(ranking.shape[0]):
        scores[q, ranking[q]] = values
    return scores


def test_revisited_hand_computed():
    # Query 0, ranking 1 2 3 7 5 0 4 6 8 9 (easy 2 5, hard 7, junk 1):
    #  Easy   (ignore 1, 7): 2 3 5 0 4 ...  positives at r = 0, 2
    #         AP = [(1 + 1)/2 + (1/2 + 2/3)/2] / 2 = 19/24; last positive L = 3 (1-based)
    #         P@1 = 1/1; P@5 = P@10 = 2/min(k, 3) = 2/3
    #  Medium (ignore 1): 2 3 7 5 0 ...  positives at r = 0, 2, 3
    #         AP = [1 + (1/2 + 2/3)/2 + (2/3 + 3/4)/2] / 3 = 55/72; L = 4
    #         P@1 = 1; P@5 = P@10 = 3/4
    #  Hard   (ignore 1, 2, 5): 3 7 0 ...  positive at r = 1
    #         AP = (0/1 + 1/2)/2 = 1/4; L = 2: P@1 = 0/1; P@5 = P@10 = 1/2
    # Query 1, ranking 9 3 8 0 ... (easy 0 3, no hard, no junk):
    #  Easy = Medium: positives at r = 1, 3: AP = [(0 + 1/2)/2 + (1/3 + 2/4)/2] / 2 = 1/3
    #         L = 4: P@1 = 0; P@5 = P@10 = 2/4
    #  Hard: no positive -> skipped
    expected = {
        "easy": {"map": (19 / 24 + 1 / 3) / 2, "mp@1": 1 / 2, "mp@5": (2 / 3 + 1 / 2) / 2},
        "medium": {"map": (55 / 72 + 1 / 3) / 2, "mp@1": 1 / 2, "mp@5": (3 / 4 + 1 / 2) / 2},
        "hard": {"map": 1 / 4, "mp@1": 0.0, "mp@5": 1 / 2},
    }
    for setup in expected:
        expected[setup]["mp@10"] = expected[setup]["mp@5"]
    counts = {"easy": 2, "medium": 2, "hard": 1}
    from_scores = revisited_map(ranking_to_scores(HAND_RANKING), HAND_GND)
    from_ranking = revisited_map(HAND_RANKING, HAND_GND, is_ranking=True)
    for got in (from_scores, from_ranking):
        assert list(got) == ["easy", "medium", "hard"]
        for setup, values in expected.items():
            assert list(got[setup]) == ["map", "mp@1", "mp@5", "mp@10", "num_queries"]
            assert got[setup]["num_queries"] == counts[setup]
            for key, value in values.items():
                assert got[setup][key] == pytest.approx(value, abs=1e-12), (setup, key)
    assert from_scores["easy"]["map"] == pytest.approx(9 / 16)
    assert from_scores["medium"]["map"] == pytest.approx(79 / 144)


def reference_revisited(ranking: list[list[int]], gnd, kappas):
    """The protocol written as loops: walk each ranking, skip the ignored images."""
    setups = {
        "easy": (("easy",), ("junk", "hard")),
        "medium": (("easy", "hard"), ("junk",)),
        "hard": (("hard",), ("junk", "easy")),
    }
    out = {}
    for setup, (pos_keys, ign_keys) in setups.items():
        aps, prs = [], []
        for q, g in enumerate(gnd):
            positives = {int(x) for key in pos_keys for x in g[key]}
            ignored = {int(x) for key in ign_keys for x in g[key]} - positives
            if not positives:
                continue
            ranks, r = [], 0
            for idx in ranking[q]:
                if idx in ignored:
                    continue
                if idx in positives:
                    ranks.append(r)
                r += 1
            ap = 0.0
            for j, rank in enumerate(ranks):
                p0 = 1.0 if rank == 0 else j / rank
                p1 = (j + 1) / (rank + 1)
                ap += (p0 + p1) / 2 / len(positives)
            aps.append(ap)
            one_based = [x + 1 for x in ranks]
            row = []
            for k in kappas:
                kq = min(max(one_based), k) if one_based else 0
                row.append(sum(x <= kq for x in one_based) / kq if kq else 0.0)
            prs.append(row)
        res = {"map": sum(aps) / len(aps) if aps else math.nan}
        for j, k in enumerate(kappas):
            res[f"mp@{k}"] = sum(p[j] for p in prs) / len(prs) if prs else math.nan
        res["num_queries"] = len(aps)
        out[setup] = res
    return out


def test_revisited_matches_loop_reference():
    gen = torch.Generator().manual_seed(6)
    nq, ndb, kappas = 9, 30, (1, 3, 10)
    scores = torch.randn(nq, ndb, generator=gen)
    gnd = []
    for _ in range(nq):
        perm = torch.randperm(ndb, generator=gen)
        sizes = torch.randint(0, 5, (3,), generator=gen).tolist()
        easy = perm[: sizes[0]]
        hard = perm[sizes[0] : sizes[0] + sizes[1]].numpy()  # numpy arrays are accepted
        junk = perm[sizes[0] + sizes[1] : sum(sizes)].tolist()
        gnd.append({"easy": easy, "hard": hard, "junk": junk})
    ranking = torch.argsort(scores, dim=1, descending=True)
    expected = reference_revisited(ranking.tolist(), gnd, kappas)
    for chunk in (None, 1, 4):
        for got in (
            revisited_map(scores, gnd, kappas, chunk_size=chunk),
            revisited_map(ranking, gnd, kappas, is_ranking=True, chunk_size=chunk),
        ):
            for setup, values in expected.items():
                assert got[setup]["num_queries"] == values["num_queries"]
                for key, value in values.items():
                    if math.isnan(value):
                        assert math.isnan(got[setup][key])
                    else:
                        assert got[setup][key] == pytest.approx(value, abs=1e-12), (setup, key)
    # a partial ranking (top 12): positives beyond it are never retrieved but still count
    partial = ranking[:, :12]
    expected = reference_revisited(partial.tolist(), gnd, kappas)
    got = revisited_map(partial, gnd, kappas, is_ranking=True)
    for setup, values in expected.items():
        for key, value in values.items():
            assert got[setup][key] == pytest.approx(value, abs=1e-12, nan_ok=True), (setup, key)
    # A ranking knows its database only by the indices named: spread them up to 2^40 and the
    # metrics are the same (the masks have a column per named image, not per index).
    spread = {i: i * 2**35 + 7 for i in range(ndb)}
    sparse_gnd = [{k: [spread[int(i)] for i in v] for k, v in entry.items()} for entry in gnd]
    sparse = revisited_map(partial * 2**35 + 7, sparse_gnd, kappas, is_ranking=True, chunk_size=3)
    for setup, values in got.items():
        assert sparse[setup] == pytest.approx(values, abs=1e-12, nan_ok=True), setup


@given(st.data())
def test_revisited_matches_loop_reference_on_random_problems(data):
    """Random ground truths (empty, duplicated or overlapping lists) against the loop reference:
    from tied scores (ranked by the stable sort) or from a ranking, full or partial, naming
    images beyond it or spread over a sparse index range; any kappas and chunk size."""
    nq, ndb = data.draw(st.integers(1, 5)), data.draw(st.integers(1, 12))
    from_scores = data.draw(st.booleans())
    # A ranking may leave out images that the ground truth names (never retrieved, still counted).
    index = st.integers(0, ndb - 1 if from_scores else ndb + 3)
    gnd = [
        {key: data.draw(st.lists(index, max_size=5)) for key in ("easy", "hard", "junk")}
        for _ in range(nq)
    ]
    kappas = tuple(data.draw(st.lists(st.integers(1, 16), min_size=1, max_size=3, unique=True)))
    chunk = data.draw(st.none() | st.integers(1, 4))
    if from_scores:
        levels = st.integers(0, data.draw(st.integers(0, 3)))
        values = data.draw(st.lists(levels, min_size=nq * ndb, max_size=nq * ndb))
        scores = torch.tensor(values, dtype=torch.float32).reshape(nq, ndb)
        ranking = torch.sort(scores, dim=1, descending=True, stable=True).indices
        got = revisited_map(scores, gnd, kappas, chunk_size=chunk)
    else:
        length = data.draw(st.integers(1, ndb))
        rows = [data.draw(st.permutations(range(ndb)))[:length] for _ in range(nq)]
        ranking = torch.tensor(rows)
        if data.draw(st.booleans()):  # a sparse index range: the same problem, renamed
            ranking = ranking * 2**35 + 7
            gnd = [{k: [i * 2**35 + 7 for i in v] for k, v in entry.items()} for entry in gnd]
        got = revisited_map(ranking, gnd, kappas, is_ranking=True, chunk_size=chunk)
    expected = reference_revisited(ranking.tolist(), gnd, kappas)
    assert list(got) == list(expected)
    for setup, values in expected.items():
        assert list(got[setup]) == list(values)
        for key, value in values.items():
            assert got[setup][key] == pytest.approx(value, abs=1e-12, nan_ok=True), (setup, key)


def test_revisited_lists_are_sets_and_positives_win_over_ignored():
    scores = ranking_to_scores(HAND_RANKING)
    expected = revisited_map(scores, HAND_GND)
    # duplicates count once; an index both positive and ignored in a setup is a positive
    messy = [
        {"easy": [2, 5, 2], "hard": [7, 7], "junk": [1, 1]},
        {"easy": [0, 3, 3], "hard": [], "junk": [0]},
    ]
    assert revisited_map(scores, messy) == expected


def test_revisited_no_hard_images_at_all():
    gnd = [{"easy": [0], "hard": [], "junk": [2]}]
    got = revisited_map(torch.tensor([[0.1, 0.9, 0.5]]), gnd, kappas=(1,))
    # Easy: ranking 1 2 0 -> junk-free 1 0: positive at r = 1: AP = (0 + 1/2)/2 = 1/4
    assert got["easy"]["map"] == pytest.approx(1 / 4)
    assert got["easy"]["mp@1"] == 0.0
    assert got["hard"]["num_queries"] == 0
    assert math.isnan(got["hard"]["map"]) and math.isnan(got["hard"]["mp@1"])


# --------------------------------------------------------------------------------------------
# devices
# --------------------------------------------------------------------------------------------


def test_hand_examples_on_device(device):
    """The hand-computed examples above, on every available device (CPU, and CUDA if present)."""
    scores = torch.tensor([[0.9, 0.8, 0.7, 0.6, 0.5], [1.0, 1.0, 1.0, 1.0, 0.0]], device=device)
    rel = torch.tensor([[1, 0, 1, 0, 1], [1, 0, 0, 1, 0]], device=device)
    ap, valid = average_precision(scores, rel, return_valid=True)
    assert ap.device.type == device.type and valid.device.type == device.type
    assert ap.tolist() == pytest.approx([34 / 45, 49 / 72])
    pes = average_precision(scores, rel, ties="pessimistic", chunk_size=1)
    assert pes.tolist() == pytest.approx([34 / 45, 5 / 12])

    angles = torch.tensor([0.0, 10.0, 30.0, 100.0, 210.0], dtype=torch.float64) * math.pi / 180
    emb = torch.stack([angles.cos(), angles.sin()], dim=1).to(device)
    labels = torch.tensor([0, 1, 0, 0, 1], device=device)
    for metrics in (("map", "recall", "map_at_r"), ("recall",)):
        got = retrieval_metrics(
            emb.float(), labels=labels, ks=(1, 3), metrics=metrics, chunk_size=2
        )
        assert got["recall@1"] == pytest.approx(1 / 5) and got["recall@3"] == pytest.approx(4 / 5)
    assert got["num_queries"] == 5
    got = retrieval_metrics(emb, labels=labels, ks=(1, 3))
    assert (got["map"], got["map@r"]) == pytest.approx((31 / 60, 1 / 5))

    e1, e2 = torch.eye(2, dtype=torch.float64, device=device)
    got = retrieval_metrics(
        e1[None],
        torch.stack([e1, e1, e1, e2]),
        labels=torch.tensor([0], device=device),
        ref_labels=torch.tensor([1, 0, 1, 0], device=device),
        ks=(1, 2),
    )
    assert (got["recall@1"], got["recall@2"]) == pytest.approx((1 / 3, 2 / 3))
    assert (got["map"], got["map@r"]) == pytest.approx((5 / 9, 1 / 4))

    res = revisited_map(ranking_to_scores(HAND_RANKING).to(device), HAND_GND)
    assert (res["easy"]["map"], res["medium"]["map"]) == pytest.approx((9 / 16, 79 / 144))
    assert (res["hard"]["map"], res["hard"]["mp@5"]) == pytest.approx((1 / 4, 1 / 2))
    res = revisited_map(HAND_RANKING.to(device), HAND_GND, is_ranking=True)
    assert res["easy"]["mp@5"] == pytest.approx(7 / 12)


def test_device_mismatch_is_an_error():
    emb = torch.randn(4, 3)
    with pytest.raises(ValueError, match="labels"):
        retrieval_metrics(emb, labels=torch.empty(4, dtype=torch.long, device="meta"))
    with pytest.raises(ValueError, match="relevance"):
        average_precision(torch.zeros(2, 2), torch.zeros(2, 2, dtype=torch.bool, device="meta"))


def test_meta_tensors_are_refused_by_name_and_value_checks_stay_on():
    """The metrics rank values: a meta tensor (which has none) is a ValueError naming it, also
    beside inputs on another device, and set_value_checks(False) leaves their checks on."""
    meta = torch.zeros(4, 3, device="meta")
    labels = torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match="database is on the meta device"):
        retrieval_metrics(torch.randn(4, 3), meta, labels=labels, ref_labels=labels)
    with pytest.raises(ValueError, match="queries is on the meta device"):
        retrieval_metrics(meta, labels=labels.to("meta"))
    with pytest.raises(ValueError, match="scores is on the meta device"):
        average_precision(torch.zeros(2, 2, device="meta"), torch.zeros(2, 2, device="meta"))
    with pytest.raises(ValueError, match="scores is on the meta device"):
        revisited_map(torch.zeros(1, 2, device="meta"), [{"easy": [0], "hard": [], "junk": []}])
    with fastap.set_value_checks(False):
        with pytest.raises(ValueError, match="scores contain NaN"):
            average_precision(torch.tensor([[float("nan"), 0.0]]), torch.tensor([[1, 0]]))
        with pytest.raises(ValueError, match="relevance must hold only 0 and 1"):
            average_precision(torch.zeros(1, 2), torch.tensor([[2, 0]]))


# --------------------------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------------------------


def test_average_precision_errors():
    scores, rel = torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="relevance"):
        average_precision(scores, torch.zeros(3, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="ignore"):
        average_precision(scores, rel, torch.zeros(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="ties"):
        average_precision(scores, rel, ties="random")
    with pytest.raises(TypeError, match="ties"):
        average_precision(scores, rel, ties=None)
    with pytest.raises(ValueError, match="scores"):
        average_precision(torch.zeros(3), torch.zeros(3))
    with pytest.raises(TypeError, match="scores"):
        average_precision([[0.0]], rel)
    with pytest.raises(ValueError, match="scores"):
        average_precision(torch.full((2, 3), math.nan), rel)
    with pytest.raises(ValueError, match="relevance"):
        average_precision(scores, torch.full((2, 3), 2.0))
    with pytest.raises(ValueError, match="chunk_size"):
        average_precision(scores, rel, chunk_size=0)
    with pytest.raises(TypeError, match="chunk_size"):
        average_precision(scores, rel, chunk_size=1.5)
    with pytest.raises(ValueError, match=r"chunk_size must be at most 2\*\*63 - 1"):
        average_precision(scores, rel, chunk_size=2**63)
    for dtype in (torch.float8_e4m3fn, torch.float8_e5m2):  # (torch cannot sort them)
        with pytest.raises(TypeError, match=f"scores of dtype {dtype} cannot be ranked"):
            average_precision(scores.to(dtype), rel)
        with pytest.raises(TypeError, match=f"scores of dtype {dtype} cannot be ranked"):
            revisited_map(scores.to(dtype), [{"easy": [0], "hard": [], "junk": []}] * 2)


def test_retrieval_metrics_errors():
    emb, labels = torch.randn(4, 3), torch.tensor([0, 0, 1, 1])
    with pytest.raises(ValueError, match="ks"):
        retrieval_metrics(emb, labels=labels, ks=(0,))
    with pytest.raises(TypeError, match="ks"):
        retrieval_metrics(emb, labels=labels, ks=(1.5,))
    with pytest.raises(TypeError, match="ks"):
        retrieval_metrics(emb, labels=labels, ks=5)
    with pytest.raises(ValueError, match="ks"):
        retrieval_metrics(emb, labels=labels, ks=())
    with pytest.raises(ValueError, match="labels"):
        retrieval_metrics(emb, labels=labels[:3], ks=(1,))
    with pytest.raises(TypeError, match="labels"):
        retrieval_metrics(emb, labels=labels.float(), ks=(1,))
    with pytest.raises(ValueError, match="database"):
        retrieval_metrics(emb, torch.randn(5, 2), labels=labels, ref_labels=labels, ks=(1,))
    with pytest.raises(ValueError, match="ref_labels"):
        retrieval_metrics(emb, torch.randn(5, 3), labels=labels, ks=(1,))
    with pytest.raises(ValueError, match="ref_labels"):
        retrieval_metrics(emb, torch.randn(5, 3), labels=labels, ref_labels=labels, ks=(1,))
    with pytest.raises(ValueError, match="ref_labels"):
        retrieval_metrics(emb, labels=labels, ref_labels=labels, ks=(1,))
    with pytest.raises(ValueError, match="metrics"):
        retrieval_metrics(emb, labels=labels, ks=(1,), metrics=("ndcg",))
    with pytest.raises(TypeError, match=r"metrics must be names .* got an item of type numpy"):
        retrieval_metrics(emb, labels=labels, ks=(1,), metrics=np.array([["map", "recall"]]))
    names = retrieval_metrics(emb, labels=labels, ks=(1,), metrics=np.array(["map", "recall"]))
    assert list(names) == ["map", "recall@1", "num_queries"]  # (numpy's str_ is a str)
    with pytest.raises(ValueError, match="exclude_self"):
        db, ref = torch.randn(5, 3), torch.arange(5)
        retrieval_metrics(emb, db, labels=labels, ref_labels=ref, ks=(1,), exclude_self=True)
    with pytest.raises(ValueError, match="ties"):
        retrieval_metrics(emb, labels=labels, ks=(1,), ties="mean")
    with pytest.raises(ValueError, match="queries"):
        retrieval_metrics(emb[:, :, None], labels=labels, ks=(1,))
    with pytest.raises(TypeError, match="queries"):
        retrieval_metrics(emb.long(), labels=labels, ks=(1,))
    with pytest.raises(ValueError, match="queries"):
        retrieval_metrics(emb * math.nan, labels=labels, ks=(1,))
    with pytest.raises(ValueError, match="chunk_size"):
        retrieval_metrics(emb, labels=labels, ks=(1,), chunk_size=-1)


def test_revisited_map_errors():
    scores = ranking_to_scores(HAND_RANKING)
    with pytest.raises(ValueError, match="ground_truth"):
        revisited_map(scores, HAND_GND[:1])
    with pytest.raises(TypeError, match="ground_truth"):
        revisited_map(scores, HAND_GND[0])
    with pytest.raises(ValueError, match="junk"):
        revisited_map(scores, [{"easy": [1], "hard": []}, HAND_GND[1]])
    with pytest.raises(ValueError, match="ground_truth"):
        revisited_map(scores, [{"easy": [10], "hard": [], "junk": []}, HAND_GND[1]])
    with pytest.raises(TypeError, match="ground_truth"):
        revisited_map(scores, [{"easy": [1.5], "hard": [], "junk": []}, HAND_GND[1]])
    # A nested list is not flattened (its rows would merge silently), nor a number taken alone.
    for wrong, shape in (
        ([[1, 2], [5, 3]], r"shape \[2, 2\]"),
        ([[]], r"shape \[1, 0\]"),
        (5, "single number"),
        (np.int64(5), "single number"),
    ):
        with pytest.raises(ValueError, match=rf"ground_truth\[0\]\['easy'\].*1-D.*{shape}"):
            revisited_map(scores, [{"easy": wrong, "hard": [], "junk": []}, HAND_GND[1]])
    with pytest.raises(ValueError, match="kappas"):
        revisited_map(scores, HAND_GND, kappas=(0, 1))
    with pytest.raises(TypeError, match="kappas"):
        revisited_map(scores, HAND_GND, kappas=1)
    # A k beyond the ranking, however large, is the whole ranking (as for ks of recall@k).
    whole = revisited_map(scores, HAND_GND, kappas=(scores.shape[1],))
    beyond = revisited_map(scores, HAND_GND, kappas=(2**64,))
    for setup in whole:
        assert beyond[setup][f"mp@{2**64}"] == whole[setup][f"mp@{scores.shape[1]}"]
    with pytest.raises(ValueError, match="scores"):
        revisited_map(scores[0], HAND_GND)
    with pytest.raises(TypeError, match="scores"):
        revisited_map(scores, HAND_GND, is_ranking=True)  # float, not a ranking
    with pytest.raises(ValueError, match="scores"):
        revisited_map(torch.tensor([[0, 1, 1], [2, 1, 0]]), HAND_GND, is_ranking=True)


def test_retrieval_metrics_of_no_queries_are_nan_in_batch_and_against_a_database():
    emb, labels = torch.randn(4, 3), torch.tensor([0, 0, 1, 1])
    for database in (None, emb):
        ref = None if database is None else labels
        res = retrieval_metrics(emb[:0], database, labels=labels[:0], ref_labels=ref, ks=(1,))
        assert res["num_queries"] == 0
        assert all(math.isnan(v) for k, v in res.items() if k != "num_queries"), res
    # An empty database: no query has a positive, as with no queries.
    res = retrieval_metrics(emb, emb[:0], labels=labels, ref_labels=labels[:0], ks=(1,))
    assert res["num_queries"] == 0
    assert all(math.isnan(v) for k, v in res.items() if k != "num_queries"), res


def test_scikit_learn_can_exceed_the_optimistic_order():
    """docs/metrics.md: scikit-learn gives every positive of a tie group the precision at the
    group's end. That is never below the pessimistic order, but it is not bounded by the
    optimistic one: a tie group of positives alone (which every order ranks the same) after a
    negative. Scores 1, 0, 0 with relevance 0, 1, 1: the positives take ranks 2 and 3 in every
    order, AP = (1/2 + 2/3) / 2 = 7/12 under each rule, while scikit-learn says 2/3."""
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    scores = torch.tensor([[1.0, 0.0, 0.0]], dtype=torch.float64)
    rel = torch.tensor([[False, True, True]])
    theirs = sklearn_metrics.average_precision_score(rel[0].numpy(), scores[0].numpy())
    assert theirs == pytest.approx(2 / 3, abs=1e-15)
    for t in TIES:
        assert average_precision(scores, rel, ties=t).item() == pytest.approx(7 / 12, abs=1e-15)
    assert theirs > average_precision(scores, rel, ties="optimistic").item()
    assert theirs >= average_precision(scores, rel, ties="pessimistic").item()


def test_retrieval_uint64_labels_are_checked_with_value_checks_off():
    """The metrics check their inputs' values in either mode (docs/api.md, Errors). A uint64
    label of 2**63 or more has no int64 of its value: with value checks off it wrapped onto a
    negative label and matched it, so query 0 (label 2**64 - 1) found a positive in the
    database entry labelled -1, and the metrics were 1.0 where no query has a positive."""
    emb = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([-1, 5, 7]).view(torch.uint64)  # 2**64 - 1, 5, 7
    assert labels[0].item() == 2**64 - 1
    ref_labels = torch.tensor([-1, 6, 8])
    with pytest.raises(ValueError, match="labels holds uint64 values of 2\\*\\*63 or more"):
        retrieval_metrics(emb, emb, labels=labels, ref_labels=ref_labels)
    with fastap.set_value_checks(False):
        with pytest.raises(ValueError, match="labels holds uint64 values of 2\\*\\*63 or more"):
            retrieval_metrics(emb, emb, labels=labels, ref_labels=ref_labels)
        with pytest.raises(ValueError, match="ref_labels holds uint64 values"):
            retrieval_metrics(emb, emb, labels=ref_labels, ref_labels=labels)


def test_retrieval_recall_of_a_large_tie_group_is_exact():
    """The average rule's chance of a positive among t entries drawn from a tie group of c with c+
    positives, 1 - C(c - c+, t) / C(c, t), to float64's rounding for a group of a million (the
    difference of log-gamma values of about 1.3e7 gave recall@1 = 1.00024e-6 for 1e-6), against
    exact fractions."""
    c = 10**6
    query = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    database = torch.tensor([[1.0, 0.5]], dtype=torch.float64).repeat(c, 1)
    ks = (1, 2, 5, 1000)
    for positives in (1, 3, 2000):
        ref_labels = torch.zeros(c, dtype=torch.long)
        ref_labels[torch.linspace(0, c - 1, positives).long()] = 1
        got = retrieval_metrics(
            query, database, labels=torch.tensor([1]), ref_labels=ref_labels, ks=ks,
            metrics=("recall",),
        )  # fmt: skip
        for k in ks:
            want = 1 - Fraction(math.comb(c - positives, k), math.comb(c, k))
            close = pytest.approx(float(want), rel=1e-13, abs=0)
            assert got[f"recall@{k}"] == close, f"{positives} positives, k = {k}"
