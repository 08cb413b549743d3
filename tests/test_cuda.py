"""CUDA kernels against the CPU op (which the other tests compare with the reference). Skipped
without a CUDA device; run on the GPU machine by benchmarks/gpu_check.sh."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import fastap
from fastap.testing import RELEVANCE_FORMS, random_problem

from problem_strategies import check_against_reference, kernel_problems

pytestmark = pytest.mark.cuda


def both(problem, fn=fastap.average_precision):
    results = []
    for device in ("cpu", "cuda"):
        p = problem.to(device)
        scores = p.scores.detach().requires_grad_()
        out = fn(scores, p.relevance, **p.kwargs())
        (grad,) = torch.autograd.grad(out.sum(), scores)
        results.append((out.detach().cpu(), grad.cpu()))
    return results


def op_args(problem):
    lo, hi = problem.score_range
    return (problem.relevance, problem.labels, problem.ref_labels, problem.ignore,
            problem.exclude_self, problem.num_bins, lo, hi)  # fmt: skip


def check_ops_equal_cpu(problem, self_offset=0, seed=0):
    """The histogram ops on the GPU against the CPU op. Forward: CUDA accumulates the histograms
    in the histogram dtype (fp32 but for fp64 scores), the CPU in fp64, so fp32 histograms agree
    to fp32 rounding of sums. Backward, from the same incoming gradients: the same table lookups,
    bitwise."""
    gpu = problem.to("cuda")
    args, gpu_args = (*op_args(problem), self_offset), (*op_args(gpu), self_offset)
    n, p, positives = torch.ops.fastap.soft_histogram(problem.scores, *args)
    n_gpu, p_gpu, positives_gpu = torch.ops.fastap.soft_histogram(gpu.scores, *gpu_args)
    assert torch.equal(positives_gpu.cpu(), positives)
    if problem.scores.dtype == torch.float64:
        tol = dict(rtol=1e-12, atol=1e-10)
    else:
        tol = dict(rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(n_gpu.cpu(), n, **tol)
    torch.testing.assert_close(p_gpu.cpu(), p, **tol)
    g = torch.Generator().manual_seed(seed)
    grad_n, grad_p = torch.randn((2, *n.shape), generator=g, dtype=n.dtype)
    grad = torch.ops.fastap.soft_histogram_backward(grad_n, grad_p, problem.scores, *args)
    grad_gpu = torch.ops.fastap.soft_histogram_backward(grad_n.cuda(), grad_p.cuda(), gpu.scores,
                                                        *gpu_args)  # fmt: skip
    assert torch.equal(grad_gpu.cpu(), grad)


# Without an ignore mask, label rows of whole units take the fast kernels (fast_path_applies; the
# forward's unit is a pair, the backward's a 16-byte vector): (37, 1000) in one chunk per row,
# (5, 70000) in several, and (264, 264) with exclude_self; (37, 1002) the fast forward and the
# general backward (but in float64). With the mask, or dense relevance, the general kernels.
@pytest.mark.parametrize("with_ignore", [True, False])
@pytest.mark.parametrize("form", RELEVANCE_FORMS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    "shape,num_bins",
    [
        ((1, 1), 2),
        ((37, 1000), 20),
        ((37, 1002), 20),
        ((300, 301), 100),
        ((5, 70000), 10),
        ((3, 0), 5),
        ((264, 264), 20),
    ],
)
def test_cuda_equals_cpu(form, dtype, shape, num_bins, with_ignore):
    problem = random_problem(
        *shape,
        num_bins=num_bins,
        relevance_form=form,
        with_ignore=with_ignore,
        exclude_self=shape[0] == shape[1],
        dtype=dtype,
        seed=shape[0],
    )
    check_ops_equal_cpu(problem)

    # End to end (AP and its gradient through autograd): the fp32 rounding of the CUDA histograms
    # goes through the AP formula, whose gradient depends on them.
    (cpu_ap, cpu_grad), (cuda_ap, cuda_grad) = both(problem)
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(cuda_ap.double(), cpu_ap.double(), rtol=0, atol=tol)
    scale = cpu_grad.double().abs().max().clamp_min(1e-30) if cpu_grad.numel() else 1.0
    grad_tol = 1e-12 if dtype == torch.float64 else max(2e-5, 4 * torch.finfo(dtype).eps)
    torch.testing.assert_close(
        cuda_grad.double() / scale, cpu_grad.double() / scale, rtol=0, atol=grad_tol
    )


# The fuzzed suite on the GPU, on the random problems that the CPU emulation takes too
# (problem_strategies.kernel_problems): the ops against the CPU op, and on float64 problems each
# variant's AP and gradient, computed on the GPU, against the N x Q x M reference on the CPU
# (where that is small enough to build).
@given(kernel_problems(), st.sampled_from(fastap.VARIANTS), st.integers(0, 2**31 - 1))
def test_cuda_equals_cpu_and_reference_on_random_problems(case, variant, seed):
    problem, self_offset = case
    check_ops_equal_cpu(problem, self_offset, seed)
    n, m = problem.scores.shape
    if problem.scores.dtype == torch.float64 and n * m * problem.num_bins <= 10**7:
        own = self_offset if problem.exclude_self else None
        check_against_reference(problem, "cuda", variant, own)


def test_cuda_deterministic_and_graph_capture():
    problem = random_problem(257, 4099, dtype=torch.float32, with_ignore=True).to("cuda")
    scores = problem.scores.detach().requires_grad_()

    def step():
        scores.grad = None
        loss = fastap.ap_loss(scores, problem.relevance, **problem.kwargs())
        loss.backward()
        return loss.detach().clone(), scores.grad.clone()

    first = step()
    for _ in range(3):
        again = step()
        assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    compiled = torch.compile(
        lambda s: fastap.ap_loss(s, problem.relevance, **problem.kwargs()),
        mode="reduce-overhead",
        fullgraph=True,
    )
    counters = torch._dynamo.utils.counters
    counters.clear()
    for _ in range(3):
        s = problem.scores.detach().clone().requires_grad_()
        loss = compiled(s)
        loss.backward()
    # Inductor only logs a graph it could not capture and runs it without: that must not happen.
    assert counters["inductor"]["cudagraph_skips"] == 0, dict(counters["inductor"])
    torch.testing.assert_close(loss.detach(), first[0], rtol=1e-6, atol=1e-6)
    scale = first[1].abs().max().item()
    torch.testing.assert_close(s.grad, first[1], rtol=1e-5, atol=1e-6 * scale)


def test_cuda_eager_graph_capture_without_value_checks():
    # Eager CUDA graph capture (torch.cuda.graph) allows no host synchronisation, which the checks
    # of input values need; set_value_checks(False) leaves them out, and the replayed loss and
    # gradient follow new scores copied into the captured input.
    problem = random_problem(64, 1000, dtype=torch.float32).to("cuda")
    static = problem.scores.detach().clone().requires_grad_()

    def step():
        loss = fastap.ap_loss(static, problem.relevance, **problem.kwargs())
        loss.backward()
        return loss

    with fastap.set_value_checks(False):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up off the capturing stream, as torch asks
            for _ in range(2):
                static.grad = None
                step()
        torch.cuda.current_stream().wait_stream(side)
        static.grad = None
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            loss = step()
    fresh = random_problem(64, 1000, dtype=torch.float32, seed=1).scores.to("cuda")
    with torch.no_grad():
        static.copy_(fresh)
    graph.replay()
    expected_scores = fresh.clone().requires_grad_()
    expected = fastap.ap_loss(expected_scores, problem.relevance, **problem.kwargs())
    expected.backward()
    torch.testing.assert_close(loss, expected, rtol=0, atol=0)
    torch.testing.assert_close(static.grad, expected_scores.grad, rtol=0, atol=0)


def test_cuda_large_num_bins_error_is_clear():
    scores = torch.rand(4, 5, device="cuda")
    # (with its numbers: test_errors.py's test_the_ops_messages_keep_their_numbers)
    with pytest.raises(ValueError, match=r"num_bins = 100000 is too large .*at most \d+ bins"):
        fastap.average_precision(
            scores,
            labels=torch.arange(4, device="cuda") % 2,
            ref_labels=torch.arange(5, device="cuda") % 2,
            num_bins=100000,
        )


def test_a_build_without_cuda_kernels_says_how_to_rebuild(monkeypatch):
    """CUDA tensors given to a CPU-only build (stood in for by its two flags): every entry point
    raises the error that says how to rebuild, not the dispatcher's, the embeddings' paths too
    (which would take the blockwise backend and its score-matrix ops)."""
    import fastap.embeddings

    monkeypatch.setattr(fastap.ops, "HAS_CUDA_KERNELS", False)
    monkeypatch.setattr(fastap.embeddings, "HAS_FUSED_EMBEDDING_KERNELS", False)
    labels = torch.arange(6, device="cuda") % 3
    rebuild = "is on a CUDA device but this build of fastap has no CUDA kernels. Rebuild"
    with pytest.raises(RuntimeError, match=f"scores {rebuild}"):
        fastap.ap_loss(torch.rand(6, 6, device="cuda"), labels=labels, ref_labels=labels)
    embeddings = torch.randn(6, 8, device="cuda")
    for call in (
        lambda: fastap.ap_loss_from_embeddings(embeddings, labels=labels),
        lambda: fastap.APLoss(score_matrix_limit=0)(embeddings, labels),
    ):
        with pytest.raises(RuntimeError, match=f"queries {rebuild}"):
            call()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_second_device_runs_there_with_the_same_results():
    # Inputs on cuda:1 while cuda:0 is current: every op runs on cuda:1 (its device guard) and
    # gives what cuda:0 gives, bitwise (the work split depends on the sizes only).
    problem = random_problem(37, 4099, dtype=torch.float32, with_ignore=True)
    g = torch.Generator().manual_seed(0)
    embeddings = torch.randn(300, 64, generator=g).to(torch.bfloat16)
    labels = torch.randint(0, 5, (300,), generator=g)
    results = []
    for index in (0, 1):
        device = torch.device("cuda", index)
        p = problem.to(device)
        scores = p.scores.detach().requires_grad_()
        loss = fastap.ap_loss(scores, p.relevance, **p.kwargs())
        loss.backward()
        e = embeddings.to(device).requires_grad_()
        fused = fastap.ap_loss_from_embeddings(e, labels=labels.to(device), backend="auto")
        fused.backward()
        assert {t.device for t in (loss, scores.grad, fused, e.grad)} == {device}
        results.append([t.cpu() for t in (loss, scores.grad, fused, e.grad)])
        assert torch.cuda.current_device() == 0
    for on_0, on_1 in zip(*results):
        assert torch.equal(on_0, on_1)


@pytest.mark.parametrize("score_range", [(-0.3, 1.7), (0.1, 0.9), (-1.0, 1.1), (0.5, 0.5001)])
@pytest.mark.parametrize("num_candidates", [1000, 1001])  # the fast and the general kernels
def test_cuda_backward_equals_cpu_where_hi_is_not_a_float32(score_range, num_candidates):
    """Ranges whose hi is not a float32 value, and scores on the bin centres: the CUDA kernels
    place every score as the CPU does, bit for bit (a position rounded differently on the GPU,
    by an fma say, moves a score on a bin centre into the neighbouring bin, with another slope)."""
    lo, hi = score_range
    num_bins = 21
    delta = (hi - lo) / (num_bins - 1)
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([hi - k * delta for k in range(num_bins)], dtype=torch.float64)
    spread = lo + (hi - lo) * torch.rand(
        6, num_candidates - num_bins, generator=g, dtype=torch.float64
    )
    scores = torch.cat([centres.expand(6, -1), spread], 1).float()
    labels = torch.arange(6) % 2
    ref_labels = torch.arange(num_candidates) % 2
    args = (None, labels, ref_labels, None, False, num_bins, lo, hi)
    n, p, positives = torch.ops.fastap.soft_histogram(scores, *args)
    grad_n, grad_p = torch.randn_like(n), torch.randn_like(p)
    grad = torch.ops.fastap.soft_histogram_backward(grad_n, grad_p, scores, *args)
    cuda_args = tuple(a.cuda() if torch.is_tensor(a) else a for a in args)
    n_gpu, p_gpu, positives_gpu = torch.ops.fastap.soft_histogram(scores.cuda(), *cuda_args)
    grad_gpu = torch.ops.fastap.soft_histogram_backward(
        grad_n.cuda(), grad_p.cuda(), scores.cuda(), *cuda_args
    )
    assert torch.equal(grad_gpu.cpu(), grad)
    assert torch.equal(positives_gpu.cpu(), positives)
    # (the histograms are sums, in another order on the GPU)
    torch.testing.assert_close(n_gpu.cpu(), n, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(p_gpu.cpu(), p, rtol=1e-5, atol=1e-5)
