"""The fused from-embeddings CUDA kernels on a GPU (skipped without one; run by
benchmarks/gpu_check.sh). tests/test_cuda_emulation.py runs the same kernels on the CPU."""

import pytest
import torch
import torch.nn.functional as F

import fastap
from fastap.embeddings import histograms_from_embeddings
from fastap.ops import HAS_FUSED_EMBEDDING_KERNELS
from fastap.testing import exact_embeddings, round_like_matrix_unit

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not HAS_FUSED_EMBEDDING_KERNELS, reason="no fused CUDA kernels built"),
]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def exact_problem(n, m, d, dtype, seed, same_set=False, self_offset=0):
    g = torch.Generator().manual_seed(seed)
    database = exact_embeddings(m, d, dtype, g)
    ref_labels = torch.randint(0, 3, (m,), generator=g)
    if same_set:
        queries = database[self_offset : self_offset + n]
        labels = ref_labels[self_offset : self_offset + n]
    else:
        queries = exact_embeddings(n, d, dtype, g)
        labels = torch.randint(0, 3, (n,), generator=g)
    return queries, database, labels, ref_labels


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "n,m,d", [(1, 1, 1), (70, 133, 40), (300, 9000, 13), (65, 300, 300), (4100, 70, 64)]
)
def test_fused_ops_equal_the_score_matrix_op(dtype, n, m, d):
    """Exactly representable embeddings: the tensor cores' scores are the fp64 scores, so the
    histograms match the CPU op on them to fp32 accumulation, and the gradients match G @ DB with
    G rounded as the kernels feed it to the tensor cores."""
    queries, database, labels, ref_labels = exact_problem(n, m, d, dtype, seed=n + d)
    num_bins = 20
    # Exact in fp64, and exactly representable in fp32: the fp32 scores are the kernels' scores,
    # binned by the CPU op in the same precision (and its backward uses the same fp32 table).
    scores = (queries.double() @ database.double().T).float()
    op_args = (None, labels, ref_labels, None, False, num_bins, -1.0, 1.0, 0)
    n_cpu, p_cpu, positives_cpu = torch.ops.fastap.soft_histogram(scores, *op_args)
    cuda = [t.cuda() for t in (queries, database, labels, ref_labels)]
    fused_args = (False, 0, num_bins, -1.0, 1.0)
    n_gpu, p_gpu, positives_gpu = torch.ops.fastap.embedding_histogram(*cuda, *fused_args)
    assert torch.equal(positives_gpu.cpu(), positives_cpu)
    torch.testing.assert_close(n_gpu.cpu(), n_cpu, rtol=1e-5, atol=1e-4)  # both float32
    torch.testing.assert_close(p_gpu.cpu(), p_cpu, rtol=1e-5, atol=1e-4)

    g = torch.Generator().manual_seed(1)
    grad_n, grad_p = torch.randn((2, n, num_bins), generator=g)
    grad_scores = torch.ops.fastap.soft_histogram_backward(grad_n, grad_p, scores, *op_args)
    grad_scores = round_like_matrix_unit(grad_scores.double(), dtype)
    grad_q, grad_db = torch.ops.fastap.embedding_histogram_backward(
        grad_n.cuda(), grad_p.cuda(), *cuda, *fused_args
    )
    for got, want in ((grad_q, grad_scores @ database.double()),
                      (grad_db, grad_scores.T @ queries.double())):  # fmt: skip
        scale = want.abs().max().clamp_min(1e-30)
        tol = 1e-5 if dtype == torch.float32 else torch.finfo(dtype).eps
        torch.testing.assert_close(got.cpu().double() / scale, want / scale, rtol=0, atol=tol)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,m,d", [(1, 1, 1), (70, 133, 40), (300, 9000, 13), (129, 700, 256)])
def test_fused_ops_on_wgmma_equal_the_wmma_ops(monkeypatch, dtype, n, m, d):
    """FASTAP_WGMMA=1 in a build for 9.0a on an H100/H200 (skipped elsewhere): both products on
    wgmma. Exactly representable embeddings make every score exact on either path, so the
    histograms equal the WMMA path's bit for bit (and the score-matrix op's); the gradients are
    fp32 sums of the same products in another order: equal to the WMMA path's and to G @ DB within
    one rounding of the output dtype."""
    queries, database, labels, ref_labels = exact_problem(n, m, d, dtype, seed=n + d)
    cuda = [t.cuda() for t in (queries, database, labels, ref_labels)]
    num_bins = 20
    fused_args = (False, 0, num_bins, -1.0, 1.0)
    g = torch.Generator().manual_seed(1)
    grad_n, grad_p = torch.randn((2, n, num_bins), generator=g)

    def run():
        histograms = torch.ops.fastap.embedding_histogram(*cuda, *fused_args)
        grads = torch.ops.fastap.embedding_histogram_backward(
            grad_n.cuda(), grad_p.cuda(), *cuda, *fused_args
        )
        return histograms, grads

    monkeypatch.delenv("FASTAP_WGMMA", raising=False)
    assert not fastap.embeddings.fused_uses_wgmma(cuda[0])
    wmma_histograms, wmma_grads = run()
    monkeypatch.setenv("FASTAP_WGMMA", "1")
    if not fastap.embeddings.fused_uses_wgmma(cuda[0]):
        pytest.skip("no wgmma path in this build or on this GPU (FASTAP_CUDA_ARCH=9.0a, sm_90)")
    # (only bfloat16 / float16 embeddings of dimension <= 256 go to wgmma)
    for other in (cuda[0].float(), cuda[0].double(), cuda[0].new_zeros(3, 257)):
        assert not fastap.embeddings.fused_uses_wgmma(other)
    histograms, grads = run()
    for got, want in zip(histograms, wmma_histograms):
        assert torch.equal(got, want)
    scores = (queries.double() @ database.double().T).float()
    op_args = (None, labels, ref_labels, None, False, num_bins, -1.0, 1.0, 0)
    n_cpu, p_cpu, positives_cpu = torch.ops.fastap.soft_histogram(scores, *op_args)
    assert torch.equal(histograms[2].cpu(), positives_cpu)
    torch.testing.assert_close(histograms[0].cpu(), n_cpu, rtol=1e-5, atol=1e-4)  # both float32
    torch.testing.assert_close(histograms[1].cpu(), p_cpu, rtol=1e-5, atol=1e-4)

    grad_scores = torch.ops.fastap.soft_histogram_backward(grad_n, grad_p, scores, *op_args)
    grad_scores = round_like_matrix_unit(grad_scores.double(), dtype)
    wants = (grad_scores @ database.double(), grad_scores.T @ queries.double())
    for got, wmma, want in zip(grads, wmma_grads, wants):
        scale = want.abs().max().clamp_min(1e-30)
        tol = torch.finfo(dtype).eps
        torch.testing.assert_close(got.cpu().double() / scale, want / scale, rtol=0, atol=tol)
        torch.testing.assert_close(got.double() / scale.cuda(), wmma.double() / scale.cuda(),
                                   rtol=0, atol=2 * tol)  # fmt: skip


@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_loss_close_to_the_exact_loss(dtype):
    """Random embeddings: the loss and the gradients of the fused path against the fp64
    blockwise path, within the precision of the matrix unit."""
    g = torch.Generator().manual_seed(0)
    queries = torch.randn(1000, 96, generator=g)
    labels = torch.randint(0, 20, (1000,), generator=g)
    exact = queries.double().requires_grad_()
    loss = fastap.ap_loss_from_embeddings(exact, labels=labels, backend="blockwise")
    (grad,) = torch.autograd.grad(loss, exact)
    fused_in = queries.to(device="cuda", dtype=dtype).requires_grad_()
    fused = fastap.ap_loss_from_embeddings(fused_in, labels=labels.cuda(), backend="fused")
    (fused_grad,) = torch.autograd.grad(fused, fused_in)
    tol = 2e-3 if dtype == torch.float32 else 2e-2
    assert abs(fused.item() - loss.item()) < tol
    cosine = F.cosine_similarity(fused_grad.double().cpu().flatten(), grad.flatten(), dim=0)
    assert cosine > (0.999 if dtype == torch.float32 else 0.99)


def test_fused_self_offset_deterministic_and_compiled():
    queries, database, labels, ref_labels = (
        t.cuda() for t in exact_problem(77, 5000, 24, torch.bfloat16, 3, True, 9)
    )

    def run():
        q = queries.clone().requires_grad_()
        db = database.clone().requires_grad_()
        loss = fastap.ap_loss_from_embeddings(
            q, db, labels=labels, ref_labels=ref_labels, exclude_self=True, self_offset=9,
            backend="fused",
        )  # fmt: skip
        return (loss.detach(), *torch.autograd.grad(loss, (q, db)))

    first = run()
    for _ in range(2):
        assert all(torch.equal(a, b) for a, b in zip(first, run()))
    exact = fastap.ap_loss_from_embeddings(
        queries.double().cpu(), database.double().cpu(), labels=labels.cpu(),
        ref_labels=ref_labels.cpu(), exclude_self=True, self_offset=9,
    )  # fmt: skip
    assert abs(first[0].item() - exact.item()) < 1e-4  # exact scores: only fp32 sums differ

    compiled = torch.compile(
        lambda q, db: fastap.ap_loss_from_embeddings(
            q, db, labels=labels, ref_labels=ref_labels, exclude_self=True, self_offset=9,
            backend="fused",
        ),
        fullgraph=True,
    )  # fmt: skip
    # Compiled, inductor fuses the normalisation (fastap.cosine.unit_rows, in fp32 both ways)
    # and may sum a row's squares in another order, so that a unit entry may round to the other
    # bf16 neighbour: not eager's value to fp32 rounding, but the exact loss to the same bound.
    loss = compiled(queries, database)
    assert abs(loss.item() - exact.item()) < 1e-4
    assert torch.equal(compiled(queries, database), loss)


@pytest.fixture
def fused_calls(monkeypatch):
    """The dtype of the queries of each call of the fused kernels' Function, in order."""
    calls = []
    original = fastap.ops.EmbeddingHistogram.apply
    monkeypatch.setattr(
        fastap.embeddings.EmbeddingHistogram,
        "apply",
        lambda *args: calls.append(args[0].dtype) or original(*args),
    )
    return calls


def test_auto_backend_takes_the_fused_kernel(fused_calls):
    calls = fused_calls
    x = torch.randn(50, 16, device="cuda")
    labels = torch.randint(0, 3, (50,), device="cuda")
    histograms_from_embeddings(x.bfloat16(), labels=labels)
    assert calls == [torch.bfloat16]
    # (Not monkeypatch.setattr: torch.backends.cuda.matmul serves allow_tf32 through
    # __getattr__, which newer pytest cannot restore, leaving TF32 on for the tests after.)
    previous = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        histograms_from_embeddings(x, labels=labels)  # exact fp32 asked for: blockwise
        assert calls == [torch.bfloat16]
        torch.backends.cuda.matmul.allow_tf32 = True
        histograms_from_embeddings(x, labels=labels)
        assert calls == [torch.bfloat16, torch.float32]
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_under_autocast_the_fused_kernel_takes_the_autocast_dtype(fused_calls, dtype):
    """float32 embeddings in an autocast block (which, with TF32 off as by default, take the
    blockwise path outside one): the fused kernel gets the unit rows in autocast's dtype (the
    score-matrix path's product; fastap.cosine), and the loss is close to the blockwise one in the
    same block (which rounds each score to that dtype)."""
    calls = fused_calls
    g = torch.Generator().manual_seed(5)
    x = torch.randn(300, 40, generator=g).cuda().requires_grad_()
    labels = torch.randint(0, 5, (300,), generator=g).cuda()
    with torch.autocast("cuda", dtype=dtype):
        fused = fastap.ap_loss_from_embeddings(x, labels=labels)
        blockwise = fastap.ap_loss_from_embeddings(x, labels=labels, backend="blockwise")
    assert calls == [dtype]
    assert fused.dtype == blockwise.dtype == torch.float32
    assert abs(fused.item() - blockwise.item()) < 2e-2
    (grad,) = torch.autograd.grad(fused, x)
    assert grad.dtype == torch.float32 and torch.isfinite(grad).all()


def test_embeddings_wider_than_the_fused_kernels_take_the_blockwise_path():
    # One column past the backward's grid.z bound (65535 blocks of 256 columns): the operator
    # refuses it, the auto backend takes the blockwise path, backend="fused" says why not.
    from fastap.embeddings import FUSED_MAX_DIM, fused_unavailable_reason

    wide = torch.zeros(2, FUSED_MAX_DIM + 1, dtype=torch.bfloat16, device="cuda")
    wide[:, 0] = 1
    labels = torch.tensor([0, 1], device="cuda")
    reason = fused_unavailable_reason(wide, wide, 20)
    assert reason is not None and f"dimension up to {FUSED_MAX_DIM}" in reason
    assert fused_unavailable_reason(wide[:, :-1], wide[:, :-1], 20) is None
    args = (wide, wide, labels, labels, False, 0, 20, -1.0, 1.0)
    with pytest.raises(ValueError, match=f"dimension up to {FUSED_MAX_DIM}, got"):
        torch.ops.fastap.embedding_histogram(*args)
    with pytest.raises(ValueError, match="backend='fused' is not available"):
        histograms_from_embeddings(wide, labels=labels, backend="fused")
    n, p, positives = histograms_from_embeddings(wide, labels=labels)
    expected = histograms_from_embeddings(wide.cpu(), labels=labels.cpu())
    for got, want in zip((n, p, positives), expected):
        assert torch.equal(got.cpu(), want)


@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_opcheck(dtype):
    queries, database, labels, ref_labels = (
        t.cuda() for t in exact_problem(37, 70, 24, dtype, seed=2)
    )
    args = (queries, database, labels, ref_labels, False, 0, 9, -1.0, 1.0)
    torch.library.opcheck(torch.ops.fastap.embedding_histogram.default, args)
    n, p, _ = torch.ops.fastap.embedding_histogram(*args)
    grad_n, grad_p = torch.randn_like(n), torch.randn_like(p)
    torch.library.opcheck(
        torch.ops.fastap.embedding_histogram_backward.default, (grad_n, grad_p, *args)
    )


FIRST_CALL_IN_CAPTURE = """
import os
import torch
import torch.nn.functional as F
import fastap

g = torch.Generator().manual_seed(0)
q = F.normalize(torch.randn(300, 64, generator=g), dim=1).to("cuda", torch.bfloat16)
labels = torch.randint(0, 5, (300,), generator=g).cuda()
args = (q, q, labels, labels, True, 0, 20, -1.0, 1.0)
torch.ops.fastap.embedding_histogram(*args)  # loads the module; WMMA, no question asked yet
os.environ["FASTAP_WGMMA"] = "1"
graph = torch.cuda.CUDAGraph()
with torch.cuda.graph(graph):  # the process's first call that asks the image about wgmma
    captured = torch.ops.fastap.embedding_histogram(*args)
graph.replay()
eager = torch.ops.fastap.embedding_histogram(*args)
assert all(torch.equal(a, b) for a, b in zip(captured, eager))
print("captured == eager; wgmma:", fastap.embeddings.fused_uses_wgmma(q))
"""


def test_first_wgmma_question_may_come_inside_graph_capture(monkeypatch):
    """Whether the loaded image has wgmma is asked once per process and device, with a copy from
    the device: when that first call is being captured into a CUDA graph (torch.compile's
    reduce-overhead mode), the copy must not break the capture, and its answer must be the one
    asked outside a capture (here, by this process)."""
    import os
    import subprocess
    import sys

    env = {key: value for key, value in os.environ.items() if key != "FASTAP_WGMMA"}
    done = subprocess.run(
        [sys.executable, "-c", FIRST_CALL_IN_CAPTURE],
        capture_output=True,
        text=True,
        timeout=60,  # (under gpu_check.sh's 90 s per test, so that a hang fails this test alone)
        env=env,
    )
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    assert "captured == eager" in done.stdout
    monkeypatch.setenv("FASTAP_WGMMA", "1")
    outside = fastap.embeddings.fused_uses_wgmma(torch.zeros(3, 64, dtype=torch.bfloat16).cuda())
    assert f"wgmma: {outside}" in done.stdout, done.stdout


def test_fused_kernels_under_torch_func():
    """torch.func.grad through the fused kernels is loss.backward()'s gradient (the same kernels,
    deterministic); vmap runs them once per batch element, as the loop does (to the rounding of
    the batched normalisation before them). (backend="fused" raises where it cannot be taken.)"""
    g = torch.Generator().manual_seed(7)
    labels = torch.randint(0, 4, (90,), generator=g).cuda()
    batch = torch.randn(2, 90, 24, generator=g).cuda().bfloat16()

    def loss(x):
        return fastap.ap_loss_from_embeddings(x, labels=labels, backend="fused")

    expected = []
    for x in batch:
        x = x.clone().requires_grad_()
        (gradient,) = torch.autograd.grad(loss(x), x)
        expected.append(gradient)
        assert torch.equal(torch.func.grad(loss)(x.detach()), gradient)
    losses = torch.func.vmap(loss)(batch)
    gradients = torch.func.vmap(torch.func.grad(loss))(batch)
    for k, x in enumerate(batch):
        assert abs(losses[k].item() - loss(x).item()) < 1e-3
        scale = expected[k].float().abs().max().item()
        torch.testing.assert_close(
            gradients[k].float(), expected[k].float(), rtol=0, atol=2e-2 * scale
        )
