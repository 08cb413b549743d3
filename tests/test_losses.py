"""fastap.APLoss (embeddings in, pytorch-metric-learning call style) against the functional API."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import fastap
from fastap import reference
from fastap.memory import CrossBatchMemory

from problem_strategies import assert_gradients_close


def test_in_batch_equals_functional_with_exclude_self():
    g = torch.Generator().manual_seed(0)
    embeddings = torch.randn(30, 7, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 4, (30,), generator=g)
    loss = fastap.APLoss(num_bins=15)(embeddings, labels)
    normalised = F.normalize(embeddings, dim=1)
    scores = normalised @ normalised.T
    expected = reference.ap_loss(scores, labels=labels, num_bins=15, exclude_self=True)
    torch.testing.assert_close(loss, expected, rtol=0, atol=1e-12)
    (grad,) = torch.autograd.grad(loss, embeddings)
    (expected_grad,) = torch.autograd.grad(expected, embeddings)
    torch.testing.assert_close(grad, expected_grad, rtol=0, atol=1e-12)


def test_reference_set():
    g = torch.Generator().manual_seed(1)
    queries = torch.randn(9, 5, generator=g, dtype=torch.float64)
    database = torch.randn(21, 5, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 3, (9,), generator=g)
    ref_labels = torch.randint(0, 3, (21,), generator=g)
    loss = fastap.APLoss(score_range=(-1, 1))(
        queries, labels, ref_emb=database, ref_labels=ref_labels
    )
    scores = F.normalize(queries, dim=1) @ F.normalize(database, dim=1).T
    expected = reference.ap_loss(scores, labels=labels, ref_labels=ref_labels)
    torch.testing.assert_close(loss, expected, rtol=0, atol=1e-12)
    assert repr(fastap.APLoss()) == "APLoss(num_bins=20, score_range=(-1.0, 1.0), variant='ap_q')"
    assert repr(fastap.FastAPLoss(score_matrix_limit=5)) == (
        "FastAPLoss(num_bins=10, score_matrix_limit=5)"
    )


def test_one_query_with_a_positive_is_the_whole_loss():
    # Only query 0's label is in the reference set: the loss is 1 - that query's AP, on the
    # score-matrix path and on the blockwise one (score_matrix_limit=0).
    g = torch.Generator().manual_seed(2)
    queries = torch.randn(4, 5, generator=g, dtype=torch.float64)
    database = torch.randn(11, 5, generator=g, dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 3])
    ref_labels = torch.tensor([0, 0, 0, 5, 5, 5, 5, 6, 6, 6, 6])
    scores = F.normalize(queries, dim=1) @ F.normalize(database, dim=1).T
    ap = reference.average_precision(scores, labels=labels, ref_labels=ref_labels)
    assert 0 < ap[0] < 1
    for limit in (None, 0):
        kwargs = {} if limit is None else {"score_matrix_limit": limit}
        loss = fastap.APLoss(**kwargs)(queries, labels, ref_emb=database, ref_labels=ref_labels)
        torch.testing.assert_close(loss, 1 - ap[0], rtol=0, atol=1e-12)


def test_training_steps_raise_ap():
    """A few SGD steps on the loss must raise the batch's AP (the loss has a useful gradient)."""
    g = torch.Generator().manual_seed(2)
    labels = torch.arange(64) % 8
    embeddings = torch.randn(64, 16, generator=g, requires_grad=True)
    loss_fn = fastap.APLoss()
    optimiser = torch.optim.Adam([embeddings], lr=0.05)
    first = loss_fn(embeddings, labels).item()
    for _ in range(50):
        optimiser.zero_grad()
        loss_fn(embeddings, labels).backward()
        optimiser.step()
    assert first > 0.5 and loss_fn(embeddings, labels).item() < 0.05


def test_embedding_sets_of_two_dtypes_are_taken_in_the_wider():
    g = torch.Generator().manual_seed(5)
    queries, database = torch.randn(9, 6, generator=g), torch.randn(11, 6, generator=g)
    labels = torch.randint(0, 3, (9,), generator=g)
    ref_labels = torch.randint(0, 3, (11,), generator=g)

    def aploss(q, d):
        return fastap.APLoss()(q, labels, ref_emb=d, ref_labels=ref_labels)

    def from_embeddings(q, d):
        return fastap.ap_loss_from_embeddings(q, d, labels=labels, ref_labels=ref_labels)

    for q, d in ((queries, database.double()), (queries.double(), database.bfloat16())):
        for loss_fn in (aploss, from_embeddings):
            got = loss_fn(q, d)
            assert got.dtype == torch.float64
            torch.testing.assert_close(got, loss_fn(q.double(), d.double()), rtol=0, atol=1e-12)


def embeddings_path_calls(monkeypatch) -> list:
    """The keyword arguments of each call the modules make of the path from the embeddings
    (fastap.losses.histograms_from_embeddings, spied on), in a list that grows with them."""
    calls = []
    real = fastap.losses.histograms_from_embeddings

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(fastap.losses, "histograms_from_embeddings", spy)
    return calls


def test_per_query_loss_above_the_limit_takes_the_embeddings_path(monkeypatch):
    """Above score_matrix_limit, per_query_loss computes from the embeddings (no score matrix),
    with the same answer, self_offset included (as DistributedAPLoss passes it on ranks > 0)."""
    g = torch.Generator().manual_seed(3)
    database = torch.randn(11, 5, generator=g, dtype=torch.float64)
    ref_labels = torch.randint(0, 3, (11,), generator=g)
    offset = 4
    queries, labels = database[offset : offset + 5], ref_labels[offset : offset + 5]
    calls = embeddings_path_calls(monkeypatch)
    results = []
    for limit in (2**30, 0):
        per_query, valid = fastap.APLoss(num_bins=9, score_matrix_limit=limit).per_query_loss(
            queries, database, labels, ref_labels, exclude_self=True, self_offset=offset
        )
        results.append((per_query, valid))
    assert len(calls) == 1 and calls[0]["self_offset"] == offset  # only for limit = 0
    scores = F.normalize(queries, dim=1) @ F.normalize(database, dim=1).T
    ap, has_positive = reference._ap_and_validity(
        scores, None, labels, ref_labels, 9, (-1.0, 1.0), None, True, offset, "ap_q"
    )
    for per_query, valid in results:
        assert torch.equal(valid, has_positive)
        torch.testing.assert_close(per_query, 1 - ap, rtol=0, atol=1e-12)


def test_the_automatic_limit_is_a_share_of_the_gpu_and_1_gib_elsewhere(monkeypatch):
    """score_matrix_limit="auto" (the default): 1/16 of the memory of the batch's CUDA device
    (which device: its index), 1 GiB on the CPU; a number of bytes is taken as it is."""
    asked = []

    def memory(index):
        asked.append(index)
        return 80 * 2**30

    monkeypatch.setattr(fastap.losses, "gpu_memory_bytes", memory)
    limit_bytes = fastap.losses.score_matrix_limit_bytes
    assert limit_bytes("auto", torch.device("cpu")) == 2**30
    assert limit_bytes("auto", torch.device("cuda", 3)) == 5 * 2**30 and asked == [3]
    assert limit_bytes(12345, torch.device("cuda", 0)) == 12345 and asked == [3]
    assert limit_bytes(0, torch.device("cpu")) == 0
    for make in (fastap.APLoss, fastap.FastAPLoss):
        assert make().score_matrix_limit == "auto"
        assert "score_matrix_limit" not in repr(make(score_matrix_limit="auto"))
        assert "score_matrix_limit=7" in repr(make(score_matrix_limit=7))


@pytest.mark.parametrize("make", [fastap.APLoss, fastap.FastAPLoss])
def test_the_default_limit_picks_the_path_by_the_batchs_scores(monkeypatch, make):
    """With the default, a batch of more bytes of scores than the automatic limit computes from
    the embeddings, one of fewer from the score matrix: the same loss and gradient either way."""
    g = torch.Generator().manual_seed(5)
    embeddings = torch.randn(12, 6, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 3, (12,), generator=g)
    calls = embeddings_path_calls(monkeypatch)
    results = []
    for automatic_limit in (12 * 12 * 8, 12 * 12 * 8 - 1):  # (float64 scores: 8 bytes each)
        monkeypatch.setattr(fastap.losses, "AUTO_SCORE_MATRIX_LIMIT", automatic_limit)
        leaf = embeddings.clone().requires_grad_()
        loss = make()(leaf, labels)
        loss.backward()
        results.append((loss, leaf.grad))
    assert len(calls) == 1  # (the second limit only)
    torch.testing.assert_close(results[0][0], results[1][0], rtol=0, atol=1e-12)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=0, atol=1e-12)


@pytest.mark.cuda
def test_the_automatic_limit_on_the_gpu_is_a_sixteenth_of_its_memory():
    device = torch.device("cuda", torch.cuda.current_device())
    total = torch.cuda.get_device_properties(device).total_memory
    assert fastap.losses.score_matrix_limit_bytes("auto", device) == total // 16
    assert fastap.losses.score_matrix_limit_bytes("auto", torch.device("cuda")) == total // 16


@pytest.mark.parametrize("limit", [2**30, 0])
def test_per_query_loss_refuses_exclude_self_without_offset_on_either_side_of_the_limit(limit):
    """exclude_self against a database of another size, without self_offset, is refused as the
    score-matrix path refuses it, whichever side of score_matrix_limit the batch falls on (the
    embeddings path took self_offset = 0 and returned values above the limit)."""
    g = torch.Generator().manual_seed(5)
    queries = torch.randn(5, 4, generator=g, dtype=torch.float64)
    database = torch.randn(8, 4, generator=g, dtype=torch.float64)
    labels, ref_labels = torch.arange(5) % 3, torch.arange(8) % 3
    loss = fastap.APLoss(score_matrix_limit=limit)
    with pytest.raises(ValueError, match="exclude_self needs a square scores matrix"):
        loss.per_query_loss(queries, database, labels, ref_labels, exclude_self=True)


@pytest.mark.parametrize("limit", [2**30, 0])
def test_attributes_set_after_construction_are_checked_as_the_constructor_checks_them(limit):
    """FastAPLoss.num_bins and score_matrix_limit are read at each call: a bad value set on the
    attribute raises the constructor's error, naming the argument and its own value (num_bins
    = 0 was refused as "num_bins must be at least 2, got 1", and None for either raised a bare
    TypeError from an arithmetic or comparison)."""
    embeddings, labels = torch.randn(6, 3), torch.arange(6) % 2
    for value, error, message in (
        (0, ValueError, "fastap.FastAPLoss: num_bins must be at least 1, got 0"),
        (None, TypeError, "fastap.FastAPLoss: num_bins must be an int, got None"),
        (2**20, ValueError, "fastap.FastAPLoss: num_bins must be below 2^20"),
    ):
        loss = fastap.FastAPLoss(score_matrix_limit=limit)
        loss.num_bins = value
        with pytest.raises(error) as raised:
            loss(embeddings, labels)
        assert str(raised.value).startswith(message), str(raised.value)
        with pytest.raises(error) as again:
            fastap.FastAPLoss(num_bins=value)
        assert str(again.value) == str(raised.value)
    for make in (fastap.APLoss, fastap.FastAPLoss):
        loss = make(score_matrix_limit=limit)
        loss.score_matrix_limit = None
        with pytest.raises(TypeError, match="score_matrix_limit must be an int"):
            loss(embeddings, labels)


@given(
    n=st.integers(1, 24),
    dim=st.integers(1, 6),
    num_classes=st.integers(1, 5),
    with_database=st.booleans(),
    m=st.integers(1, 30),
    variant=st.sampled_from(fastap.VARIANTS),
    num_bins=st.integers(2, 40),
    seed=st.integers(0, 2**31 - 1),
)
def test_every_entry_point_gives_the_same_loss(
    n, dim, num_classes, with_database, m, variant, num_bins, seed
):
    """One random float64 problem through each way in: APLoss on embeddings (score matrix and
    blockwise paths), fastap.ap_loss on the cosine scores, ap_loss_from_embeddings, and, in
    batch, a fresh CrossBatchMemory and the authors' signature on the score matrix with the self
    entries left out; the reference on the cosine scores is the oracle. Values to 1e-12; the
    gradients of the embeddings too, to 1e-9 of their scale."""
    g = torch.Generator().manual_seed(seed)
    queries = torch.randn(n, dim, generator=g, dtype=torch.float64)
    labels = torch.randint(0, num_classes, (n,), generator=g)
    options = dict(num_bins=num_bins, score_range=(-1.0, 1.0), variant=variant)
    if with_database:
        database = torch.randn(m, dim, generator=g, dtype=torch.float64)
        ref_labels = torch.randint(0, num_classes, (m,), generator=g)
    else:
        database, ref_labels = None, None

    def through(call):
        q = queries.clone().requires_grad_()
        d = None if database is None else database.clone().requires_grad_()
        loss = call(q, d)
        wrt = [q] if d is None else [q, d]
        grads = torch.autograd.grad(loss, wrt, allow_unused=True)
        return loss.detach(), [torch.zeros_like(w) if x is None else x for w, x in zip(wrt, grads)]

    def module(limit):
        loss = fastap.APLoss(score_matrix_limit=limit, **options)
        if database is None:
            return lambda q, d: loss(q, labels)
        return lambda q, d: loss(q, labels, ref_emb=d, ref_labels=ref_labels)

    def scores_of(q, d):
        return fastap.cosine.cosine_scores(q, q if d is None else d)

    matrix = dict(labels=labels, ref_labels=ref_labels, exclude_self=database is None, **options)
    calls = {
        "reference": lambda q, d: reference.ap_loss(scores_of(q, d), **matrix),
        "APLoss": module(2**30),
        "APLoss blockwise": module(0),
        "ap_loss": lambda q, d: fastap.ap_loss(scores_of(q, d), **matrix),
        "ap_loss_from_embeddings": lambda q, d: fastap.ap_loss_from_embeddings(
            q, d, labels=labels, ref_labels=ref_labels, block_size=7, **options
        ),
    }
    if database is None:
        memory = CrossBatchMemory(fastap.APLoss(**options), size=4)
        calls["CrossBatchMemory"] = lambda q, d: memory(q, labels, enqueue=False)
        if variant != "ap_q":
            compat = fastap.compat.TAPLoss(num_bins, -1, 1, variant == "tie_aware_simplified")
        else:
            compat = fastap.compat.APLoss(num_bins, -1, 1)
        off_diagonal = ~torch.eye(n, dtype=torch.bool)

        def authors(q, d):  # (theirs has no self exclusion: the self entries are taken out)
            s = scores_of(q, d)
            rows = s[off_diagonal].reshape(n, n - 1)
            relevance = (labels[:, None] == labels[None, :])[off_diagonal].reshape(n, n - 1)
            return compat(rows, relevance.double())

        calls["compat"] = authors
    expected_loss, expected_grads = through(calls.pop("reference"))
    for name, call in calls.items():
        loss, grads = through(call)

        def msg(m: str, name: str = name) -> str:
            return f"{name}: {m}"

        torch.testing.assert_close(loss, expected_loss, rtol=0, atol=1e-12, msg=msg)
        for grad, expected in zip(grads, expected_grads):
            assert_gradients_close(grad, expected, 1e-9, msg=msg)
