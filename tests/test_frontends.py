"""Drop-in front ends: the authors' signature (fastap.compat), pytorch-metric-learning's
(fastap.APLoss, fastap.FastAPLoss), miner weights, and autocast."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import fastap
from fastap import reference
from fastap.losses import miner_weights
from fastap.testing import random_problem

from problem_strategies import assert_gradients_close, reference_tolerance


def authors_style_problem(seed=0, n=9, m=40):
    """Scores in the authors' default range [0, 1] (a little beyond it too) and 0/1 labels."""
    problem = random_problem(
        n, m, num_bins=25, score_range=(0.0, 1.0), relevance_form="dense", seed=seed
    )
    problem.relevance[:, 0] = True  # every query has a positive: their loss is defined
    return problem.scores, problem.relevance.float()


@pytest.mark.parametrize(
    "module,variant",
    [
        (fastap.compat.APLoss(), "ap_q"),
        (fastap.compat.TAPLoss(), "tie_aware"),
        (fastap.compat.TAPLoss(simplified=True), "tie_aware_simplified"),
    ],
)
def test_compat_matches_their_definition(device, module, variant):
    x, label = authors_style_problem()
    qw = torch.rand(x.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    expected_ap = reference.average_precision(
        x, label, num_bins=25, score_range=(0.0, 1.0), variant=variant
    )
    ap = module(x.to(device), label.to(device), ret="AP")
    torch.testing.assert_close(ap.cpu(), expected_ap, rtol=0, atol=1e-12)
    # Theirs: 1 - mean(AP), and with query weights 1 - mean(qw * AP).
    loss = module(x.to(device), label.to(device))
    torch.testing.assert_close(loss.cpu(), 1 - expected_ap.mean(), rtol=0, atol=1e-12)
    weighted = module(x.to(device), label.to(device), qw=qw.to(device))
    torch.testing.assert_close(weighted.cpu(), 1 - (qw * expected_ap).mean(), rtol=0, atol=1e-12)


COMPAT_MODULES = {
    "ap_q": lambda nq, lo, hi: fastap.compat.APLoss(nq, lo, hi),
    "tie_aware": lambda nq, lo, hi: fastap.compat.TAPLoss(nq, lo, hi),
    "tie_aware_simplified": lambda nq, lo, hi: fastap.compat.TAPLoss(nq, lo, hi, simplified=True),
}


@given(
    variant=st.sampled_from(sorted(COMPAT_MODULES)),
    n=st.integers(1, 12),
    m=st.integers(0, 40),
    nq=st.integers(2, 60),
    lo=st.floats(-2, 1),
    width=st.floats(0.05, 3),
    ties=st.booleans(),
    weighted=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_compat_matches_the_reference_on_random_problems(
    variant, n, m, nq, lo, width, ties, weighted, seed
):
    """The authors' signature on random float64 problems (queries without positives among them,
    ties, scores beyond the range): ret="AP" is the reference AP (0 without positives), and the
    loss and its gradient are those of 1 - mean(qw * AP) over the queries with a positive."""
    problem = random_problem(
        n, m, num_bins=nq, score_range=(lo, lo + width), relevance_form="dense", ties=ties,
        num_classes=3, seed=seed,
    )  # fmt: skip
    module = COMPAT_MODULES[variant](nq, lo, lo + width)
    label = problem.relevance.double()
    qw = torch.rand(n, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    qw = qw + 0.5 if weighted else None
    x = problem.scores.detach().requires_grad_()
    ref_x = problem.scores.detach().requires_grad_()
    ref_ap = reference.average_precision(
        ref_x, problem.relevance, **problem.kwargs(), variant=variant
    )
    tolerance = reference_tolerance(problem, variant)
    ap = module(x.detach(), label, ret="AP")
    assert ((ap - ref_ap.detach()).abs() <= tolerance).all()
    assert ap[~problem.relevance.any(1)].eq(0).all()

    loss = module(x, label, qw=qw)
    has_positive = problem.relevance.any(1)
    weights = torch.ones(n, dtype=torch.float64) if qw is None else qw
    if has_positive.any():
        expected = 1 - (weights * ref_ap)[has_positive].mean()
    else:
        expected = ref_ap.sum() * 0  # (0, and its gradient 0)
    bound = (weights * tolerance).max().item()
    torch.testing.assert_close(loss, expected, rtol=0, atol=bound)
    loss.backward()
    expected.backward()
    assert ref_x.grad is not None and x.grad is not None
    assert_gradients_close(x.grad, ref_x.grad, bound, floor=(nq - 1) / width)


def test_compat_defaults_and_nan_free_query():
    module = fastap.compat.TAPLoss()
    assert (module.nq, module.min, module.max, module.simplified) == (25, 0, 1, False)
    x, label = authors_style_problem(n=4)
    label[2] = 0  # no positive: the authors' loss is NaN here
    x.requires_grad_()
    ap = module(x, label, ret="AP")
    assert ap[2] == 0 and torch.isfinite(ap).all()
    loss = fastap.compat.APLoss()(x, label)
    keep = torch.tensor([0, 1, 3])
    expected = reference.average_precision(x.detach(), label, num_bins=25, score_range=(0.0, 1.0))
    torch.testing.assert_close(loss.detach(), 1 - expected[keep].mean(), rtol=0, atol=1e-12)
    loss.backward()
    assert torch.isfinite(x.grad).all() and x.grad[2].eq(0).all()


def test_compat_weights_near_their_limits_give_their_formula():
    """1 - mean(qw * AP): a query without a positive (AP 0) adds nothing whatever its weight,
    even one that overflows float32 (0 * inf would be NaN), and weights near float32's largest
    value give the formula's finite value (their sum would overflow)."""
    x, label = authors_style_problem(n=4)
    x, label = x.float(), label.float()
    label[2] = 0
    ap = fastap.compat.APLoss()(x, label, ret="AP").double()
    keep = torch.tensor([0, 1, 3])
    for qw in (torch.tensor([1.0, 2.0, 1e300, 0.5], dtype=torch.float64),
               torch.tensor([3e38, 2e38, 1e38, 3e38])):  # fmt: skip
        loss = fastap.compat.APLoss()(x, label, qw=qw)
        expected = 1 - (qw.double()[keep] * ap[keep]).mean()
        assert loss.dtype == torch.float32 and torch.isfinite(loss)
        torch.testing.assert_close(loss.double(), expected, rtol=1e-6, atol=0)


def test_compat_takes_qw_as_their_product_does():
    """Theirs multiplies ``ap *= qw``: a number or a 0-d tensor weighs every query alike, and
    integer weights are weights; each gives the loss of the float [N] weights it stands for.
    bool weights stay refused."""
    x, label = authors_style_problem(n=5)
    module = fastap.compat.APLoss()
    full = lambda value: module(x, label, qw=torch.full((5,), value, dtype=x.dtype))  # noqa: E731
    ap = module(x, label, ret="AP")
    for qw, value in ((0.5, 0.5), (2, 2.0), (torch.tensor(0.25), 0.25), (np.float32(3), 3.0)):
        loss = module(x, label, qw=qw)
        torch.testing.assert_close(loss, full(value), rtol=0, atol=0)
        torch.testing.assert_close(loss, 1 - value * ap.mean(), rtol=0, atol=1e-12)
    integer_weights = torch.tensor([1, 0, 2, 3, 1])
    torch.testing.assert_close(
        module(x, label, qw=integer_weights),
        module(x, label, qw=integer_weights.to(x.dtype)),
        rtol=0,
        atol=0,
    )
    for refused in (True, torch.ones(5, dtype=torch.bool), -1.0):
        with pytest.raises((TypeError, ValueError), match="qw"):
            module(x, label, qw=refused)


def test_compat_settings_changed_after_construction_take_effect():
    """TAPLoss reads ``simplified`` at each call (it was fixed at construction while the repr
    followed the attribute); numpy or 0-d tensor ``min``/``max`` are kept as Python floats."""
    x, label = authors_style_problem(n=4)
    module = fastap.compat.TAPLoss()
    module.simplified = True
    assert "simplified=True" in repr(module)
    torch.testing.assert_close(
        module(x, label), fastap.compat.TAPLoss(simplified=True)(x, label), rtol=0, atol=0
    )
    module.simplified = "yes"
    with pytest.raises(TypeError, match="simplified"):
        module(x, label)
    for lo, hi in ((np.float32(0), np.float64(1)), (torch.tensor(0.0), torch.tensor(1.0))):
        ranged = fastap.compat.APLoss(25, lo, hi)
        assert (type(ranged.min), type(ranged.max)) == (float, float)
        torch.testing.assert_close(ranged(x, label), fastap.compat.APLoss()(x, label))


def test_compat_with_numpy_range_compiles_without_graph_breaks():
    """min and max given as numpy scalars: under torch.compile(fullgraph=True) they are Python
    floats (a numpy scalar kept as given is traced as a tensor, whose comparison in the range
    check could not be guarded: the compile failed)."""
    x, label = authors_style_problem(n=4)
    module = fastap.compat.APLoss(25, np.float32(0), np.float64(1))
    torch._dynamo.reset()
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x, label), module(x, label), rtol=0, atol=0)


def test_fastap_num_bins_is_pytorch_metric_learnings():
    """As in pytorch-metric-learning, ``num_bins`` is the number of intervals and ``num_edges``
    = num_bins + 1 the bins; setting ``num_bins`` gives the loss of a new module with it (the
    attribute held num_bins + 1 while the repr said num_bins, and setting it ran one bin fewer)."""
    g = torch.Generator().manual_seed(5)
    embeddings = torch.randn(16, 8, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 4, (16,), generator=g)
    module = fastap.FastAPLoss(10)
    assert (module.num_bins, module.num_edges) == (10, 11)
    module.num_bins = 20
    assert module.num_edges == 21 and repr(module) == "FastAPLoss(num_bins=20)"
    torch.testing.assert_close(
        module(embeddings, labels), fastap.FastAPLoss(20)(embeddings, labels), rtol=0, atol=0
    )
    torch.testing.assert_close(
        module(embeddings, labels), fastap.APLoss(21)(embeddings, labels), rtol=0, atol=0
    )
    pml_losses = pytest.importorskip("pytorch_metric_learning.losses")
    theirs = pml_losses.FastAPLoss(20)
    assert theirs.num_bins == module.num_bins
    torch.testing.assert_close(module(embeddings, labels), theirs(embeddings, labels), rtol=0,
                               atol=1e-13)  # fmt: skip


def test_fastap_equals_ap_q_on_negated_squared_distances():
    g = torch.Generator().manual_seed(0)
    embeddings = torch.randn(40, 8, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 5, (40,), generator=g)
    loss = fastap.FastAPLoss(num_bins=10)(embeddings, labels)
    unit = F.normalize(embeddings, dim=1)
    negated_distance = -(torch.cdist(unit, unit) ** 2)
    expected = reference.ap_loss(
        negated_distance, labels=labels, num_bins=11, score_range=(-4.0, 0.0), exclude_self=True
    )
    torch.testing.assert_close(loss, expected, rtol=0, atol=1e-12)


@given(
    n=st.integers(1, 20),
    m=st.integers(1, 25),
    dim=st.integers(1, 6),
    num_classes=st.integers(1, 4),
    with_database=st.booleans(),
    num_bins=st.integers(1, 30),
    blockwise=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_fastap_is_ap_q_on_negated_squared_distances_on_random_problems(
    n, m, dim, num_classes, with_database, num_bins, blockwise, seed
):
    """FastAPLoss, in batch or against a reference set (which pytorch-metric-learning's
    refuses), on either path: the reference AP_Q loss of the negated squared distances of the
    unit rows over (-4, 0) with num_bins + 1 bins; values and gradients (the reference's autograd
    through the distances)."""
    g = torch.Generator().manual_seed(seed)
    queries = torch.randn(n, dim, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, num_classes, (n,), generator=g)
    limit = 0 if blockwise else 2**30
    if with_database:
        database = torch.randn(m, dim, generator=g, dtype=torch.float64, requires_grad=True)
        ref_labels = torch.randint(0, num_classes, (m,), generator=g)
        loss = fastap.FastAPLoss(num_bins, score_matrix_limit=limit)(
            queries, labels, ref_emb=database, ref_labels=ref_labels
        )
        inputs = [queries, database]
    else:
        database, ref_labels = queries, None
        loss = fastap.FastAPLoss(num_bins, score_matrix_limit=limit)(queries, labels)
        inputs = [queries]
    distance = torch.cdist(F.normalize(queries, dim=1), F.normalize(database, dim=1)) ** 2
    expected = reference.ap_loss(
        -distance, labels=labels, ref_labels=ref_labels, num_bins=num_bins + 1,
        score_range=(-4.0, 0.0), exclude_self=not with_database,
    )  # fmt: skip
    torch.testing.assert_close(loss, expected, rtol=0, atol=1e-12)
    grads = torch.autograd.grad(loss, inputs, allow_unused=True)
    expected_grads = torch.autograd.grad(expected, inputs, allow_unused=True)
    for grad, expected_grad, x in zip(grads, expected_grads, inputs):
        grad = torch.zeros_like(x) if grad is None else grad
        expected_grad = torch.zeros_like(x) if expected_grad is None else expected_grad
        assert_gradients_close(grad, expected_grad, 1e-9)


@pytest.mark.parametrize("num_bins", [5, 10, 30])
@pytest.mark.parametrize("with_miner", [False, True])
def test_fastap_parity_with_pytorch_metric_learning(num_bins, with_miner, device):
    pml_losses = pytest.importorskip("pytorch_metric_learning.losses")
    pml_miners = pytest.importorskip("pytorch_metric_learning.miners")
    g = torch.Generator().manual_seed(num_bins)
    embeddings = torch.randn(96, 16, generator=g).to(device)
    labels = torch.randint(0, 12, (96,), generator=g).to(device)
    indices_tuple = None
    if with_miner:
        indices_tuple = pml_miners.TripletMarginMiner(margin=0.2, type_of_triplets="semihard")(
            embeddings, labels
        )
        assert indices_tuple[0].numel() > 0
    ours_in = embeddings.clone().requires_grad_()
    theirs_in = embeddings.clone().requires_grad_()
    ours = fastap.FastAPLoss(num_bins=num_bins)(ours_in, labels, indices_tuple)
    theirs = pml_losses.FastAPLoss(num_bins=num_bins)(theirs_in, labels, indices_tuple)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    ours.backward()
    theirs.backward()
    torch.testing.assert_close(ours_in.grad, theirs_in.grad, rtol=1e-3, atol=1e-5)


def test_fastap_parity_with_pytorch_metric_learning_in_float64():
    # The miner's weights too are float64 for float64 embeddings (float32 ones cost 1e-8).
    pml_losses = pytest.importorskip("pytorch_metric_learning.losses")
    g = torch.Generator().manual_seed(3)
    embeddings = torch.randn(30, 5, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 4, (30,), generator=g)
    indices_tuple = tuple(torch.randint(0, 30, (3, 41), generator=g))
    for num_bins in (7, 10):
        ours = fastap.FastAPLoss(num_bins=num_bins)(embeddings, labels, indices_tuple)
        theirs = pml_losses.FastAPLoss(num_bins=num_bins)(embeddings, labels, indices_tuple)
        assert ours.dtype == torch.float64
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-13)


@st.composite
def fastap_batches(draw):
    """(embeddings, labels, num_bins, indices_tuple): float64 batches of 1 to 80 rows, from one
    class to one per row, half of them of small integers (ties, and distances on the bin centres);
    no miner, random triplets or random pairs (some empty). No zero row: there the two differ by
    design (docs/migration.md)."""
    n, d = draw(st.integers(1, 80)), draw(st.integers(1, 20))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    embeddings = torch.randn(n, d, generator=g, dtype=torch.float64)
    if draw(st.booleans()):
        embeddings = embeddings.round()
        embeddings[(embeddings == 0).all(1), 0] = 1.0
    labels = torch.randint(0, draw(st.integers(1, n)), (n,), generator=g)
    miner = draw(st.sampled_from(["none", "triplets", "pairs"]))
    indices_tuple = None
    if miner == "triplets":
        indices_tuple = tuple(torch.randint(0, n, (3, draw(st.integers(0, 60))), generator=g))
    elif miner == "pairs":
        sizes = [draw(st.just(0) | st.integers(1, 30)) for _ in range(2)]  # (empty: often)
        indices_tuple = tuple(torch.randint(0, n, (size,), generator=g)
                              for size in sizes for _ in range(2))  # fmt: skip
    return embeddings, labels, draw(st.integers(1, 50)), indices_tuple


@given(fastap_batches())
def test_fastap_parity_with_pytorch_metric_learning_on_random_batches(batch):
    """The value to 1e-12, and the gradient to 1e-9 where no distance lies on a bin centre (a kink,
    where pytorch-metric-learning's autograd takes a one-sided slope and fastap's is 0: even a
    batch of one class, whose loss is 0 whatever the embeddings, gets a gradient there)."""
    pml_losses = pytest.importorskip("pytorch_metric_learning.losses")
    embeddings, labels, num_bins, indices_tuple = batch
    ours_in = embeddings.clone().requires_grad_()
    theirs_in = embeddings.clone().requires_grad_()
    ours = fastap.FastAPLoss(num_bins)(ours_in, labels, indices_tuple)
    theirs = pml_losses.FastAPLoss(num_bins)(theirs_in, labels, indices_tuple)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-12)
    unit = F.normalize(embeddings, dim=1)
    distances = (torch.cdist(unit, unit) ** 2).fill_diagonal_(-1.0)  # (self-pairs: left out)
    centres = torch.linspace(0, 4, num_bins + 1, dtype=torch.float64)
    if ((distances[..., None] - centres).abs() < 1e-9).any() or not theirs.requires_grad:
        return
    ours.backward()
    theirs.backward()
    torch.testing.assert_close(ours_in.grad, theirs_in.grad, rtol=1e-9, atol=1e-12)


def test_miner_weights_follow_pytorch_metric_learning():
    a, p, n = torch.tensor([0, 0, 1]), torch.tensor([2, 3, 2]), torch.tensor([4, 4, 5])
    # Appearances: 0:2, 1:1, 2:2, 3:1, 4:2, 5:1, 6:0 -> divided by the largest (2).
    weights = miner_weights((a, p, n), 7, device="cpu")
    assert weights.tolist() == [1.0, 0.5, 1.0, 0.5, 1.0, 0.5, 0.0]
    # With a reference set only anchors count; pairs (a1, p, a2, n) use a1 and a2.
    pairs = (torch.tensor([0, 1]), torch.tensor([5, 5]), torch.tensor([1]), torch.tensor([6]))
    assert miner_weights(pairs, 3, device="cpu", num_references=7).tolist() == [0.5, 1.0, 0.0]
    assert miner_weights(None, 3, "cpu").tolist() == [1.0, 1.0, 1.0]
    empty = (torch.tensor([], dtype=torch.long),) * 3
    assert miner_weights(empty, 2, "cpu").tolist() == [1.0, 1.0]
    # Pairs of one kind only (the other two tensors empty): weights from the ones there are.
    negative_pairs_only = (*empty[:2], torch.tensor([0, 1]), torch.tensor([2, 2]))
    assert miner_weights(negative_pairs_only, 3, "cpu").tolist() == [0.5, 0.5, 1.0]


def test_aploss_with_miner_and_reference_set(device):
    g = torch.Generator().manual_seed(3)
    queries = torch.randn(12, 6, generator=g, dtype=torch.float64).to(device)
    database = torch.randn(30, 6, generator=g, dtype=torch.float64).to(device)
    labels = torch.randint(0, 3, (12,), generator=g).to(device)
    ref_labels = torch.randint(0, 3, (30,), generator=g).to(device)
    triplets = (torch.tensor([0, 0, 5]), torch.tensor([1, 2, 3]), torch.tensor([7, 8, 9]))
    loss = fastap.APLoss(variant="tie_aware")(queries, labels, triplets, database, ref_labels)
    scores = F.normalize(queries, dim=1) @ F.normalize(database, dim=1).T
    ap = reference.average_precision(
        scores.cpu(), labels=labels.cpu(), ref_labels=ref_labels.cpu(), variant="tie_aware"
    )
    weights = torch.zeros(12, dtype=torch.float64)
    weights[0], weights[5] = 1.0, 0.5  # anchors only: 0 twice, 5 once
    valid = (labels.cpu()[:, None] == ref_labels.cpu()[None]).any(1)
    expected = (weights * (1 - ap))[valid].mean()
    torch.testing.assert_close(loss.cpu(), expected, rtol=0, atol=1e-12)


def test_autocast_cpu_bfloat16():
    """Under autocast the cosine scores come out in bf16; the histograms accumulate in fp32 and
    the loss is fp32, close to the fp32 loss."""
    g = torch.Generator().manual_seed(4)
    embeddings = torch.randn(64, 32, generator=g, requires_grad=True)
    labels = torch.randint(0, 6, (64,), generator=g)
    for loss_fn in (fastap.APLoss(), fastap.FastAPLoss(), fastap.APLoss(variant="tie_aware")):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = loss_fn(embeddings, labels)
        assert loss.dtype == torch.float32
        (grad,) = torch.autograd.grad(loss, embeddings)
        exact = loss_fn(embeddings, labels)
        (exact_grad,) = torch.autograd.grad(exact, embeddings)
        assert abs(loss.item() - exact.item()) < 0.02
        assert torch.isfinite(grad).all()
        assert F.cosine_similarity(grad.flatten(), exact_grad.flatten(), dim=0) > 0.9


@pytest.mark.cuda
def test_autocast_cuda():
    embeddings = torch.randn(64, 32, device="cuda", requires_grad=True)
    labels = torch.randint(0, 6, (64,), device="cuda")
    for dtype in (torch.float16, torch.bfloat16):
        with torch.autocast("cuda", dtype=dtype):
            loss = fastap.APLoss()(embeddings, labels)
        assert loss.dtype == torch.float32
        (grad,) = torch.autograd.grad(loss, embeddings)
        assert torch.isfinite(grad).all()
        exact = fastap.APLoss()(embeddings, labels)
        assert abs(loss.item() - exact.item()) < 0.02
