"""Gradients: float64 gradcheck of the fused op, and equality with autograd on the reference."""

import os

import pytest
import torch

import fastap
from fastap import reference
from fastap.testing import RELEVANCE_FORMS, random_problem


def grads(fn, problem, device, dtype=torch.float64, weights=None):
    problem = problem.to(device)
    scores = problem.scores.to(dtype).detach().requires_grad_()
    ap = fn(scores, problem.relevance, **problem.kwargs())
    if weights is None:
        weights = torch.linspace(0.5, 1.5, ap.shape[0], dtype=ap.dtype, device=ap.device)
    (grad,) = torch.autograd.grad((ap * weights).sum(), scores)
    return grad


@pytest.mark.parametrize("form", RELEVANCE_FORMS)
@pytest.mark.parametrize("shape,num_bins", [((3, 4), 2), ((7, 7), 5), ((6, 11), 20)])
def test_gradcheck(device, form, shape, num_bins):
    problem = random_problem(
        *shape,
        num_bins=num_bins,
        relevance_form=form,
        with_ignore=True,
        exclude_self=True,
        kink_free=True,
        seed=num_bins,
    ).to(device)
    scores = problem.scores.detach().requires_grad_()

    def ap(s):
        return fastap.average_precision(s, problem.relevance, **problem.kwargs())

    def loss(s):
        return fastap.ap_loss(s, problem.relevance, **problem.kwargs())

    assert torch.autograd.gradcheck(ap, (scores,), eps=1e-6, atol=1e-7)
    assert torch.autograd.gradcheck(loss, (scores,), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("form", RELEVANCE_FORMS)
@pytest.mark.parametrize("shape", [(1, 9), (19, 19), (45, 131)])
def test_gradient_matches_reference(device, form, shape):
    for seed, num_bins in enumerate([2, 7, 20, 64]):
        problem = random_problem(
            *shape,
            num_bins=num_bins,
            relevance_form=form,
            with_ignore=seed % 2 == 1,
            exclude_self=seed >= 2,
            seed=seed,
        )
        ours = grads(fastap.average_precision, problem, device)
        ref = grads(reference.average_precision, problem, "cpu")
        torch.testing.assert_close(ours.cpu(), ref, rtol=0, atol=1e-12)


def test_gradient_float32_matches_reference(device):
    problem = random_problem(61, 203, num_bins=25, score_range=(0.0, 1.0), dtype=torch.float32)
    ours = grads(fastap.average_precision, problem, device, dtype=torch.float32)
    ref = grads(reference.average_precision, problem, "cpu", dtype=torch.float64)
    assert ours.dtype == torch.float32
    scale = ref.abs().max()
    torch.testing.assert_close(ours.cpu().double() / scale, ref / scale, rtol=0, atol=1e-5)


def test_gradient_ties(device):
    problem = random_problem(30, 50, num_bins=11, ties=True, with_ignore=True, seed=1)
    ours = grads(fastap.average_precision, problem, device)
    ref = grads(reference.average_precision, problem, "cpu")
    torch.testing.assert_close(ours.cpu(), ref, rtol=0, atol=1e-12)


def test_zero_gradient_off_slope(device):
    """No gradient outside (lo, hi), at the range ends, on exact bin centres, and where ignored."""
    scores = torch.tensor(
        [[1.0, 0.5, 0.0, -1.0, 1.5, -2.0, 0.3, 0.8, -0.7]], dtype=torch.float64, device=device
    )
    relevance = torch.tensor([[1, 0, 1, 0, 1, 0, 1, 0, 1]], dtype=torch.bool, device=device)
    ignore = torch.zeros_like(relevance)
    ignore[0, 8] = True
    scores.requires_grad_()
    fastap.ap_loss(scores, relevance, num_bins=5, ignore=ignore).backward()
    grad = scores.grad[0]
    assert grad[:6].eq(0).all() and grad[8] == 0
    assert grad[6] != 0 and grad[7] != 0
    ref_scores = scores.detach().cpu().requires_grad_()
    reference.ap_loss(ref_scores, relevance.cpu(), num_bins=5, ignore=ignore.cpu()).backward()
    torch.testing.assert_close(scores.grad.cpu(), ref_scores.grad, rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype,below,above", [(torch.float64, 53, 54), (torch.float32, 24, 25)])
def test_a_score_that_rounding_puts_on_a_centre_is_on_it(device, dtype, below, above):
    """docs/design.md section 1: over (-1, 1) with a centre at 0, hi - s rounds to hi for every s
    from -2^-below to 2^-above, so those scores are the centre's (gradient 0), and the next
    representable steps out are not."""
    rel = torch.tensor([[True, False, True, False]], device=device)

    def grad_at(s: float) -> float:
        scores = torch.tensor([[s, 0.5, -0.5, 0.0]], dtype=dtype, device=device)
        scores.requires_grad_()
        (grad,) = torch.autograd.grad(fastap.ap_loss(scores, rel, num_bins=3), scores)
        return grad[0, 0].item()

    for s in (0.0, -(2.0**-below), 2.0**-above, 1e-300 if dtype == torch.float64 else 1e-40):
        assert grad_at(s) == 0.0, s
    for s in (-(2.0**-below) * 1.5, 2.0**-above * 1.5):  # one step further out: the slopes
        assert grad_at(s) != 0.0, s


def test_no_gradient_at_lo_where_its_bins_slope_is_non_zero(device):
    # binning.h BinGrid::sloped: a score exactly at lo gets no gradient (t = Q - 1, f = 1 after
    # the clamp of k), also where the slope of its bins, (g[Q-2] - g[Q-1]) / delta, is non-zero:
    # positives at -0.6 and -0.4 put mass into bin 3 (centre -0.5), so p_3 > 0.
    scores = torch.tensor(
        [[-1.0, -0.6, -0.4, 0.9], [-1.0, -0.6, -0.4, 0.9]], dtype=torch.float64, device=device
    )
    relevance = torch.tensor([[0, 1, 1, 0], [1, 1, 1, 0]], dtype=torch.bool, device=device)
    scores.requires_grad_()
    (grad,) = torch.autograd.grad(fastap.ap_loss(scores, relevance, num_bins=5), scores)
    assert grad[:, 0].eq(0).all(), grad
    assert grad[:, 1:3].ne(0).all()  # the slope there is real
    # The same just above lo: a non-zero gradient (so the test above is not vacuous).
    above = scores.detach().clone()
    above[:, 0] = -1.0 + 1e-9
    above.requires_grad_()
    (grad_above,) = torch.autograd.grad(fastap.ap_loss(above, relevance, num_bins=5), above)
    assert grad_above[:, 0].ne(0).all()


def test_loss_gradient_matches_reference_with_weights(device):
    problem = random_problem(25, 40, with_ignore=True, seed=9)
    weights = torch.rand(25, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    weights[3] = 0
    results = []
    for fn, dev in ((fastap.ap_loss, device), (reference.ap_loss, "cpu")):
        p = problem.to(dev)
        scores = p.scores.detach().requires_grad_()
        loss = fn(scores, p.relevance, query_weights=weights.to(dev), **p.kwargs())
        loss.backward()
        results.append((loss.detach().cpu(), scores.grad.cpu()))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=0, atol=1e-12)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=0, atol=1e-12)


def test_no_valid_query_gives_zero_loss_with_zero_gradient(device):
    scores = torch.rand(4, 6, dtype=torch.float64, device=device, requires_grad=True)
    relevance = torch.zeros(4, 6, dtype=torch.bool, device=device)
    loss = fastap.ap_loss(scores, relevance)
    loss.backward()
    assert loss.item() == 0.0 and loss.requires_grad
    assert scores.grad.eq(0).all()
    # Positives present but all weights zero: the same.
    scores.grad = None
    relevance[:, 0] = True
    weights = torch.zeros(4, dtype=torch.float64, device=device)
    loss = fastap.ap_loss(scores, relevance, query_weights=weights)
    loss.backward()
    assert loss.item() == 0.0 and scores.grad.eq(0).all()


def test_direct_op_calls_have_the_functions_gradients(device):
    """The operators carry the autograd of fastap.ops' Functions: a graph of direct
    torch.ops.fastap calls differentiates (it gave None with a warning before), with the
    gradients of the Python API, and a second derivative raises as it does there."""
    problem = random_problem(
        9, 14, relevance_form="dense", with_ignore=True, kink_free=True, seed=21
    ).to(device)
    scores = problem.scores.detach().requires_grad_()
    ops = torch.ops.fastap

    def through_ops(x):
        n, p, positives = ops.soft_histogram(
            x, problem.relevance, None, None, problem.ignore, False, problem.num_bins,
            *problem.score_range,
        )  # fmt: skip
        return ops.ap_from_histograms(n, p, positives, "tie_aware").sum()

    assert torch.autograd.gradcheck(through_ops, (scores,))
    (direct,) = torch.autograd.grad(through_ops(scores), scores)
    kwargs = dict(ignore=problem.ignore, num_bins=problem.num_bins, variant="tie_aware")
    kwargs["score_range"] = problem.score_range
    ap = fastap.average_precision(scores, problem.relevance, **kwargs)
    (expected,) = torch.autograd.grad(ap.sum(), scores)
    assert torch.equal(direct, expected)
    (first,) = torch.autograd.grad(through_ops(scores), scores, create_graph=True)
    with pytest.raises(RuntimeError, match="gradient of the AP loss is not differentiable"):
        first.sum().backward()


def _saved_histogram_inputs(loss):
    """The tensors that the SoftHistogram node of `loss`'s graph saved for its backward."""
    pending, seen = [loss.grad_fn], set()
    while pending:
        node = pending.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if node.name() == "SoftHistogramBackward":
            return node.saved_tensors
        pending.extend(next_node for next_node, _ in node.next_functions)
    raise AssertionError("no SoftHistogram node in the graph")


def test_strided_inputs_are_copied_once(device):
    """The kernels read contiguous N x M tensors. A transposed score matrix and an expanded
    ignore mask are copied once, before the Function, which saves the copies: its backward op
    copies nothing again (each was copied in the forward and again in the backward before)."""
    base = torch.randn(30, 20, dtype=torch.float64, device=device, requires_grad=True)
    ignore = (torch.rand(30, device=device) < 0.2).expand(20, 30)
    labels = torch.arange(20, device=device) % 3
    ref_labels = torch.arange(30, device=device) % 3
    kwargs = dict(labels=labels, ref_labels=ref_labels, ignore=ignore)
    with torch.profiler.profile() as profile:
        loss = fastap.ap_loss(base.T, **kwargs)
        (grad,) = torch.autograd.grad(loss, base)
    copies = [event.name for event in profile.events() if event.name == "aten::clone"]
    assert len(copies) == 2  # the scores and the mask, in the forward
    saved_scores, _, _, _, saved_ignore = _saved_histogram_inputs(fastap.ap_loss(base.T, **kwargs))
    assert saved_scores.is_contiguous() and saved_ignore.is_contiguous()
    contiguous = base.detach().T.contiguous().requires_grad_()
    kwargs["ignore"] = ignore.contiguous()
    (expected,) = torch.autograd.grad(fastap.ap_loss(contiguous, **kwargs), contiguous)
    assert torch.equal(grad, expected.T)


def test_uint8_masks_reach_the_kernels_as_they_are(device):
    """The kernels read uint8 masks as they read bool ones, so a uint8 relevance or ignore mask
    is neither converted (an N x M copy) nor checked through N x M temporaries: the Function
    saves the caller's tensors themselves, and the values are those of bool masks."""
    problem = random_problem(
        9, 14, relevance_form="dense", with_ignore=True, kink_free=True, seed=5
    ).to(device)
    scores = problem.scores.detach().requires_grad_()
    relevance, ignore = problem.relevance.to(torch.uint8), problem.ignore.to(torch.uint8)
    kwargs = dict(num_bins=problem.num_bins, score_range=problem.score_range)
    loss = fastap.ap_loss(scores, relevance, ignore=ignore, **kwargs)
    _, saved_relevance, _, _, saved_ignore = _saved_histogram_inputs(loss)
    assert saved_relevance.data_ptr() == relevance.data_ptr()
    assert saved_ignore.data_ptr() == ignore.data_ptr()
    (grad,) = torch.autograd.grad(loss, scores)
    as_bool = fastap.ap_loss(scores, problem.relevance, ignore=problem.ignore, **kwargs)
    (expected,) = torch.autograd.grad(as_bool, scores)
    assert torch.equal(loss, as_bool) and torch.equal(grad, expected)
    for mask in (relevance, ignore):
        mask[0, 0] = 2
    with pytest.raises(ValueError, match="relevance must hold only 0 and 1"):
        fastap.ap_loss(scores, relevance, ignore=ignore, **kwargs)
    relevance[0, 0] = 1
    with pytest.raises(ValueError, match="ignore must hold only 0 and 1"):
        fastap.ap_loss(scores, relevance, ignore=ignore, **kwargs)
    with fastap.set_value_checks(False):  # nonzero counts as 1, as it does for other dtypes
        unchecked = fastap.ap_loss(scores, relevance, ignore=ignore, **kwargs)
    ignore[0, 0] = 1
    assert torch.equal(unchecked, fastap.ap_loss(scores, relevance, ignore=ignore, **kwargs))


def test_weights_near_their_dtype_limit_give_the_loss_of_their_ratios(device):
    """Only the ratios of the weights matter: weights near float32's largest value (which summed
    overflow) or beyond it in float64 (which cast to float32 become infinite) give the loss and
    gradient of the same ratios in small numbers."""
    problem = random_problem(6, 9, seed=4).to(device)
    scores = problem.scores.float().detach()
    ratios = torch.tensor([1.0, 2.0, 0.0, 1.0, 3.0, 1.0], device=device)
    for weights in (ratios * 1e38, ratios.double() * 1e300, ratios.double() * 1e-300):
        results = []
        for w in (weights, ratios):
            leaf = scores.clone().requires_grad_()
            loss = fastap.ap_loss(leaf, problem.relevance, query_weights=w, **problem.kwargs())
            (grad,) = torch.autograd.grad(loss, leaf)
            results.append((loss, grad))
        assert torch.isfinite(results[0][0]) and torch.isfinite(results[0][1]).all()
        torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-5, atol=1e-7)


def test_weights_of_queries_without_a_positive_change_nothing(device):
    """A query without a positive counts nowhere, so its weight, however large against the
    others (1e30 / 1e-38 overflows float32), must not shrink theirs to zero. (Against the
    reference in float64: its float32 result is off by 7e-7 of it on aarch64, 2e-7 on x86-64.)"""
    scores = torch.tensor([[0.9, 0.1, -0.3], [0.2, 0.5, 0.7], [0.4, -0.2, 0.8]], device=device)
    relevance = torch.tensor([[0, 1, 1], [0, 0, 0], [1, 0, 1]], dtype=torch.bool, device=device)
    small, huge = torch.tensor([1e-38, 1e30, 3e-38], device=device), torch.tensor([1.0, 7.0, 3.0])
    ratios = torch.tensor([1.0, 0.0, 3.0], dtype=torch.float64)
    expected = fastap.reference.ap_loss(
        scores.cpu().double(), relevance.cpu(), query_weights=ratios
    ).float()
    for weights in (small, huge.double().to(device) * 1e300):
        got = fastap.ap_loss(scores, relevance, query_weights=weights)
        torch.testing.assert_close(got.cpu(), expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_gradient(device, dtype):
    problem = random_problem(20, 70, kink_free=True, seed=12)
    rounded = problem.with_scores(problem.scores.to(dtype))
    ours = grads(fastap.average_precision, rounded, device, dtype=dtype)
    assert ours.dtype == dtype
    ref = grads(reference.average_precision, rounded, "cpu", dtype=torch.float64)
    scale = ref.abs().max()
    # The only rounding left is that of the gradient to the low-precision dtype.
    tolerance = 2 * torch.finfo(dtype).eps
    torch.testing.assert_close(
        ours.cpu().double() / scale, ref / scale, rtol=tolerance, atol=tolerance
    )


def slope_table_lookup(grad_n, grad_p, scores, relevance, labels, ref_labels, ignore, q, lo, hi):
    """dL/dscores as the CUDA ops compute it: the N x 2 x (Q - 1) slope table of
    backward_slope_table (csrc/histogram_inputs.cpp: ATen's sub, then mul by the double
    (Q - 1) / (hi - lo), a float scalar for float tensors), looked up as score_gradient
    (csrc/binning.h) does: 0 off the slopes and where ignored, NaN for a non-finite score."""
    dtype = torch.float64 if scores.dtype == torch.float64 else torch.float32
    g_n = grad_n.to(dtype)
    g = torch.stack([g_n, g_n + grad_p.to(dtype)], 1)
    table = (g[..., :-1] - g[..., 1:]) * ((q - 1) / (hi - lo))
    s = scores.to(dtype)
    grid = torch.tensor([lo, hi, (q - 1) / (hi - lo)], dtype=torch.float64).to(dtype)
    t = ((grid[1] - s) * grid[2]).nan_to_num(0.0).clamp(0, q - 1)  # as BinGrid::position
    k = t.long().clamp(max=q - 2)
    sloped = (s > grid[0]) & (t != k.to(dtype))
    positive = relevance != 0 if relevance is not None else labels[:, None] == ref_labels
    rows = torch.arange(s.shape[0], device=s.device)[:, None]
    slope = table[rows, positive.long(), k]
    grad = torch.where(sloped, slope, torch.zeros_like(slope))
    grad = torch.where(s.isfinite(), grad, s - s)
    if ignore is not None:
        grad = grad.masked_fill(ignore, 0.0)
    return grad.to(scores.dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("num_bins,score_range", [(2, (-1.0, 1.0)), (20, (-0.7, 1.3)),
                                                  (1000, (0.1, 0.7))])  # fmt: skip
def test_gradient_is_the_slope_tables_bit_for_bit(device, dtype, num_bins, score_range):
    """The CPU op computes each row's slopes itself (BinGrid::slope), the CUDA ops read them from
    backward_slope_table: both equal that table's lookup bit for bit, with incoming gradients
    huge, tiny (subnormal in float32), infinite or NaN, given in float64 for float32 scores or
    strided, over ranges whose (Q - 1) / (hi - lo) float32 rounds, and scores on the bin centres,
    at the ends and non-finite."""
    n, m, q = 6, 257, num_bins
    lo, hi = score_range
    g = torch.Generator().manual_seed(q)
    scores = lo - 0.1 * (hi - lo) + 1.2 * (hi - lo) * torch.rand(n, m, generator=g,
                                                                  dtype=torch.float64)  # fmt: skip
    centres = hi - torch.arange(q, dtype=torch.float64) * ((hi - lo) / (q - 1))
    scores[:, :40] = centres[torch.randint(0, q, (n, 40), generator=g)]
    scores[:, -5:] = torch.tensor([lo, hi, float("nan"), float("inf"), -float("inf")])
    scores = scores.to(dtype)
    labels, ref_labels = (
        torch.randint(0, 3, (n,), generator=g),
        torch.randint(0, 3, (m,), generator=g),
    )
    ignore = torch.rand(n, m, generator=g) < 0.2
    scale = torch.tensor([1e-45, 1e-39, 1.0, 1e30, 3e38, 1e300, float("inf"), float("nan")])
    grad_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    for grad_n, grad_p in [
        torch.randn(2, n, q, generator=g, dtype=grad_dtype),
        torch.randn(2, n, q, generator=g, dtype=torch.float64)  # converted for float32 scores
        * scale[torch.randint(0, len(scale), (2, n, q), generator=g)].double(),
        torch.randn(2, q, n, generator=g, dtype=grad_dtype).transpose(1, 2),  # strided
    ]:
        for relevance, mask in [(None, None), (labels[:, None] == ref_labels, ignore)]:
            given = [grad_n, grad_p, scores, relevance]
            given += [None, None, mask] if relevance is not None else [labels, ref_labels, None]
            given = [t.to(device) if t is not None else t for t in given]
            grad = torch.ops.fastap.soft_histogram_backward(*given, False, q, lo, hi, 0)
            expected = slope_table_lookup(*given, q, lo, hi)
            assert torch.equal(grad.isnan(), expected.isnan())
            bits = {8: torch.int64, 4: torch.int32, 2: torch.int16}[grad.element_size()]
            grad, expected = (x.nan_to_num(0.0, torch.inf, -torch.inf) for x in (grad, expected))
            assert torch.equal(grad.view(bits), expected.view(bits))


def test_self_offset_matches_reference(device):
    """Queries that are a slice of the candidates: query i is candidate i + self_offset."""
    problem = random_problem(9, 25, relevance_form="ref_labels", with_ignore=True, seed=13)
    for offset in (0, 7, 16):
        results = []
        for fn, dev in ((fastap.average_precision, device), (reference.average_precision, "cpu")):
            p = problem.to(dev)
            scores = p.scores.detach().requires_grad_()
            kwargs = {**p.kwargs(), "exclude_self": True, "self_offset": offset}
            ap = fn(scores, p.relevance, **kwargs)
            (grad,) = torch.autograd.grad(ap.sum(), scores)
            results.append((ap.detach().cpu(), grad.cpu()))
        torch.testing.assert_close(results[0][0], results[1][0], rtol=0, atol=1e-12)
        torch.testing.assert_close(results[0][1], results[1][1], rtol=0, atol=1e-12)
        own = torch.arange(9)
        assert results[0][1][own, own + offset].eq(0).all()


def _double_backward_cases(device):
    """(name, inputs, loss of the inputs, the (i, j) for which d(grad_i)/d(input_j) must raise)
    for each autograd path: the score-matrix op (AP_Q, a variant, a weighted loss), and the loss
    from embeddings through the score matrix, blockwise and (on CUDA) the fused kernels, in-batch
    and against a second embedding set."""
    g = torch.Generator().manual_seed(3)
    scores = (1.8 * torch.rand(6, 9, generator=g, dtype=torch.float64) - 0.9).to(device)
    relevance = (torch.rand(6, 9, generator=g) < 0.4).to(device)
    queries = torch.randn(12, 5, generator=g).to(device)
    database = torch.randn(10, 5, generator=g).to(device)
    labels = torch.randint(0, 3, (12,), generator=g).to(device)
    ref_labels = torch.randint(0, 3, (10,), generator=g).to(device)
    weight = torch.tensor(0.7, dtype=torch.float64, device=device)
    backends = ["blockwise"] + (["fused"] if device.type == "cuda" else [])
    yield "ap_loss", (scores,), lambda s: fastap.ap_loss(s, relevance), [(0, 0)]
    tie_aware = lambda s: fastap.ap_loss(s, relevance, variant="tie_aware")  # noqa: E731
    yield "tie_aware", (scores,), tie_aware, [(0, 0)]
    # grad_scores = w dL/ds depends on w through the incoming gradient, not the saved inputs.
    weighted = lambda s, w: w * fastap.ap_loss(s, relevance)  # noqa: E731
    yield "weighted", (scores, weight), weighted, [(0, 0), (0, 1)]
    yield "APLoss", (queries,), lambda q: fastap.APLoss()(q, labels), [(0, 0)]
    both = [(0, 0), (0, 1), (1, 0), (1, 1)]
    against = lambda q, d: fastap.APLoss()(q, labels, ref_emb=d, ref_labels=ref_labels)  # noqa: E731
    yield "APLoss, ref_emb", (queries, database), against, both
    for b in backends:
        in_batch = lambda q, b=b: fastap.ap_loss_from_embeddings(q, labels=labels, backend=b)  # noqa: E731
        yield b, (queries,), in_batch, [(0, 0)]

        def two_sets(q, d, b=b):
            return fastap.ap_loss_from_embeddings(q, d, labels=labels, ref_labels=ref_labels,
                                                  backend=b)  # fmt: skip

        yield f"{b}, two sets", (queries, database), two_sets, both


def test_double_backward_raises(device):
    # The backward ops have no derivative: differentiating the gradient with respect to anything
    # it depends on must raise, never give a silent zero (the reference's is not zero);
    # first-order gradients under create_graph stay what they are without it.
    for name, inputs, loss_fn, pairs in _double_backward_cases(device):
        inputs = [x.detach().requires_grad_() for x in inputs]
        plain = torch.autograd.grad(loss_fn(*inputs), inputs)
        grads = torch.autograd.grad(loss_fn(*inputs), inputs, create_graph=True)
        for got, want in zip(grads, plain):
            assert torch.equal(got, want), name
        for i, j in pairs:
            with pytest.raises(RuntimeError, match="gradient of the AP loss is not differentiable"):
                torch.autograd.grad(
                    (grads[i] ** 2).sum(), inputs[j], allow_unused=True, retain_graph=True
                )
                pytest.fail(f"{name}: d(grad {i})/d(input {j}) did not raise")


def _mapping_at(address: int):
    """(start, end, VmFlags) of the memory mapping of /proc/self/smaps that holds `address`."""
    mapping = None
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            fields = line.split()
            if "-" in fields[0] and ":" not in fields[0]:  # a mapping's first line: start-end ...
                start, end = (int(bound, 16) for bound in fields[0].split("-"))
                mapping = (start, end) if start <= address < end else None
            elif mapping and fields[0] == "VmFlags:":
                return (*mapping, fields[1:])
    raise AssertionError("no mapping of /proc/self/smaps holds the address")


def _mapping_of(tensor):
    """(start, end, VmFlags) of the memory mapping that holds `tensor`'s first byte."""
    return _mapping_at(tensor.data_ptr())


def _assert_on_huge_pages_of_its_own(tensor, huge_pages: int):
    """tensor is a mapping of its own (csrc/cpu/huge_pages.h): it starts there, spans
    `huge_pages` whole 2 MB pages and is advised MADV_HUGEPAGE ("hg" in its VmFlags)."""
    start, end, flags = _mapping_of(tensor)
    assert (start, end) == (tensor.data_ptr(), tensor.data_ptr() + huge_pages * HUGE_PAGE)
    assert "hg" in flags


def _resident_bytes():
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


def _transparent_huge_pages_mode():
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as setting:
            return setting.read().split("[")[1].split("]")[0]
    except (OSError, IndexError):
        return None


def _huge_page_size():
    """The kernel's transparent huge page, in bytes (2 MB where it does not say, as
    csrc/cpu/huge_pages.h takes it)."""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/hpage_pmd_size") as setting:
            return int(setting.read())
    except (OSError, ValueError):
        return 2 << 20


def _advice_takes_effect() -> bool:
    """Whether MADV_HUGEPAGE marks a mapping of this process ("hg" in its VmFlags): emulators
    (qemu-user) and sandboxes (gVisor) may accept the advice and ignore it."""
    import ctypes
    import mmap

    if not hasattr(mmap, "MADV_HUGEPAGE"):
        return False
    region = mmap.mmap(-1, 4 * HUGE_PAGE, flags=mmap.MAP_PRIVATE)  # anonymous
    try:
        region.madvise(mmap.MADV_HUGEPAGE)
        view = ctypes.c_char.from_buffer(region)
        try:
            return "hg" in _mapping_at(ctypes.addressof(view))[2]
        finally:
            del view  # (the mapping cannot close while a view exports it)
    except OSError:
        return False
    finally:
        region.close()


HUGE_PAGE = _huge_page_size()
# The tests below size their tensors in 2 MB huge pages (32 MiB, 16 of them, is the smallest
# output that gets a mapping of its own there).
HUGE_PAGES_APPLY = (
    _transparent_huge_pages_mode() == "madvise" and HUGE_PAGE == 2 << 20 and _advice_takes_effect()
)
HUGE_PAGES_REASON = (
    "the huge-page outputs apply where transparent huge pages are 'madvise' (Linux) and the advice"
    " takes effect (not under qemu-user or gVisor); these tests need 2 MB huge pages"
)


@pytest.mark.skipif(not HUGE_PAGES_APPLY, reason=HUGE_PAGES_REASON)
def test_large_cpu_gradient_is_on_huge_pages_of_its_own(monkeypatch):
    """With FASTAP_CPU_HUGE_PAGES=1, a CPU gradient of 32 MiB or more is a mapping of its own
    (csrc/cpu/huge_pages.h): 2 MB aligned, whole 2 MB pages, advised MADV_HUGEPAGE ("hg" in its
    VmFlags), and unmapped when freed (calls in a loop keep the resident set flat); by default it
    comes from torch's allocator, unadvised (unless torch's own THP_MEM_ALLOC_ENABLE=1); the
    gradient is the same either way."""
    problem = random_problem(2048, 4608, num_bins=10, seed=3, dtype=torch.float32)  # 36 MiB
    args = (problem.labels, problem.ref_labels, None, False, problem.num_bins, *problem.score_range)
    n, p, _ = torch.ops.fastap.soft_histogram(problem.scores, None, *args)
    gen = torch.Generator().manual_seed(4)
    grad_n, grad_p = torch.randn(n.shape, generator=gen), torch.randn(p.shape, generator=gen)

    def backward():
        return torch.ops.fastap.soft_histogram_backward(
            grad_n, grad_p, problem.scores, None, *args, 0
        )

    huge = HUGE_PAGE
    monkeypatch.setenv("FASTAP_CPU_HUGE_PAGES", "1")
    advised = backward()
    _assert_on_huge_pages_of_its_own(advised, 18)
    before = _resident_bytes()
    for _ in range(20):
        backward()
    assert _resident_bytes() - before < 8 * huge  # 20 unfreed gradients would add 720 MiB
    monkeypatch.delenv("FASTAP_CPU_HUGE_PAGES")  # the default: off
    plain = backward()
    if os.environ.get("THP_MEM_ALLOC_ENABLE") != "1":  # torch's switch advises every large tensor
        assert "hg" not in _mapping_of(plain)[2]
    assert torch.equal(advised, plain)


@pytest.mark.skipif(not HUGE_PAGES_APPLY, reason=HUGE_PAGES_REASON)
def test_large_cpu_histograms_and_their_gradients_are_on_huge_pages(monkeypatch):
    """Rows with few candidates make the N x Q histograms and their gradients as large as the
    scores: with FASTAP_CPU_HUGE_PAGES=1 those of 32 MiB or more (the forward's n and p, the AP
    formula's backward's grad_n and grad_p) are mappings of their own, like the score gradient, and
    smaller ones (positives, the AP) are not; every value is the same as without."""
    problem = random_problem(2**19, 3, num_bins=17, seed=5, dtype=torch.float32)  # 34 MiB per N x Q
    args = (problem.labels, problem.ref_labels, None, False, problem.num_bins, *problem.score_range)
    gen = torch.Generator().manual_seed(6)
    grad_ap = torch.randn(problem.scores.shape[0], generator=gen)

    def outputs():
        n, p, positives = torch.ops.fastap.soft_histogram(problem.scores, None, *args)
        ap = torch.ops.fastap.ap_from_histograms(n, p, positives, "ap_q")
        grads = torch.ops.fastap.ap_from_histograms_backward(grad_ap, n, p, positives, "ap_q")
        return (n, p, *grads), (positives, ap)

    monkeypatch.setenv("FASTAP_CPU_HUGE_PAGES", "1")
    large, small = outputs()
    for tensor in large:
        _assert_on_huge_pages_of_its_own(tensor, 17)
    for tensor in small:
        assert _mapping_of(tensor)[0] != tensor.data_ptr()  # from torch's allocator (below 32 MiB)
    monkeypatch.delenv("FASTAP_CPU_HUGE_PAGES")
    plain_large, plain_small = outputs()
    for advised, plain in zip(large + small, plain_large + plain_small):
        assert torch.equal(advised, plain)
