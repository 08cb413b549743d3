"""torch.library.opcheck of the registered ops, and torch.compile(fullgraph=True) parity."""

import pytest
import torch

import fastap
from fastap.testing import RELEVANCE_FORMS, random_problem


def op_args(problem):
    return (
        problem.scores,
        problem.relevance,
        problem.labels,
        problem.ref_labels
        if problem.labels is None or problem.ref_labels is not None
        else problem.labels,
        problem.ignore,
        problem.exclude_self,
        problem.num_bins,
        *problem.score_range,
    )


@pytest.mark.parametrize("form", RELEVANCE_FORMS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_opcheck(device, form, dtype):
    problem = random_problem(
        11, 11, relevance_form=form, with_ignore=True, exclude_self=True, dtype=dtype, seed=1
    ).to(device)
    args = op_args(problem)
    torch.library.opcheck(torch.ops.fastap.soft_histogram.default, args)
    n, p, positives = torch.ops.fastap.soft_histogram(*args)
    assert positives.dtype == torch.int64 and positives.shape == (n.shape[0],)
    grad_n, grad_p = torch.randn_like(n), torch.randn_like(p)
    torch.library.opcheck(torch.ops.fastap.soft_histogram_backward.default, (grad_n, grad_p, *args))


def test_meta_tensors():
    scores = torch.empty(7, 9, device="meta", dtype=torch.bfloat16)
    labels = torch.empty(7, dtype=torch.long, device="meta")
    ref_labels = torch.empty(9, dtype=torch.long, device="meta")
    n, p, positives = torch.ops.fastap.soft_histogram(
        scores, None, labels, ref_labels, None, False, 13, -1, 1
    )
    assert n.shape == p.shape == (7, 13) and n.dtype == torch.float32 and n.device.type == "meta"
    assert positives.shape == (7,) and positives.dtype == torch.int64
    # Every argument by its schema name, as a caller may pass them.
    options = dict(exclude_self=True, num_bins=13, lo=-1.0, hi=1.0, self_offset=2)
    n, _, _ = torch.ops.fastap.soft_histogram(scores, None, labels, ref_labels, None, **options)
    grad = torch.ops.fastap.soft_histogram_backward(
        n, n, scores, None, labels, ref_labels, None, **options
    )
    assert n.shape == (7, 13) and grad.shape == scores.shape and grad.device.type == "meta"


@pytest.mark.parametrize("form", ["dense", "labels"])
def test_compile_fullgraph_parity(device, form):
    torch._dynamo.reset()
    problem = random_problem(
        33,
        33,
        relevance_form=form,
        with_ignore=True,
        exclude_self=True,
        dtype=torch.float32,
        seed=3,
    ).to(device)

    def step(scores, relevance, labels, ignore, weights):
        return fastap.ap_loss(
            scores,
            relevance,
            labels=labels,
            num_bins=20,
            ignore=ignore,
            exclude_self=True,
            query_weights=weights,
        )

    weights = torch.rand(33, device=device)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (step, compiled):
        scores = problem.scores.detach().clone().requires_grad_()
        loss = fn(scores, problem.relevance, problem.labels, problem.ignore, weights)
        loss.backward()
        results.append((loss.detach(), scores.grad))
    assert torch.equal(results[0][0], results[1][0])
    assert torch.equal(results[0][1], results[1][1])


@pytest.fixture
def keep_subnormals():
    """Undo a process-wide side effect of torch's inductor, not of fastap.

    torch 2.5's inductor builds its CPU kernels with -ffast-math, and loading them turns on
    flush-to-zero for the whole process (torch 2.13's does not). Later tests that draw subnormal
    floats (hypothesis) would then fail. fastap's own code is checked for this separately
    (test_forward.py::test_fastap_keeps_subnormal_floats).
    """
    yield
    torch.set_flush_denormal(False)


def test_compile_inductor_module(device, keep_subnormals):
    torch._dynamo.reset()
    embeddings = torch.randn(24, 8, device=device, requires_grad=True)
    labels = torch.arange(24, device=device) % 5
    loss_fn = fastap.APLoss()
    eager = loss_fn(embeddings, labels)
    (eager_grad,) = torch.autograd.grad(eager, embeddings)
    compiled = torch.compile(loss_fn, fullgraph=True)
    loss = compiled(embeddings, labels)
    (grad,) = torch.autograd.grad(loss, embeddings)
    torch.testing.assert_close(loss, eager, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad, eager_grad, rtol=1e-5, atol=1e-6)


def test_compile_fullgraph_dynamic_shapes_with_default_arguments(device, keep_subnormals):
    """dynamic=True may trace the default score_range's floats as symbolic: the checks of the
    range take them (comparisons, not math.isfinite), and one graph serves every size."""
    torch._dynamo.reset()
    functions = (fastap.average_precision, fastap.ap_loss)
    compiled = [
        torch.compile(lambda s, y, f=f: f(s, labels=y), fullgraph=True, dynamic=True)
        for f in functions
    ]
    for n in (5, 7, 9):
        scores = torch.rand(n, n, device=device) * 2 - 1
        labels = torch.arange(n, device=device) % 3
        for function, compiled_function in zip(functions, compiled):
            torch.testing.assert_close(
                compiled_function(scores, labels),
                function(scores, labels=labels),
                rtol=1e-6,
                atol=1e-6,
            )


def test_compile_fullgraph_with_a_miners_tuples(device):
    """The miner's weights have a shape that does not depend on the indices' values, and their
    range check is a check of values (skipped while compiling), so fullgraph holds."""
    torch._dynamo.reset()
    embeddings = torch.randn(10, 6, device=device, requires_grad=True)
    labels = torch.arange(10, device=device) % 3
    tuples = tuple(
        torch.tensor(t, device=device) for t in ([0, 1, 1, 9], [3, 4, 4, 6], [2, 2, 5, 1])
    )
    loss_fn = fastap.APLoss()
    eager = loss_fn(embeddings, labels, tuples)
    (eager_grad,) = torch.autograd.grad(eager, embeddings)
    loss = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")(embeddings, labels, tuples)
    (grad,) = torch.autograd.grad(loss, embeddings)
    assert torch.equal(loss, eager) and torch.equal(grad, eager_grad)


def test_public_api_on_meta_tensors():
    """Meta tensors have no values: the value checks are skipped and the results are meta
    tensors of the right shapes and dtypes."""
    scores = torch.empty(5, 7, device="meta")
    relevance = torch.empty(5, 7, device="meta")  # 0/1 floats: a value check in eager mode
    weights = torch.empty(5, device="meta")
    labels = torch.empty(5, dtype=torch.long, device="meta")
    ref_labels = torch.empty(7, dtype=torch.long, device="meta")
    ap = fastap.average_precision(scores, relevance, ignore=relevance)
    assert ap.device.type == "meta" and ap.shape == (5,) and ap.dtype == torch.float32
    loss = fastap.ap_loss(
        scores.double(), labels=labels, ref_labels=ref_labels, query_weights=weights
    )
    assert loss.device.type == "meta" and loss.shape == () and loss.dtype == torch.float64
    embeddings = torch.empty(5, 3, device="meta")
    tuples = (labels[:2], labels[2:4], labels[1:3])
    for loss in (
        fastap.APLoss()(embeddings, labels, tuples),
        fastap.APLoss(score_matrix_limit=0)(embeddings, labels),
        fastap.ap_loss_from_embeddings(embeddings, labels=labels),
    ):
        assert loss.device.type == "meta" and loss.shape == ()


@pytest.mark.parametrize("in_batch", [True, False])
def test_compile_loss_from_embeddings_without_score_matrix(device, in_batch):
    # The in-batch case passes each tensor to the autograd Function once (the database and its
    # labels are the queries'), which torch.compile(fullgraph=True) requires.
    torch._dynamo.reset()
    queries = torch.randn(24, 8, device=device, requires_grad=True)
    database = None if in_batch else torch.randn(17, 8, device=device, requires_grad=True)
    labels = torch.arange(24, device=device) % 5
    ref_labels = None if in_batch else torch.arange(17, device=device) % 5
    inputs = [queries] + ([] if in_batch else [database])
    backends = ["blockwise"] + (["fused"] if device.type == "cuda" else [])
    for backend in backends:

        def loss_fn(q, d, backend=backend):
            return fastap.ap_loss_from_embeddings(
                q, d, labels=labels, ref_labels=ref_labels, block_size=7, backend=backend
            )

        eager = loss_fn(queries, database)
        eager_grads = torch.autograd.grad(eager, inputs)
        loss = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")(queries, database)
        grads = torch.autograd.grad(loss, inputs)
        assert torch.equal(loss, eager), backend
        for got, want in zip(grads, eager_grads):
            assert torch.equal(got, want), backend


def test_export():
    class Model(torch.nn.Module):
        def forward(self, scores, labels):
            return fastap.average_precision(scores, labels=labels)

    scores = torch.rand(6, 6)
    labels = torch.arange(6) % 2
    exported = torch.export.export(Model(), (scores, labels))
    assert torch.equal(exported.module()(scores, labels), Model()(scores, labels))


def test_export_of_the_blockwise_path_takes_static_shapes():
    """Its loop over query blocks specialises the batch: exported with static shapes it equals
    eager; a dynamic batch meets torch's own specialisation error (not a complaint about a
    block_size the caller never gave)."""

    class Model(torch.nn.Module):
        def forward(self, embeddings, labels):
            return fastap.ap_loss_from_embeddings(embeddings, labels=labels)

    embeddings, labels = torch.randn(10, 8), torch.arange(10) % 3
    exported = torch.export.export(Model(), (embeddings, labels))
    assert torch.equal(exported.module()(embeddings, labels), Model()(embeddings, labels))
    batch = torch.export.Dim("batch")
    with pytest.raises(Exception) as raised:
        torch.export.export(
            Model(), (embeddings, labels), dynamic_shapes=({0: batch}, {0: batch}), strict=False
        )
    assert "block_size" not in str(raised.value)


def test_fused_embedding_op_on_meta_tensors():
    """The shapes of the fused embedding op (CUDA-only kernels) for torch.compile and export."""
    queries = torch.empty(7, 5, device="meta", dtype=torch.bfloat16)
    database = torch.empty(9, 5, device="meta", dtype=torch.bfloat16)
    labels = torch.empty(7, dtype=torch.long, device="meta")
    ref_labels = torch.empty(9, dtype=torch.long, device="meta")
    n, p, positives = torch.ops.fastap.embedding_histogram(
        queries, database, labels, ref_labels, False, 0, 13, -1.0, 1.0
    )
    assert n.shape == p.shape == (7, 13) and n.dtype == torch.float32
    assert positives.shape == (7,) and positives.dtype == torch.int64
    grad_q, grad_db = torch.ops.fastap.embedding_histogram_backward(
        n, p, queries, database, labels, ref_labels, False, 0, 13, -1.0, 1.0
    )
    assert grad_q.shape == (7, 5) and grad_db.shape == (9, 5) and grad_q.dtype == torch.bfloat16


def test_constant_mark_is_what_torch_compiler_sets():
    """fastap.embeddings marks its TF32 getter constant to torch.compile itself (the public
    decorator imports torch._dynamo): the mark must be the one torch's decorator sets, and all of
    it, in each torch the suite runs with. (test_embeddings.py's TF32 test compiles the getter.)"""
    from fastap.embeddings import constant_to_compile, fp32_matmul_allows_tf32

    def by_torch():
        return True

    def by_fastap():
        return True

    assert torch.compiler.assume_constant_result(by_torch) is by_torch
    assert constant_to_compile(by_fastap) is by_fastap
    assert vars(by_torch) == vars(by_fastap) != {}
    assert vars(fp32_matmul_allows_tf32) == vars(by_torch)


def test_the_automatic_limit_of_a_gpu_batch_is_a_constant_to_compile(monkeypatch):
    """score_matrix_limit="auto" reads the device's memory through gpu_memory_bytes, a constant
    to torch.compile (called with the device's index while tracing, not traced): a function that
    resolves it for a CUDA device compiles with fullgraph, here with a stand-in for the device's
    memory (no GPU), marked as the real one is. The stand-in opens a file, which dynamo cannot
    trace: without the mark, fullgraph fails."""
    import os

    from fastap.embeddings import constant_to_compile
    from fastap.losses import score_matrix_limit_bytes

    assert getattr(fastap.losses.gpu_memory_bytes, "_dynamo_marked_constant", False)
    asked = []

    @constant_to_compile
    def memory(index: int) -> int:
        with open(os.devnull) as untraceable:
            untraceable.read()
        asked.append(index)
        return 32 * 2**30 + index

    monkeypatch.setattr(fastap.losses, "gpu_memory_bytes", memory)

    def scaled(x):
        return x * score_matrix_limit_bytes("auto", torch.device("cuda", 1))

    torch._dynamo.reset()
    compiled = torch.compile(scaled, fullgraph=True, backend="eager")
    assert compiled(torch.ones(3)).tolist() == [(32 * 2**30 + 1) // 16] * 3
    assert asked and set(asked) == {1}


def test_import_leaves_torch_dynamo_unimported():
    """`import fastap` does not import torch._dynamo (over a second, which was half of the import),
    and the modules that need it come on first use, by attribute or by import."""
    import subprocess
    import sys

    script = (
        "import sys, fastap\n"
        "assert 'torch._dynamo' not in sys.modules, 'import fastap imported torch._dynamo'\n"
        "assert {'distributed', 'memory'} <= set(dir(fastap))\n"
        "assert fastap.memory.CrossBatchMemory and fastap.distributed.DistributedAPLoss\n"
        "from fastap import memory\n"
        "from fastap.distributed import gather_embeddings\n"
        "assert memory is sys.modules['fastap.memory']\n"
        "try:\n"
        "    fastap.no_such_module\n"
        "except AttributeError as error:\n"
        "    assert 'no_such_module' in str(error), error\n"
        "else:\n"
        "    raise AssertionError('fastap.no_such_module was found')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-3000:]
