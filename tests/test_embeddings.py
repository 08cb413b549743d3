"""The loss from embeddings (blockwise, no N x M score matrix) against the score-matrix path."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import fastap
from fastap.embeddings import histograms_from_embeddings


def embedding_problem(n, m, d, seed=0, classes=4, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    queries = torch.randn(n, d, generator=g, dtype=dtype)
    database = torch.randn(m, d, generator=g, dtype=dtype)
    labels = torch.randint(0, classes, (n,), generator=g)
    ref_labels = torch.randint(0, classes, (m,), generator=g)
    return queries, database, labels, ref_labels


def score_matrix_loss(queries, database, labels, ref_labels, **kwargs):
    scores = F.normalize(queries, dim=1) @ F.normalize(database, dim=1).T
    return fastap.ap_loss(scores, labels=labels, ref_labels=ref_labels, **kwargs)


@pytest.mark.parametrize("shape", [(1, 1, 1), (7, 13, 5), (33, 61, 17), (50, 50, 3)])
@pytest.mark.parametrize("block_size", [1, 4, 1000])
@pytest.mark.parametrize("variant", ["ap_q", "tie_aware"])
def test_equals_score_matrix_path(device, shape, block_size, variant):
    queries, database, labels, ref_labels = (
        t.to(device) for t in embedding_problem(*shape, seed=shape[0])
    )
    weights = torch.rand(shape[0], dtype=torch.float64, device=device)
    results = []
    for fn in (fastap.ap_loss_from_embeddings, score_matrix_loss):
        q, db = queries.clone().requires_grad_(), database.clone().requires_grad_()
        extra = {"block_size": block_size} if fn is fastap.ap_loss_from_embeddings else {}
        loss = fn(
            q,
            db,
            labels=labels,
            ref_labels=ref_labels,
            num_bins=15,
            variant=variant,
            query_weights=weights,
            **extra,
        )
        loss.backward()
        results.append((loss.detach(), q.grad, db.grad))
    for ours, ref in zip(*results):
        torch.testing.assert_close(ours, ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("offset", [None, 0, 5])
def test_in_batch_and_self_offset(device, offset):
    queries, database, labels, ref_labels = (
        t.to(device) for t in embedding_problem(11, 20, 6, seed=2)
    )
    if offset is None:  # the batch against itself
        q = queries.clone().requires_grad_()
        loss = fastap.ap_loss_from_embeddings(q, labels=labels, block_size=3)
        (grad,) = torch.autograd.grad(loss, q)
        q2 = queries.clone().requires_grad_()
        unit = F.normalize(q2, dim=1)
        expected = fastap.ap_loss(unit @ unit.T, labels=labels, exclude_self=True)
        (expected_grad,) = torch.autograd.grad(expected, q2)
    else:
        db = database.clone().requires_grad_()
        loss = fastap.ap_loss_from_embeddings(
            queries,
            db,
            labels=labels,
            ref_labels=ref_labels,
            exclude_self=True,
            self_offset=offset,
            block_size=4,
        )
        (grad,) = torch.autograd.grad(loss, db)
        db2 = database.clone().requires_grad_()
        scores = F.normalize(queries, dim=1) @ F.normalize(db2, dim=1).T
        expected = fastap.ap_loss(
            scores, labels=labels, ref_labels=ref_labels, exclude_self=True, self_offset=offset
        )
        (expected_grad,) = torch.autograd.grad(expected, db2)
    torch.testing.assert_close(loss, expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(grad, expected_grad, rtol=0, atol=1e-12)


@pytest.mark.parametrize("exclude_self", [True, False])
@pytest.mark.parametrize("block_size", [1, 3, 8, 1000])
@pytest.mark.parametrize("variant", ["ap_q", "tie_aware", "tie_aware_simplified"])
def test_in_batch_square_tiles_equal_the_reference(device, exclude_self, block_size, variant):
    """In-batch the blockwise path bins square tiles, each for two blocks of rows (one of them
    transposed), and sums each row's pieces: the reference's loss and gradient on the whole score
    matrix, for tiles of side 1, 3 (an edge tile of 1 row), 7 and 19 (one tile), float64."""
    n = 19
    g = torch.Generator().manual_seed(block_size)
    base = torch.randn(n, 4, generator=g, dtype=torch.float64)
    base[5] = base[2]  # a tie between two rows of different tiles
    labels = torch.randint(0, 3, (n,), generator=g).to(device)
    e = base.to(device).requires_grad_()
    loss = fastap.ap_loss_from_embeddings(
        e, labels=labels, exclude_self=exclude_self, variant=variant, block_size=block_size,
        backend="blockwise", num_bins=9,
    )  # fmt: skip
    (grad,) = torch.autograd.grad(loss, e)
    e2 = base.to(device).requires_grad_()
    unit = F.normalize(e2, dim=1)
    expected = fastap.reference.ap_loss(
        unit @ unit.T, labels=labels, exclude_self=exclude_self, variant=variant, num_bins=9
    )
    (expected_grad,) = torch.autograd.grad(expected, e2)
    torch.testing.assert_close(loss, expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(grad, expected_grad, rtol=0, atol=1e-12)


def test_in_batch_square_tiles_in_float32_and_bfloat16():
    """float32: the histograms' pieces summed in float32, within 1e-6 of float64's loss and
    gradients. bfloat16: the score-matrix path's loss (the same bf16 scores binned, the pieces
    summed in fp32) and its gradient up to bf16 rounding (that path's products run in bf16, the
    tiles' gradients and products here in fp32)."""
    g = torch.Generator().manual_seed(11)
    base = torch.randn(70, 9, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 5, (70,), generator=g)

    def loss_and_grad(dtype, block_size):
        e = base.to(dtype).requires_grad_()
        if block_size == "matrix":
            loss = fastap.APLoss()(e, labels)
        else:
            loss = fastap.ap_loss_from_embeddings(
                e, labels=labels, block_size=block_size, backend="blockwise"
            )
        return loss, torch.autograd.grad(loss, e)[0]

    want_loss, want_grad = loss_and_grad(torch.float64, None)
    matrix_loss, matrix_grad = loss_and_grad(torch.bfloat16, "matrix")
    for block_size in (None, 5):
        loss, grad = loss_and_grad(torch.float32, block_size)
        assert loss.dtype == grad.dtype == torch.float32
        torch.testing.assert_close(loss.double(), want_loss, rtol=0, atol=1e-6)
        torch.testing.assert_close(grad.double(), want_grad, rtol=0, atol=1e-6)
        loss, grad = loss_and_grad(torch.bfloat16, block_size)
        assert loss.dtype == torch.float32 and grad.dtype == torch.bfloat16
        torch.testing.assert_close(loss, matrix_loss, rtol=0, atol=1e-6)
        assert (grad.double() - matrix_grad.double()).norm() <= 1e-2 * matrix_grad.double().norm()


@st.composite
def blockwise_cases(draw):
    """(problem, options): float64 queries (half of them of small integers: ties, scores on bin
    centres) against a database, or in batch; self exclusion at any offset; any block size,
    range, bins, variant and query weights."""
    n, d = draw(st.integers(1, 60)), draw(st.integers(1, 12))
    in_batch = draw(st.booleans())
    m = n if in_batch else draw(st.integers(0, 90))
    queries, database, labels, ref_labels = embedding_problem(
        n, m, d, seed=draw(st.integers(0, 2**31 - 1)), classes=draw(st.integers(1, 6))
    )
    rounded = draw(st.booleans())
    if rounded:
        queries = queries.round()
    lo = draw(st.floats(-1.5, 0.5))
    options = dict(
        num_bins=draw(st.integers(2, 40)), score_range=(lo, lo + draw(st.floats(0.1, 2.5))),
        variant=draw(st.sampled_from(fastap.VARIANTS)),
        query_weights=torch.rand(n, dtype=torch.float64) if draw(st.booleans()) else None,
    )  # fmt: skip
    if in_batch:
        database, ref_labels = queries, labels
        options.update(exclude_self=True, self_offset=0)
    elif m >= n and draw(st.booleans()):
        options.update(exclude_self=True, self_offset=draw(st.integers(0, m - n)))
    block_size = draw(st.none() | st.integers(1, 70))
    return (queries, database, labels, ref_labels, in_batch, rounded), block_size, options


@given(blockwise_cases())
def test_equals_score_matrix_path_on_random_problems(case):
    """The loss to 1e-12 and both gradients to 1e-9; the gradients only off ties, as the blocks'
    products may round a score on a bin centre or range end (a kink) 1 ulp off the matrix's."""
    (queries, database, labels, ref_labels, in_batch, rounded), block_size, options = case
    q, db = queries.clone().requires_grad_(), database.clone().requires_grad_()
    blockwise = fastap.ap_loss_from_embeddings(
        q, None if in_batch else db, labels=labels, ref_labels=None if in_batch else ref_labels,
        block_size=block_size, backend="blockwise", **options,
    )  # fmt: skip
    q_matrix = queries.clone().requires_grad_()
    db_matrix = q_matrix if in_batch else database.clone().requires_grad_()
    matrix = score_matrix_loss(q_matrix, db_matrix, labels, ref_labels, **options)
    torch.testing.assert_close(blockwise, matrix, rtol=0, atol=1e-12)
    if rounded:
        return
    blockwise.backward()
    matrix.backward()
    torch.testing.assert_close(q.grad, q_matrix.grad, rtol=1e-9, atol=1e-11)
    if not in_batch:
        torch.testing.assert_close(db.grad, db_matrix.grad, rtol=1e-9, atol=1e-11)


def test_gradcheck():
    queries, database, labels, ref_labels = embedding_problem(5, 9, 4, seed=3)
    q, db = queries.requires_grad_(), database.requires_grad_()

    def loss(a, b):
        return fastap.ap_loss_from_embeddings(
            a, b, labels=labels, ref_labels=ref_labels, num_bins=7, block_size=2
        )

    assert torch.autograd.gradcheck(loss, (q, db), eps=1e-6, atol=1e-7)


def test_float32_and_bfloat16(device):
    queries, database, labels, ref_labels = (
        t.to(device) for t in embedding_problem(40, 90, 24, seed=4, dtype=torch.float32)
    )
    ref = score_matrix_loss(queries.double(), database.double(), labels, ref_labels)
    ours = fastap.ap_loss_from_embeddings(
        queries, database, labels=labels, ref_labels=ref_labels, block_size=7
    )
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours.double(), ref, rtol=0, atol=1e-6)
    low = fastap.ap_loss_from_embeddings(
        queries.bfloat16(), database.bfloat16(), labels=labels, ref_labels=ref_labels
    )
    assert low.dtype == torch.float32 and abs(low.item() - ref.item()) < 0.02


def test_histograms_and_errors():
    queries, database, labels, ref_labels = embedding_problem(6, 8, 3, seed=5)
    n, p, positives = histograms_from_embeddings(
        queries, database, labels=labels, ref_labels=ref_labels, num_bins=4
    )
    assert n.shape == p.shape == (6, 4) and torch.equal(
        positives, (labels[:, None] == ref_labels[None]).sum(1)
    )
    with pytest.raises(ValueError, match="needs ref_labels"):
        fastap.ap_loss_from_embeddings(queries, database, labels=labels)
    with pytest.raises(ValueError, match="same dimension"):
        fastap.ap_loss_from_embeddings(
            queries, database[:, :2], labels=labels, ref_labels=ref_labels
        )
    with pytest.raises(ValueError, match="block_size"):
        fastap.ap_loss_from_embeddings(queries, labels=labels, block_size=0)
    with pytest.raises(ValueError, match="row i \\+ self_offset"):
        fastap.ap_loss_from_embeddings(
            queries,
            database,
            labels=labels,
            ref_labels=ref_labels,
            exclude_self=True,
            self_offset=3,
        )
    # self_offset as in fastap.ap_loss: None (the default) is 0; given without exclude_self
    # (even 0) it is an error, on either path of the modules' per_query_loss too.
    with pytest.raises(ValueError, match="self_offset only applies with exclude_self=True"):
        fastap.ap_loss_from_embeddings(queries, labels=labels, exclude_self=False, self_offset=0)
    for limit in (2**30, 0):
        with pytest.raises(ValueError, match="self_offset only applies with exclude_self=True"):
            fastap.APLoss(score_matrix_limit=limit).per_query_loss(
                queries, queries, labels, labels, exclude_self=False, self_offset=0
            )
    with pytest.raises(TypeError, match="self_offset must be an int"):
        fastap.ap_loss_from_embeddings(queries, labels=labels, self_offset=1.0)
    with pytest.raises(ValueError, match="query_weights is on meta but queries is on cpu"):
        weights = torch.ones(queries.shape[0], device="meta")
        fastap.ap_loss_from_embeddings(queries, labels=labels, query_weights=weights)
    explicit, default = (
        fastap.ap_loss_from_embeddings(
            queries[:5],
            database,
            labels=labels[:5],
            ref_labels=ref_labels,
            exclude_self=True,
            self_offset=offset,
        )
        for offset in (0, None)
    )
    assert explicit.item() == default.item()
    with pytest.raises(TypeError, match="labels must be an integer"):
        fastap.ap_loss_from_embeddings(queries, labels=labels.float())
    with pytest.raises(ValueError, match="variant"):
        fastap.ap_loss_from_embeddings(queries, labels=labels, variant="x")


@pytest.mark.parametrize("backward_in_autocast", [False, True])
def test_under_autocast_the_blocks_differentiate_the_scores_they_binned(backward_in_autocast):
    """Under torch.autocast the score-matrix path bins the unit rows' product in bf16; the
    blockwise path bins the same scores and recomputes the same ones in its backward (also when
    the backward runs inside the autocast block). One block against a database: the score-matrix
    path's gradients; smaller blocks, and the in-batch case, differ from them by bf16 rounding of
    partial products. (Before, a backward outside the block recomputed the scores in fp32: 7%
    off.)"""
    queries, database, labels, ref_labels = embedding_problem(
        40, 30, 24, seed=8, dtype=torch.float32
    )

    def loss_and_grads(make_loss, in_batch):
        q, db = queries.clone().requires_grad_(), database.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = make_loss(q, None if in_batch else db)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=backward_in_autocast):
            grads = torch.autograd.grad(loss, (q,) if in_batch else (q, db))
        return loss.detach(), grads

    def matrix_loss(q, db):
        if db is None:
            return fastap.APLoss()(q, labels)
        return fastap.APLoss()(q, labels, ref_emb=db, ref_labels=ref_labels)

    for in_batch in (False, True):
        want_loss, want_grads = loss_and_grads(matrix_loss, in_batch)
        for block_size in (None, 7):
            # (In-batch, the score-matrix path sums the query's two gradients in bf16.)
            tol = 1e-3 if block_size is None and not in_batch else 1e-2
            loss, grads = loss_and_grads(
                lambda q, db, block_size=block_size: fastap.ap_loss_from_embeddings(
                    q,
                    db,
                    labels=labels,
                    ref_labels=None if db is None else ref_labels,
                    block_size=block_size,
                ),
                in_batch,
            )
            torch.testing.assert_close(loss, want_loss, rtol=0, atol=1e-6)
            for got, want in zip(grads, want_grads):
                assert got.dtype == torch.float32
                assert (got - want).norm() <= tol * want.norm(), (in_batch, block_size)


@pytest.mark.parametrize("loss_type", ["APLoss", "FastAPLoss", "memory"])
def test_modules_switch_to_blocks_above_the_limit(loss_type):
    """With score_matrix_limit = 0 the modules take the blockwise path: the same values."""
    queries, database, labels, ref_labels = embedding_problem(14, 21, 5, seed=6)
    results = []
    for limit in (2**30, 0):
        make = fastap.FastAPLoss if loss_type == "FastAPLoss" else fastap.APLoss
        loss_fn = make(score_matrix_limit=limit)
        q = queries.clone().requires_grad_()
        if loss_type == "memory":
            memory = fastap.memory.CrossBatchMemory(loss_fn, size=30)
            memory(database, ref_labels)
            loss = memory(q, labels)
        else:
            loss = loss_fn(q, labels) + loss_fn(q, labels, ref_emb=database, ref_labels=ref_labels)
            # The batch itself as the reference set, under other labels: a reference set like
            # any other (its labels, no self-match excluded), though it is the same tensor.
            loss = loss + loss_fn(q, labels, ref_emb=q, ref_labels=labels.roll(1))
        (grad,) = torch.autograd.grad(loss, q)
        results.append((loss.detach(), grad))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=0, atol=1e-12)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=0, atol=1e-12)


def test_batch_as_its_own_reference_set_under_other_labels():
    queries, _, labels, _ = embedding_problem(12, 1, 5, seed=8)
    ref_labels = labels.roll(3)
    scores = F.normalize(queries, dim=1) @ F.normalize(queries, dim=1).T
    expected = fastap.reference.ap_loss(scores, labels=labels, ref_labels=ref_labels)
    for limit in (2**30, 0):
        got = fastap.APLoss(score_matrix_limit=limit)(
            queries, labels, ref_emb=queries, ref_labels=ref_labels
        )
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
    got = fastap.ap_loss_from_embeddings(queries, queries, labels=labels, ref_labels=ref_labels)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("in_batch", [True, False])
def test_empty_batch_gives_zero_loss(device, in_batch):
    """No queries: a loss of 0 with empty gradients, on the blockwise path as on the others."""
    queries = torch.zeros(0, 4, device=device, requires_grad=True)
    labels = torch.zeros(0, dtype=torch.long, device=device)
    database = None if in_batch else torch.randn(5, 4, device=device, requires_grad=True)
    ref_labels = None if in_batch else torch.arange(5, device=device)
    reference_set = dict(ref_emb=database, ref_labels=ref_labels)
    losses = [
        fastap.ap_loss_from_embeddings(
            queries, database, labels=labels, ref_labels=ref_labels, backend="blockwise"
        ),
        fastap.APLoss(score_matrix_limit=0)(queries, labels, **reference_set),
        fastap.APLoss()(queries, labels, **reference_set),
    ]
    inputs = [queries] + ([] if in_batch else [database])
    for loss in losses:
        assert loss.item() == 0.0
        grads = torch.autograd.grad(loss, inputs, allow_unused=True)
        for grad, tensor in zip(grads, inputs):
            assert grad is None or (grad.shape == tensor.shape and not grad.any())


def test_backend_argument(device):
    queries, database, labels, ref_labels = (t.to(device) for t in embedding_problem(9, 11, 4))
    common = dict(labels=labels, ref_labels=ref_labels, num_bins=7)
    auto = fastap.ap_loss_from_embeddings(queries, database, **common)
    blockwise = fastap.ap_loss_from_embeddings(queries, database, backend="blockwise", **common)
    assert torch.equal(auto, blockwise)  # fp64 never takes the fused kernel
    with pytest.raises(ValueError, match="backend must be one of"):
        fastap.ap_loss_from_embeddings(queries, database, backend="tensor-core", **common)
    reason = "float64" if device.type == "cuda" else "not on a CUDA device"
    with pytest.raises(ValueError, match=f"backend='fused' is not available: .*{reason}"):
        fastap.ap_loss_from_embeddings(queries, database, backend="fused", **common)


def test_max_shared_memory_per_block_from_each_torch_version():
    """The fused kernels' fit check reads what the installed torch reports about the GPU: the
    opt-in field (newer torch), the per-SM figure, or neither (torch 2.5)."""
    from types import SimpleNamespace

    from fastap.embeddings import max_shared_memory_per_block

    def gpu(**fields):
        return max_shared_memory_per_block(SimpleNamespace(major=9, minor=0, **fields))

    # the opt-in field wins over the per-SM figure (values made different to tell them apart)
    assert gpu(shared_memory_per_block_optin=200000, shared_memory_per_multiprocessor=233472) == (
        200000
    )
    assert gpu(shared_memory_per_multiprocessor=233472) == 232448
    assert gpu() == 232448
    assert max_shared_memory_per_block(SimpleNamespace(major=8, minor=0)) == 166912
    assert max_shared_memory_per_block(SimpleNamespace(major=8, minor=9)) == 101376
    assert max_shared_memory_per_block(SimpleNamespace(major=11, minor=5)) == 49152
    # The figure decides the backend: at D = 256 and 20 bins bf16 needs ~113 KB (2 blocks on an
    # H100's 227 KB, none on an RTX 4090's 99 KB).
    needed = max(fastap.embeddings.fused_embedding_shared_bytes(20, torch.bfloat16, 256))
    assert 101376 < needed <= 232448


def test_fused_function_in_batch_and_two_sets_on_stand_in_ops(monkeypatch):
    """fastap.ops.EmbeddingHistogram (the fused kernels' autograd Function, CUDA only) driven on
    the CPU by stand-ins of its two ops built from the score-matrix op: in-batch it takes the
    database as None and gives the queries both gradients. Equal to the reference on the score
    matrix, as the blockwise path is."""
    ops = torch.ops.fastap
    calls = []

    def histogram(queries, database, labels, ref_labels, exclude_self, offset, bins, lo, hi):
        calls.append(queries.shape[0])
        scores = queries @ database.T
        return ops.soft_histogram(scores, None, labels, ref_labels, None, exclude_self, bins, lo,
                                  hi, offset)  # fmt: skip

    def backward(grad_n, grad_p, queries, database, labels, ref_labels, *options):
        exclude_self, offset, bins, lo, hi = options
        grad_scores = ops.soft_histogram_backward(
            grad_n, grad_p, queries @ database.T, None, labels, ref_labels, None, exclude_self,
            bins, lo, hi, offset,
        )  # fmt: skip
        return grad_scores @ database, grad_scores.T @ queries

    g = torch.Generator().manual_seed(4)
    queries = torch.randn(13, 6, generator=g, dtype=torch.float64)
    database = torch.randn(20, 6, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 3, (13,), generator=g)
    ref_labels = torch.randint(0, 3, (20,), generator=g)
    for in_batch in (True, False):
        tensors = (queries,) if in_batch else (queries, database)
        inputs = [t.clone().requires_grad_() for t in tensors]
        unit = [F.normalize(t, dim=1) for t in inputs]
        scores = unit[0] @ unit[-1].T
        expected = fastap.reference.ap_loss(
            scores,
            labels=labels,
            ref_labels=None if in_batch else ref_labels,
            exclude_self=in_batch,
        )
        expected = (expected, *torch.autograd.grad(expected, inputs))
        for backend in ("blockwise", "fused"):
            with monkeypatch.context() as patch:
                if backend == "fused":
                    patch.setattr(ops, "embedding_histogram", histogram)
                    patch.setattr(ops, "embedding_histogram_backward", backward)
                    patch.setattr(fastap.embeddings, "_use_fused", lambda *a: True)
                loss = fastap.ap_loss_from_embeddings(
                    inputs[0], None if in_batch else inputs[1], labels=labels,
                    ref_labels=None if in_batch else ref_labels, backend="blockwise",
                )  # fmt: skip
                got = (loss, *torch.autograd.grad(loss, inputs))
            for a, b in zip(got, expected):
                torch.testing.assert_close(a, b, rtol=0, atol=1e-12, msg=f"{backend} {in_batch}")
    assert calls == [13, 13]  # the stand-in forward ran, once per case


def test_auto_backend_reads_tf32_from_every_torch_api(monkeypatch):
    # On a GPU the auto backend takes the fused kernel for float32 only where torch allows TF32.
    # torch 2.9 added fp32_precision, after whose "tf32" the old getter raises (mixing the APIs);
    # the fused kernel's availability is patched in, so this runs on the CPU.
    from fastap import embeddings

    monkeypatch.setattr(embeddings, "_fused_unavailable_reason", lambda *args: None)
    x = torch.randn(4, 3)
    matmul = torch.backends.cuda.matmul
    legacy, precision = matmul.allow_tf32, torch.get_float32_matmul_precision()
    try:
        matmul.allow_tf32 = False
        assert not embeddings._use_fused("auto", x, x, 20)
        assert embeddings._use_fused("auto", x.half(), x.half(), 20)
        matmul.allow_tf32 = True
        assert embeddings._use_fused("auto", x, x, 20)
        torch.set_float32_matmul_precision("highest")
        assert not embeddings._use_fused("auto", x, x, 20)
        torch.set_float32_matmul_precision("high")
        assert embeddings._use_fused("auto", x, x, 20)
        if hasattr(matmul, "fp32_precision"):  # torch 2.9 on
            matmul.allow_tf32 = False
            matmul.fp32_precision = "tf32"
            with pytest.raises(RuntimeError, match="mix of the legacy and new APIs"):
                torch._C._get_cublas_allow_tf32()  # (what the fallback is for)
            assert embeddings._use_fused("auto", x, x, 20)
            compiled = torch.compile(  # (aot_eager: as in test_errors.py's uint64 test)
                lambda x: x * embeddings._use_fused("auto", x, x, 20),
                fullgraph=True,
                backend="aot_eager",
            )
            assert torch.equal(compiled(x), x)
            matmul.fp32_precision = "ieee"
            assert not embeddings._use_fused("auto", x, x, 20)
            torch._dynamo.reset()
            assert torch.equal(compiled(x), 0 * x)
            matmul.fp32_precision = "none"
    finally:
        matmul.allow_tf32 = legacy
        torch.set_float32_matmul_precision(precision)


def _alive(shapes):
    """The tensors of one of these shapes alive now (gc; fake tensors of other tests, whose shapes
    hold symbolic sizes, are left out)."""
    import gc

    tensors = (t for t in gc.get_objects() if issubclass(type(t), torch.Tensor))
    return [t for t in tensors if all(type(s) is int for s in t.shape) and tuple(t.shape) in shapes]


def _others_alive(shapes, tile, earlier):
    """How many tensors of one of these shapes, other than tile and the earlier ones (alive
    before the test's call, held by the caller so that their ids stay theirs), are alive."""
    ids = {id(t) for t in earlier}
    return sum(t is not tile and id(t) not in ids for t in _alive(shapes))


def test_blocks_hold_one_score_tile_forward_and_a_tile_and_its_gradient_backward(monkeypatch):
    """docs/api.md's peak of the blockwise path against a database, two block x M tiles: when a
    block's tile is computed, no other block's tile (or its gradient) is alive, so the forward
    holds one tile and the backward a tile and its gradient. (The loops kept the last block's, 3
    tiles backward.) Counted as the block x M tensors alive (gc) when each new tile exists."""
    import fastap.embeddings as embeddings_module

    n, m, block = 301, 157, 64
    others_alive = []
    score_tiles = embeddings_module._score_tiles

    def counting_tiles(*args):
        for rows, scores, op_args in score_tiles(*args):
            others_alive.append(_others_alive({(block, m)}, scores, earlier))
            yield rows, scores, op_args

    monkeypatch.setattr(embeddings_module, "_score_tiles", counting_tiles)
    earlier = _alive({(block, m)})
    g = torch.Generator().manual_seed(7)
    queries = torch.randn(n, 3, generator=g, dtype=torch.float64, requires_grad=True)
    database = torch.randn(m, 3, generator=g, dtype=torch.float64, requires_grad=True)
    labels, ref_labels = torch.randint(0, 4, (n,), generator=g), torch.randint(0, 4, (m,))
    loss = fastap.ap_loss_from_embeddings(
        queries,
        database,
        labels=labels,
        ref_labels=ref_labels,
        backend="blockwise",
        block_size=block,
    )
    loss.backward()
    assert len(others_alive) == 2 * 5  # 5 blocks (the last of 45 rows), forward and backward
    assert others_alive == [0] * 10, others_alive


def test_in_batch_square_tiles_hold_one_tile_at_a_time(monkeypatch):
    """In-batch, the blockwise path computes square tiles of side square_tile_side(block_size, N),
    each serving two blocks of rows: when a tile is computed no other tile (nor its transpose or
    gradients) is alive. With two tiles of that side no larger than one block x N tile, the peaks
    of docs/api.md hold: forward a tile and its transpose, backward those and two gradients."""
    import fastap.embeddings as embeddings_module

    n, block = 301, 64
    side = embeddings_module.square_tile_side(block, n)
    assert side == 98 and 2 * side**2 <= block * n
    shapes = {(a, b) for a in (side, n % side) for b in (side, n % side)}
    others_alive, tiles_seen, before_next = [], [], []
    square_tiles = embeddings_module._square_tiles

    def counting_tiles(*args):
        tiles = square_tiles(*args)
        while True:
            # Before the next tile is computed (the loop has dropped the last one): none alive.
            before_next.append(_others_alive(shapes, None, earlier))
            tile = next(tiles, None)
            if tile is None:
                return
            rows, cols, scores = tile[:3]
            tiles_seen.append((rows.start, cols.start, tuple(scores.shape)))
            others_alive.append(_others_alive(shapes, scores, earlier))
            del scores
            yield tile
            del tile

    monkeypatch.setattr(embeddings_module, "_square_tiles", counting_tiles)
    earlier = _alive(shapes)
    g = torch.Generator().manual_seed(7)
    e = torch.randn(n, 3, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 4, (n,), generator=g)
    loss = fastap.ap_loss_from_embeddings(e, labels=labels, backend="blockwise", block_size=block)
    loss.backward()
    starts = range(0, n, side)  # 0, 98, 196, 294: the pairs I <= J, forward and backward
    pairs = [(i, j, (min(side, n - i), min(side, n - j))) for i in starts for j in starts if i <= j]
    assert tiles_seen == pairs * 2
    assert others_alive == [0] * len(tiles_seen), others_alive
    assert before_next == [0] * (len(tiles_seen) + 2), before_next


@pytest.mark.parametrize("n, block", [(301, 64), (40, 1000), (1, 1)])
def test_in_batch_takes_half_the_matrix_products(n, block):
    """In-batch the scores are symmetric: each square tile serves two blocks of rows forward,
    and backward its gradient H = dS_IJ + dS_JI^T gives both blocks' gradients (H @ E_J and
    H^T @ E_I; a diagonal tile's gradient takes two products, dS @ E_I and dS^T @ E_I). The
    products then come to 4 N^2 D + 4 D (the sum of the squared block sizes) flops, against
    8 N^2 D for the rows against all rows (scores forward and backward, dQ, dDB)."""
    from torch.utils.flop_counter import FlopCounterMode

    from fastap.embeddings import square_tile_side

    d = 5
    g = torch.Generator().manual_seed(3)
    e = torch.randn(n, d, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 3, (n,), generator=g)
    with FlopCounterMode(display=False) as counter:
        loss = fastap.ap_loss_from_embeddings(
            e, labels=labels, backend="blockwise", block_size=block
        )
        loss.backward()
    side = square_tile_side(block, n)
    blocks = [min(side, n - start) for start in range(0, n, side)]
    assert counter.get_total_flops() == 4 * n * n * d + 4 * d * sum(b * b for b in blocks)


def test_bad_query_weights_are_refused_before_the_histograms(monkeypatch):
    """query_weights are checked before the O(N M D) pass over the blocks, not after it."""
    import fastap.embeddings as embeddings_module

    def no_histograms(*args, **kwargs):
        raise AssertionError("the histograms were computed before query_weights was checked")

    monkeypatch.setattr(embeddings_module, "histograms_from_embeddings", no_histograms)
    queries, labels = torch.randn(6, 3), torch.arange(6) % 2
    for weights, error in (
        (torch.ones(4), ValueError),
        (torch.ones(6, dtype=torch.long), TypeError),
        (-torch.ones(6), ValueError),
    ):
        with pytest.raises(error, match="query_weights"):
            fastap.ap_loss_from_embeddings(queries, labels=labels, query_weights=weights)
