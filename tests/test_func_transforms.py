"""The torch.func transforms over fastap's losses: grad, vjp, jacrev, vmap and their compositions
give what plain autograd and a loop over the batch give: to the bit where the same kernels run
in the same order, to the rounding of torch's batched matrix products where vmap takes those; a
second derivative and forward mode raise fastap's messages. On the CPU kernels and the blockwise
embedding path (and each device's score-matrix kernels: test_on_each_device); the fused CUDA
kernels' case is in test_cuda_embeddings.py."""

from __future__ import annotations

import re

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import fastap
from fastap.ops import DOUBLE_BACKWARD_MESSAGE, FORWARD_MODE_MESSAGE
from fastap.testing import RELEVANCE_FORMS, random_problem

# torch runs fastap's operators once per batch element under vmap, and says so.
pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")

LABELS = torch.tensor([0, 1, 0, 2, 1, 0, 2])
RELEVANCE = torch.tensor(
    [
        [1, 0, 0, 1, 0, 1, 0, 0],
        [0, 1, 1, 0, 0, 0, 0, 1],
        [0, 0, 0, 0, 0, 0, 0, 0],  # (no positive: no AP, no gradient)
        [1, 1, 0, 0, 1, 0, 0, 0],
        [0, 0, 1, 0, 1, 1, 1, 0],
    ],
    dtype=torch.bool,
)

QUERY_WEIGHTS = torch.tensor([1.0, 0.5, 2.0, 0.0, 3.0], dtype=torch.float64)


def _scores_loss(variant):
    return lambda s: fastap.ap_loss(s, RELEVANCE, variant=variant, score_range=(-3, 3))


# Each: (a loss of one tensor, a float64 input for it). The embeddings' losses take the blockwise
# path on the CPU, with blocks smaller than the batch (several tiles, their sums in order).
LOSSES = {
    "ap_loss": (_scores_loss("ap_q"), (5, 8)),
    "ap_loss tie_aware": (_scores_loss("tie_aware"), (5, 8)),
    "ap_loss labels, exclude_self": (
        lambda s: fastap.ap_loss(s, labels=LABELS, exclude_self=True, score_range=(-3, 3)),
        (7, 7),
    ),
    "ap_loss_from_embeddings in batch": (
        lambda e: fastap.ap_loss_from_embeddings(e, labels=LABELS, block_size=2),
        (7, 4),
    ),
    "ap_loss_from_embeddings database": (
        lambda e: fastap.ap_loss_from_embeddings(
            e[:3], e, labels=LABELS[:3], ref_labels=LABELS, block_size=2
        ),
        (7, 4),
    ),
    "APLoss": (lambda e: fastap.APLoss(variant="tie_aware_simplified")(e, LABELS), (7, 4)),
    "FastAPLoss": (lambda e: fastap.FastAPLoss()(e, LABELS), (7, 4)),
    "compat.TAPLoss": (
        lambda s: fastap.compat.TAPLoss(10, -3, 3)(s, RELEVANCE.float(), qw=QUERY_WEIGHTS),
        (5, 8),
    ),
}

# The losses with a matrix product of embeddings (which vmap batches).
EMBEDDING_LOSSES = (
    "ap_loss_from_embeddings in batch",
    "ap_loss_from_embeddings database",
    "APLoss",
    "FastAPLoss",
)


def _input(shape, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator, dtype=torch.float64)


def _autograd_gradient(loss, x):
    x = x.detach().clone().requires_grad_()
    (gradient,) = torch.autograd.grad(loss(x), x)
    return gradient


def _assert_same(got, expected):
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def _assert_same_but_rounding(got, expected):
    """To 1e-12 of the largest entry: where vmap (jacrev's too) takes torch's batched matrix
    products (another BLAS kernel than one product's, which may sum in another order)."""
    atol = 1e-12 * float(expected.abs().max())
    torch.testing.assert_close(got, expected, rtol=0, atol=atol)


@pytest.mark.parametrize("name", LOSSES)
def test_grad_and_vjp_are_the_autograd_gradient(name):
    loss, shape = LOSSES[name]
    x = _input(shape)
    expected = _autograd_gradient(loss, x)
    assert expected.abs().sum() > 0  # (a case with a gradient)
    _assert_same(torch.func.grad(loss)(x), expected)
    gradient, value = torch.func.grad_and_value(loss)(x)
    _assert_same(gradient, expected)
    _assert_same(value, loss(x))
    value, vjp = torch.func.vjp(loss, x)
    _assert_same(vjp(torch.tensor(2.0, dtype=x.dtype))[0], 2 * expected)


@pytest.mark.parametrize("name", LOSSES)
def test_vmap_is_the_loop_over_the_batch(name):
    """fastap's operators run once per batch element, so the score-matrix losses are the loop's
    to the bit; the embeddings' losses up to the rounding of torch's batched matrix products."""
    loss, shape = LOSSES[name]
    batch = torch.stack([_input(shape, seed) for seed in range(3)])
    same = _assert_same_but_rounding if name in EMBEDDING_LOSSES else _assert_same
    same(torch.func.vmap(loss)(batch), torch.stack([loss(x) for x in batch]))
    gradients = torch.func.vmap(torch.func.grad(loss))(batch)
    same(gradients, torch.stack([_autograd_gradient(loss, x) for x in batch]))


@pytest.mark.parametrize("name", LOSSES)
def test_jacrev_of_a_loss_is_its_gradient(name):
    loss, shape = LOSSES[name]
    x = _input(shape)
    same = _assert_same_but_rounding if name in EMBEDDING_LOSSES else _assert_same
    same(torch.func.jacrev(loss)(x), _autograd_gradient(loss, x))


@pytest.mark.parametrize("variant", fastap.VARIANTS)
def test_on_each_device(device, variant):
    """The score-matrix kernels of each device (the CUDA ones on a GPU): grad, vmap and their
    composition against backward() and the loop, to the bit."""
    scores = _input((5, 8)).to(device)
    relevance = RELEVANCE.to(device)

    def loss(s):
        return fastap.ap_loss(s, relevance, variant=variant, score_range=(-3, 3))

    _assert_same(torch.func.grad(loss)(scores), _autograd_gradient(loss, scores))
    batch = torch.stack([scores, scores.flip(0), 0.5 * scores])
    _assert_same(torch.func.vmap(loss)(batch), torch.stack([loss(x) for x in batch]))
    expected = torch.stack([_autograd_gradient(loss, x) for x in batch])
    _assert_same(torch.func.vmap(torch.func.grad(loss))(batch), expected)


def test_jacrev_of_the_per_query_ap_is_the_autograd_jacobian():
    """A vector output: jacrev's vmap over the backward (the incoming gradients batched, the saved
    scores not) against one backward per query."""
    scores = _input((5, 8))
    ap = lambda s: fastap.average_precision(s, RELEVANCE, variant="tie_aware")  # noqa: E731
    rows = [_autograd_gradient(lambda s, i=i: ap(s)[i], scores) for i in range(5)]
    jacobian = torch.func.jacrev(ap)(scores)
    assert jacobian.shape == (5, 5, 8)
    _assert_same(jacobian, torch.stack(rows))
    assert jacobian[2].abs().sum() == 0  # (query 2 has no positive)


def test_jacrev_of_the_embeddings_histograms_is_the_autograd_jacobian():
    """The blockwise path's backward under jacrev: the gradients batched, the embeddings not (its
    matrix products batched: to their rounding)."""
    embeddings = fastap.cosine.unit_rows(_input((5, 3)))

    def histograms(e):
        n, p, _ = fastap.embeddings.histograms_from_embeddings(
            e, labels=LABELS[:5], num_bins=4, block_size=2
        )
        return torch.cat([n, p], dim=1)

    jacobian = torch.func.jacrev(histograms)(embeddings)
    assert jacobian.shape == (5, 8, 5, 3)
    for i, j in [(0, 0), (3, 6), (4, 2)]:
        expected = _autograd_gradient(lambda e, i=i, j=j: histograms(e)[i, j], embeddings)
        _assert_same_but_rounding(jacobian[i, j], expected)


def test_grad_over_a_models_parameters_with_functional_call():
    """The functional training step (torch.func.functional_call and grad over the parameters)
    gives the parameters' gradients of loss.backward()."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 4))
    model = model.double()
    inputs = torch.randn(7, 6, dtype=torch.float64)
    criterion = fastap.APLoss()
    params = {name: p.detach() for name, p in model.named_parameters()}

    def loss(params):
        return criterion(torch.func.functional_call(model, params, (inputs,)), LABELS)

    gradients = torch.func.grad(loss)(params)
    criterion(model(inputs), LABELS).backward()
    for name, parameter in model.named_parameters():
        _assert_same(gradients[name], parameter.grad)


def test_an_ensemble_of_models_under_vmap():
    """torch.func's model ensembling: the stacked parameters of 3 models vmapped, each model's
    loss and gradients those of its own backward."""
    torch.manual_seed(1)
    models = [torch.nn.Linear(6, 4).double() for _ in range(3)]
    params, buffers = torch.func.stack_module_state(models)
    inputs = torch.randn(7, 6, dtype=torch.float64)

    def loss(params, buffers):
        embeddings = torch.func.functional_call(models[0], (params, buffers), (inputs,))
        return fastap.ap_loss_from_embeddings(embeddings, labels=LABELS)

    losses = torch.func.vmap(loss)(params, buffers)
    gradients = torch.func.vmap(torch.func.grad(loss))(params, buffers)
    for k, model in enumerate(models):
        expected = fastap.ap_loss_from_embeddings(model(inputs), labels=LABELS)
        expected.backward()
        _assert_same_but_rounding(losses[k], expected.detach())
        _assert_same_but_rounding(gradients["weight"][k], model.weight.grad)
        _assert_same_but_rounding(gradients["bias"][k], model.bias.grad)


def test_vmap_over_the_masks_and_labels():
    """Batched relevance, ignore masks and labels (the scores shared): each element's AP."""
    scores = _input((5, 8))
    relevance = torch.stack([RELEVANCE, ~RELEVANCE, RELEVANCE.roll(1, 1)]).double()
    ignore = torch.zeros(3, 5, 8, dtype=torch.bool)
    ignore[1, :, :2] = True
    by_masks = torch.func.vmap(lambda r, i: fastap.average_precision(scores, r, ignore=i))
    expected = [fastap.average_precision(scores, r, ignore=i) for r, i in zip(relevance, ignore)]
    _assert_same(by_masks(relevance, ignore), torch.stack(expected))
    labels = torch.stack([LABELS[:5], LABELS[:5].flip(0), torch.zeros(5, dtype=torch.int64)])
    square = _input((5, 5))
    by_labels = torch.func.vmap(lambda y: fastap.average_precision(square, labels=y))
    expected = [fastap.average_precision(square, labels=y) for y in labels]
    _assert_same(by_labels(labels), torch.stack(expected))


def test_value_checks_under_the_transforms():
    """grad reads values as eager code does, so its checks run; vmap cannot read a batched
    tensor's values one by one, so it skips theirs, as torch.compile does, and the answers are
    the documented ones: a query with a NaN score has AP NaN, nonzero relevance is a positive."""
    scores = _input((5, 8))
    scores[1, 3] = float("nan")
    loss = _scores_loss("ap_q")
    with pytest.raises(ValueError, match=r"fastap: scores contain NaN .* query row 1"):
        torch.func.grad(loss)(scores)
    values = torch.func.vmap(loss)(torch.stack([scores, scores.nan_to_num()]))
    assert values[0].isnan() and values[1] == loss(scores.nan_to_num())
    relevance = RELEVANCE.double()
    relevance[0, 0] = 2.0
    finite = scores.nan_to_num()
    with pytest.raises(ValueError, match=r"fastap: relevance must hold only 0 and 1"):
        torch.func.grad(lambda s: fastap.ap_loss(s, relevance))(finite)
    # An unbatched tensor's checks still run under vmap.
    with pytest.raises(ValueError, match=r"fastap: relevance must hold only 0 and 1"):
        torch.func.vmap(lambda s: fastap.ap_loss(s, relevance))(finite[None])
    twos = torch.func.vmap(lambda r: fastap.average_precision(finite, r))
    _assert_same(twos(relevance[None])[0], fastap.average_precision(finite, relevance != 0))


@pytest.mark.parametrize("name", ["ap_loss", "ap_loss_from_embeddings in batch"])
def test_a_second_derivative_raises(name):
    loss, shape = LOSSES[name]
    x = _input(shape)
    with pytest.raises(RuntimeError, match=re.escape(DOUBLE_BACKWARD_MESSAGE)):
        torch.func.grad(lambda y: torch.func.grad(loss)(y).sum())(x)
    with pytest.raises(RuntimeError, match=re.escape(DOUBLE_BACKWARD_MESSAGE)):
        torch.func.jacrev(torch.func.jacrev(loss))(x)
    with pytest.raises(RuntimeError, match=re.escape(FORWARD_MODE_MESSAGE)):
        torch.func.hessian(loss)(x)  # (jacfwd of jacrev)


@pytest.mark.parametrize("name", ["ap_loss", "ap_loss_from_embeddings in batch", "APLoss"])
def test_forward_mode_raises(name):
    loss, shape = LOSSES[name]
    x = _input(shape)
    message = re.escape(FORWARD_MODE_MESSAGE)
    with pytest.raises(RuntimeError, match=message):
        torch.func.jvp(loss, (x,), (torch.ones_like(x),))
    with pytest.raises(RuntimeError, match=message):
        torch.func.jacfwd(loss)(x)
    import torch.autograd.forward_ad as forward_ad

    with forward_ad.dual_level(), pytest.raises(RuntimeError, match=message):
        loss(forward_ad.make_dual(x, torch.ones_like(x)))


@given(
    n=st.integers(1, 9),
    m=st.integers(1, 12),
    num_bins=st.integers(2, 12),
    variant=st.sampled_from(fastap.VARIANTS),
    form=st.sampled_from(RELEVANCE_FORMS),
    with_ignore=st.booleans(),
    ties=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_random_problems_grad_and_vmap(n, m, num_bins, variant, form, with_ignore, ties, seed):
    """Random problems, every variant: torch.func.grad is the autograd gradient, and vmap over a
    batch of score matrices the loop, values and gradients."""
    problem = random_problem(
        n, m, num_bins=num_bins, relevance_form=form, with_ignore=with_ignore, ties=ties,
        dtype=torch.float64, seed=seed,
    )  # fmt: skip

    def loss(scores):
        return fastap.ap_loss(scores, problem.relevance, variant=variant, **problem.kwargs())

    scores = problem.scores
    _assert_same(torch.func.grad(loss)(scores), _autograd_gradient(loss, scores))
    batch = torch.stack([scores, scores.flip(1), scores * 0.5])
    _assert_same(torch.func.vmap(loss)(batch), torch.stack([loss(x) for x in batch]))
    expected = torch.stack([_autograd_gradient(loss, x) for x in batch])
    _assert_same(torch.func.vmap(torch.func.grad(loss))(batch), expected)


def test_a_memory_under_grad_and_vmap():
    """CrossBatchMemory under torch.func.grad: the gradients and the entries of the same steps
    with loss.backward(), the entries plain tensors (no transform's wrapper outlives the call).
    Under vmap it evaluates with enqueue=False, and refuses to enqueue a batch of batches."""
    from fastap.memory import CrossBatchMemory

    transformed, plain = CrossBatchMemory(size=10), CrossBatchMemory(size=10)
    for step in range(3):
        x = _input((7, 4), step)
        gradient = torch.func.grad(lambda e: transformed(e, LABELS))(x)
        _assert_same(gradient, _autograd_gradient(lambda e: plain(e, LABELS), x))
        for ours, theirs in zip(transformed.contents(), plain.contents()):
            assert not torch._C._functorch.is_functorch_wrapped_tensor(ours)
            _assert_same(ours, theirs)
    batch = torch.stack([_input((7, 4), seed) for seed in range(3, 5)])
    evaluate = torch.func.vmap(lambda e: transformed(e, LABELS, enqueue=False))
    _assert_same_but_rounding(
        evaluate(batch), torch.stack([plain(e, LABELS, enqueue=False) for e in batch])
    )
    message = r"CrossBatchMemory: embeddings batched by torch\.func\.vmap cannot be enqueued"
    with pytest.raises(ValueError, match=message):
        torch.func.vmap(lambda e: transformed(e, LABELS))(batch)
    assert transformed.filled == 10
    _assert_same(transformed.contents()[0], plain.contents()[0])


@given(
    n=st.integers(1, 9),
    extra=st.integers(0, 5),
    dim=st.integers(1, 5),
    block_size=st.integers(1, 12),
    in_batch=st.booleans(),
    exclude_self=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_random_blockwise_problems_grad_and_jacrev(
    n, extra, dim, block_size, in_batch, exclude_self, seed
):
    """The blockwise embedding path, any tiling (block sizes from 1 to past the batch), in batch
    or against a database: torch.func.grad is the autograd gradient, to the bit, and jacrev of the
    histograms (the gradients batched, the embeddings not) the autograd Jacobian, to the rounding
    of the batched matrix products."""
    g = torch.Generator().manual_seed(seed)
    embeddings = torch.randn(n + extra, dim, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 3, (n + extra,), generator=g)
    options = dict(num_bins=5, block_size=block_size, exclude_self=exclude_self or in_batch)
    if in_batch:
        options.update(labels=labels)
    else:
        options.update(labels=labels[:n], ref_labels=labels)

    def split(e):
        return (e, None) if in_batch else (e[:n], e)

    def histograms(e):
        n_hist, p_hist, _ = fastap.embeddings.histograms_from_embeddings(*split(e), **options)
        return torch.cat([n_hist, p_hist], dim=1)

    def loss(e):
        return fastap.ap_loss_from_embeddings(*split(e), **options)

    _assert_same(torch.func.grad(loss)(embeddings), _autograd_gradient(loss, embeddings))
    jacobian = torch.func.jacrev(histograms)(embeddings)
    rows = torch.randint(0, jacobian.shape[0], (3,), generator=g).tolist()
    cols = torch.randint(0, jacobian.shape[1], (3,), generator=g).tolist()
    for i, j in zip(rows, cols):
        expected = _autograd_gradient(lambda e, i=i, j=j: histograms(e)[i, j], embeddings)
        _assert_same_but_rounding(jacobian[i, j], expected)


@pytest.mark.parametrize("transform", ["vmap", "grad"])
def test_transforms_traced_by_torch_compile(transform):
    """torch.compile (fullgraph) of a function that applies vmap or grad to fastap's loss: the
    same results as the transform run eagerly."""
    if transform == "grad" and torch.__version__ < (2, 11):  # (a TorchVersion)
        pytest.skip(
            "dynamo before torch 2.11 fails to inline the Functions' forward under grad (seen "
            "with 2.5.1, 2.8.0 and 2.10.0; docs/design.md)"
        )
    loss, shape = LOSSES["ap_loss tie_aware"]
    x = _input(shape)
    transformed = torch.func.grad(loss) if transform == "grad" else torch.func.vmap(loss)
    argument = x if transform == "grad" else torch.stack([x, 0.5 * x])
    compiled = torch.compile(transformed, backend="eager", fullgraph=True)
    _assert_same(compiled(argument), transformed(argument))
