"""The AP loss straight from embeddings, without the N x M score matrix in memory.

The histograms of each query only need that query's scores, and the backward only needs two
small tables per query, so the scores can be computed block of queries by block, binned, and
thrown away; the backward recomputes each block's scores, turns them into the block's dS with the
fused backward op, and folds it into dQ = dS @ DB and dDB += dS^T @ Q. Peak extra memory: one
block x M score tile forward, a tile and its dS backward, plus O((N + M) D + N Q), whatever N
and M are.

In-batch (the database is the queries) the scores are symmetric, and the loop takes square tiles
instead: the tile S = E_I @ E_J^T of blocks I <= J gives the rows of I their scores against J
and, transposed, the rows of J theirs against I; backward, H = dS_IJ + dS_JI^T gives E_I's
gradient H @ E_J and E_J's H^T @ E_I. About half the matrix products (4 N^2 D flops and the
diagonal tiles' 4 D |I|^2, against 8 N^2 D), and no more memory: two tiles of the square side
hold no more than one block x M tile.

Two backends compute this:

- ``"blockwise"`` (any device): the loop above, with torch's matrix products and the score-matrix
  histogram ops; exact in the dtype of the embeddings.
- ``"fused"`` (CUDA, compute capability 8.0+, float32/bfloat16/float16): one kernel per pass
  (fastap::embedding_histogram and its backward) computes the score tiles on the tensor cores and
  bins them in shared memory, so no score ever reaches memory. float32 embeddings go through the
  tensor cores as TF32, and the backward feeds each score's gradient to the tensor cores in the
  embeddings' precision (TF32 / bf16 / fp16).

``backend="auto"`` (the default) takes the fused kernel where it applies, and for float32
embeddings only when torch's settings allow TF32 in float32 matrix products
(``torch.backends.cuda.matmul.allow_tf32``, ``torch.set_float32_matmul_precision("high")`` or
``torch.backends.cuda.matmul.fp32_precision = "tf32"``), as torch's own products do; otherwise
the blockwise path.
"""

from __future__ import annotations

import math

import torch

from fastap._validation import (
    check_bins,
    check_bool,
    check_embedding_matrix,
    check_finite_rows,
    check_int,
    check_labels,
    check_query_weights,
    check_variant,
    dense_tensor,
    in_common_dtype,
)
from fastap.cosine import autocast_off, autocast_product_dtype, unit_rows
from fastap.functional import (
    DEFAULT_NUM_BINS,
    DEFAULT_SCORE_RANGE,
    ap_from_histograms,
    weighted_loss,
)
from fastap.ops import (
    HAS_FUSED_EMBEDDING_KERNELS,
    EmbeddingHistogram,
    apply_function,
    dense_histogram_grads,
    differentiable_once,
    embedding_grads,
    embedding_sets,
    from_compute,
    require_device_kernels,
    require_extension,
)

BACKENDS = ("auto", "fused", "blockwise")
FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
#: The widest embeddings the fused kernels take (their backward's grid.z, one block per 256
#: columns, is at most 65535; csrc/cuda/launch_plan.h, kMaxEmbeddingDepth). Wider ones take the
#: blockwise path.
FUSED_MAX_DIM = 65535 * 256

DEFAULT_BLOCK_BYTES = 32 * 2**20  # one score tile of a block of queries


def default_block_size(num_candidates: int, element_size: int = 4) -> int:
    """Queries per block so that one block x M score tile takes about 32 MB."""
    return max(1, DEFAULT_BLOCK_BYTES // max(1, num_candidates * element_size))


def _score_tiles(queries, database, labels, ref_labels, options):
    """For each block of queries: (rows, its score tile, the ops' arguments after the scores).
    Each tile is computed when asked for, so only one lives at a time."""
    exclude_self, self_offset, num_bins, lo, hi, block_size = options
    # (No queries: one empty block, so that the histograms are [0, Q] like the op's.)
    for start in range(0, max(queries.shape[0], 1), block_size):
        rows = slice(start, start + block_size)
        op_args = (None, labels[rows], ref_labels, None, exclude_self, num_bins, lo, hi)
        yield rows, queries[rows] @ database.T, (*op_args, start + self_offset)


def square_tile_side(block_size: int, num_rows: int) -> int:
    """Side of the square score tiles of the in-batch blockwise path: two of them hold no more
    scores than one block_size x num_rows tile of the path against a database."""
    block_size = check_int(block_size, "block_size", 1, "fastap.embeddings.square_tile_side")
    num_rows = check_int(num_rows, "num_rows", 0, "fastap.embeddings.square_tile_side")
    return max(1, min(num_rows, math.isqrt(block_size * num_rows // 2)))


def _square_tiles(embeddings, labels, options):
    """In-batch (the database is the embeddings themselves) the scores are symmetric: for each
    pair of blocks of rows I <= J, one tile S = E_I @ E_J^T gives the scores of the rows of I
    against J and, transposed, those of the rows of J against I. Yields (rows I, rows J, S, the
    ops' arguments after the scores for I against J, and for J against I, None where I = J).
    Each tile is computed when asked for, so only one lives at a time."""
    exclude_self, _, num_bins, lo, hi, block_size = options
    num_rows = embeddings.shape[0]
    side = square_tile_side(block_size, num_rows)
    bins = (num_bins, lo, hi, 0)  # (self-pairs only lie along the diagonal tiles' diagonal)
    for first in range(0, num_rows, side):
        rows = slice(first, first + side)
        for other in range(first, num_rows, side):
            cols = slice(other, other + side)
            diagonal = other == first
            forward_args = (
                None,
                labels[rows],
                labels[cols],
                None,
                exclude_self and diagonal,
                *bins,
            )
            mirror_args = (
                None if diagonal else (None, labels[cols], labels[rows], None, False, *bins)
            )
            # (The tile is not bound to a name here, which would keep it alive while the next
            # one is computed.)
            yield rows, cols, embeddings[rows] @ embeddings[cols].T, forward_args, mirror_args


class _BlockSums:
    """Sums of the pieces of each block of rows, in the order they come (a fixed order:
    deterministic), and then the blocks in order. Out of place: under torch.func.jacrev a piece
    can be batched by vmap where an accumulator made from the inputs is not."""

    def __init__(self) -> None:
        self.sums: dict[int, torch.Tensor] = {}

    def add(self, rows: slice, piece: torch.Tensor) -> None:
        total = self.sums.get(rows.start)
        self.sums[rows.start] = piece if total is None else total + piece

    def rows(self) -> torch.Tensor:
        return torch.cat([self.sums[start] for start in sorted(self.sums)])


def _in_batch_histograms(embeddings, labels, options):
    """(n, p, positives) of the in-batch scores from the square tiles: each row's histograms are
    the sums of those of its pieces, taken in a fixed order (deterministic)."""
    totals = (_BlockSums(), _BlockSums(), _BlockSums())
    for rows, cols, scores, forward_args, mirror_args in _square_tiles(embeddings, labels, options):
        pieces = [(rows, torch.ops.fastap.soft_histogram(scores, *forward_args))]
        if mirror_args is not None:
            transposed = scores.T.contiguous()  # (one tile and its transpose at a time)
            pieces.append((cols, torch.ops.fastap.soft_histogram(transposed, *mirror_args)))
            del transposed
        del scores
        for piece_rows, piece in pieces:
            for total, part in zip(totals, piece):
                total.add(piece_rows, part)
    n, p, positives = (total.rows() for total in totals)
    return n, p, positives


def _takes_square_tiles(queries, database) -> bool:
    """In-batch (no database) with rows: the square tiles (no rows: one empty block of rows)."""
    return database is None and queries.shape[0] > 0


def _in_batch_gradient(embeddings, labels, grad_n, grad_p, options):
    """The gradient of the embeddings from the square tiles. For the pair of blocks I < J with
    the tile S = E_I @ E_J^T: the scores' gradient H = dS_IJ + dS_JI^T gives E_I's H @ E_J and
    E_J's H^T @ E_I: three matrix products a pair of blocks with the tile's, where the rows
    against all rows take six. Accumulated in fp32 at least, in a fixed order (deterministic)."""
    accumulate = torch.promote_types(embeddings.dtype, torch.float32)
    wide = embeddings.to(accumulate)
    grad = _BlockSums()
    backward = torch.ops.fastap.soft_histogram_backward
    for rows, cols, scores, forward_args, mirror_args in _square_tiles(embeddings, labels, options):
        grad_tile = backward(grad_n[rows], grad_p[rows], scores, *forward_args).to(accumulate)
        if mirror_args is None:  # a diagonal tile: (dS + dS^T) @ E_I as two products
            del scores  # (measured: dS + dS^T, a fresh transposed sum, took longer than the
            # product it saves at N = 2048, one tile, D = 64 and 128, and held one more tile)
            grad.add(rows, grad_tile @ wide[rows])
            grad.add(rows, grad_tile.T @ wide[rows])
        else:
            transposed = scores.T.contiguous()
            del scores  # (a tile, its transpose and two gradients at most)
            grad_tile += backward(grad_n[cols], grad_p[cols], transposed, *mirror_args).T
            del transposed
            grad.add(rows, grad_tile @ wide[cols])
            grad.add(cols, grad_tile.T @ wide[rows])
        del grad_tile
    return grad.rows().to(embeddings.dtype)


@from_compute
class _BlockedSoftHistogram(torch.autograd.Function):
    """(n, p, positives) of cosine scores queries @ database.T, block of queries by block (in-batch:
    square tiles, each serving two blocks of rows).

    forward(queries [N, D], database [M, D] or None (the queries: in-batch), both already
    normalised, labels [N] int64, ref_labels [M] int64 or None (in-batch), exclude_self,
    self_offset, num_bins, lo, hi, block_size).
    """

    @staticmethod
    def compute(queries, database, labels, ref_labels, *options):
        with autocast_off(queries.device):  # (the scores in the embeddings' dtype, as backward's)
            if _takes_square_tiles(queries, database):
                n, p, positives = _in_batch_histograms(queries, labels, options)
            else:
                n, p, positives = _row_block_histograms(
                    queries, database, labels, ref_labels, options
                )
        return n, p, positives

    @staticmethod
    def save_context(ctx, inputs, output):
        queries, database, labels, ref_labels, *options = inputs
        ctx.save_for_backward(queries, database, labels, ref_labels)
        ctx.options = tuple(options)
        ctx.mark_non_differentiable(output[2])

    @staticmethod
    @differentiable_once
    def backward(ctx, grad_n, grad_p, _grad_positives):
        saved = ctx.saved_tensors
        grad_n, grad_p = dense_histogram_grads(grad_n, grad_p)
        queries, database, labels = saved[0], saved[1], saved[2]
        with autocast_off(queries.device):  # (a backward called inside an autocast block)
            if _takes_square_tiles(queries, database):
                grads = (_in_batch_gradient(queries, labels, grad_n, grad_p, ctx.options), None)
            else:
                grads = _row_block_gradients(saved, grad_n, grad_p, ctx.options)
        return (*grads, None, None) + (None,) * 6


def _row_block_histograms(queries, database, labels, ref_labels, options):
    """(n, p, positives) from the blocks of queries against the whole database."""
    all_queries, all_database, all_labels, all_ref_labels = embedding_sets(
        queries, database, labels, ref_labels
    )
    tiles = _score_tiles(all_queries, all_database, all_labels, all_ref_labels, options)
    histograms = []
    for _, scores, op_args in tiles:
        histograms.append(torch.ops.fastap.soft_histogram(scores, *op_args))
        del scores  # (before the next tile is computed: one tile at a time)
    return tuple(torch.cat(parts) for parts in zip(*histograms))


def _row_block_gradients(saved, grad_n, grad_p, options):
    """The gradients of (queries, database) from the blocks of queries against the database."""
    queries, database, labels, ref_labels = embedding_sets(*saved)
    grad_queries = []
    # Accumulated over blocks: in fp32 at least, in a fixed order (deterministic). (Out of place:
    # under torch.func.jacrev the gradients are batched by vmap where the embeddings are not.)
    grad_database = torch.zeros_like(
        database, dtype=torch.promote_types(database.dtype, torch.float32)
    )
    for rows, scores, op_args in _score_tiles(queries, database, labels, ref_labels, options):
        grad_scores = torch.ops.fastap.soft_histogram_backward(
            grad_n[rows], grad_p[rows], scores, *op_args
        )
        grad_queries.append(grad_scores @ database)
        grad_database = grad_database + (grad_scores.T @ queries[rows]).to(grad_database.dtype)
        # (before the next tile is computed: a tile and its gradient at a time)
        del scores, grad_scores
    grad_database = grad_database.to(database.dtype)
    return embedding_grads(saved[1], torch.cat(grad_queries), grad_database)


def fused_embedding_shared_bytes(num_bins: int, dtype: torch.dtype, depth: int) -> tuple[int, int]:
    """Shared memory per block (forward, backward) of the fused embedding kernels for embeddings
    of dimension `depth`: the formula of SharedLayout in csrc/cuda/embedding_tiles.cuh
    (tests/test_cuda_emulation.py checks that the two agree)."""
    element, pad = (4, 4) if dtype == torch.float32 else (2, 8)
    tile_rows = tile_cols = 64
    threads, width, chunk = 256, 256, 64

    def align(b):
        return (b + 127) // 128 * 128

    resident = depth <= width
    padded = max(chunk, -(-depth // chunk) * chunk)
    own_ld = (padded if resident else chunk) + pad
    stream_ld = (padded if resident else width) + pad
    stages = 2  # chunk slots of the load pipeline
    sizes = []
    for backward in (False, True):
        own_bytes = tile_rows * own_ld * element * (1 if resident else stages)
        stream_chunk = align(own_bytes)
        chunk_bytes = 0 if backward and resident else stages * tile_cols * (chunk + pad) * element
        scores = align(stream_chunk + chunk_bytes)
        labels = align(scores + tile_cols * (tile_rows + 4) * 4)
        step_end = align(labels + tile_cols * 8)
        if not backward:
            # the lane histograms: 2 classes x (num_bins + 1) slots (a spare bin per class)
            sizes.append(step_end + 2 * (num_bins + 1) * threads * 4 + threads * 2 * 4)
            continue
        stream_rows = align(step_end + tile_rows * (tile_cols + pad) * element)
        staging = align(stream_rows + tile_cols * stream_ld * element)
        own_labels = align(staging + (threads // 32) * 16 * 16 * 4)
        sizes.append(own_labels + tile_rows * 8)
    return sizes[0], sizes[1]


# The opt-in shared memory per block in bytes, by compute capability (the CUDA C++ Programming
# Guide's table of technical specifications), for torch versions whose device properties report
# neither shared_memory_per_block_optin nor shared_memory_per_multiprocessor (torch 2.5).
_OPTIN_SHARED_MEMORY = {
    (8, 0): 163 * 1024,
    (8, 6): 99 * 1024,
    (8, 7): 163 * 1024,
    (8, 9): 99 * 1024,
    (9, 0): 227 * 1024,
    (10, 0): 227 * 1024,
    (12, 0): 99 * 1024,
}


def max_shared_memory_per_block(properties) -> int:
    """The most shared memory one block of a kernel may opt in to on the GPU whose
    torch.cuda.get_device_properties() these are (the limit the fused kernels' launcher checks).

    The field torch reports where it has it; else the shared memory per SM less the 1 KB the GPU
    keeps per block (equal to it on every NVIDIA GPU since sm_80); else a table by compute
    capability; else 48 KB, the amount every block may use without opting in."""
    optin = getattr(properties, "shared_memory_per_block_optin", 0)
    if optin > 0:
        return optin
    per_sm = getattr(properties, "shared_memory_per_multiprocessor", 0)
    if per_sm > 0:
        return per_sm - 1024
    return _OPTIN_SHARED_MEMORY.get((properties.major, properties.minor), 48 * 1024)


def fused_unavailable_reason(
    queries: torch.Tensor, database: torch.Tensor | None, num_bins: int
) -> str | None:
    """Why the fused CUDA kernel cannot take these embeddings (None: it can); database None: the
    queries are their own database (in batch)."""
    owner = "fastap.embeddings.fused_unavailable_reason"
    check_embedding_matrix(queries, "queries", owner)
    if database is None:
        database = queries
    else:
        check_embedding_matrix(database, "database", owner)
    num_bins = check_int(num_bins, "num_bins", 2, owner)
    return _fused_unavailable_reason(queries, database, num_bins)


def _fused_unavailable_reason(queries, database, num_bins: int) -> str | None:
    """fused_unavailable_reason on arguments the entry points have checked (the losses' path)."""
    if queries.device.type != "cuda":
        return f"the embeddings are on {queries.device}, not on a CUDA device"
    if not HAS_FUSED_EMBEDDING_KERNELS:
        return "this build of fastap has no CUDA kernels"
    if queries.dtype not in FUSED_DTYPES or database.dtype != queries.dtype:
        return (
            "it takes float32, bfloat16 or float16 embeddings of one dtype, got "
            f"{queries.dtype} and {database.dtype}"
        )
    if queries.shape[1] > FUSED_MAX_DIM:
        return f"it takes embeddings of dimension up to {FUSED_MAX_DIM}, got {queries.shape[1]}"
    properties = torch.cuda.get_device_properties(queries.device)
    if properties.major < 8:
        capability = f"{properties.major}.{properties.minor}"
        return f"it needs compute capability 8.0 or newer, got {capability}"
    available = max_shared_memory_per_block(properties)
    needed = max(fused_embedding_shared_bytes(num_bins, queries.dtype, queries.shape[1]))
    if needed > available:
        return (
            f"num_bins={num_bins} needs {needed} bytes of shared memory per block, the GPU "
            f"has {available}"
        )
    return None


def fused_uses_wgmma(queries: torch.Tensor) -> bool:
    """Whether the fused kernels compute their matrix products for these embeddings with
    Hopper's wgmma instead of WMMA (docs/design.md, section 3b): only with FASTAP_WGMMA=1 in the
    environment, for bfloat16 or float16 embeddings of dimension <= 256, in a build for compute
    capability 9.0a (FASTAP_CUDA_ARCH=9.0a) on such a GPU. A diagnostic: the histograms are the
    same either way, the gradients within the rounding of fp32 sums taken in another order."""
    dense_tensor(queries, "queries", "fastap.embeddings.fused_uses_wgmma")
    if queries.device.type != "cuda" or not HAS_FUSED_EMBEDDING_KERNELS or queries.dim() != 2:
        return False
    return bool(torch.ops.fastap.embedding_histogram_uses_wgmma(queries))


def _use_fused(backend: str, queries, database, num_bins: int) -> bool:
    if backend not in BACKENDS:
        raise ValueError(f"fastap: backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "blockwise":
        return False
    reason = _fused_unavailable_reason(queries, database, num_bins)
    if backend == "fused":
        if reason is not None:
            raise ValueError(f"fastap: backend='fused' is not available: {reason}")
        return True
    if reason is not None:
        return False
    return queries.dtype != torch.float32 or fp32_matmul_allows_tf32()


def constant_to_compile(fn):
    """``torch.compiler.assume_constant_result(fn)`` without its import of torch._dynamo (over a
    second, half of ``import fastap``): the mark that it sets, which torch.compile reads when it
    traces a call of ``fn``. (tests/test_compile.py checks that the public decorator sets this mark
    and no other, in each torch the suite runs with.)"""
    fn._dynamo_marked_constant = True
    return fn


# (A constant to torch.compile, which reads it while tracing: its own folding of the getter below
# would raise past the except when the getter raises.)
@constant_to_compile
def fp32_matmul_allows_tf32() -> bool:
    """Whether torch's float32 matrix products may use TF32, set by any of its APIs:
    ``torch.backends.cuda.matmul.allow_tf32``, ``torch.set_float32_matmul_precision`` or (torch
    2.9 on) ``torch.backends.cuda.matmul.fp32_precision``."""
    try:
        return torch._C._get_cublas_allow_tf32()  # (what allow_tf32 reads)
    except RuntimeError:
        # torch 2.9 on, after fp32_precision = "tf32": the old getter refuses to read a setting
        # of the new API ("mix of the legacy and new APIs").
        return torch.backends.cuda.matmul.fp32_precision == "tf32"


def histograms_from_embeddings(
    queries: torch.Tensor,
    database: torch.Tensor | None = None,
    *,
    labels: torch.Tensor,
    ref_labels: torch.Tensor | None = None,
    num_bins: int = DEFAULT_NUM_BINS,
    score_range: tuple[float, float] = DEFAULT_SCORE_RANGE,
    exclude_self: bool | None = None,
    self_offset: int | None = None,
    block_size: int | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(n, p, positives) of the cosine scores of the L2-normalised embeddings, without the score
    matrix.

    queries [N, D] and database [M, D] (default: the queries; then exclude_self defaults to
    True); labels [N] integer, and with a database its ref_labels [M] (without one the queries'
    labels serve). With exclude_self, query i's own entry is database row i + self_offset
    (default None: 0; as in fastap.ap_loss, self_offset without exclude_self is an error).
    Differentiable with respect to both embedding sets. Embedding sets of two float dtypes are
    both taken in the wider one; under torch.autocast, in autocast's dtype (fastap.cosine).
    backend: "auto", "fused" (the tensor-core CUDA kernel) or "blockwise" (block_size queries at
    a time); see the module docstring.
    """
    check_embedding_matrix(queries, "queries")
    check_bool(exclude_self, "exclude_self", allow_none=True)
    same_set = database is None
    if database is None:
        if ref_labels is not None:
            raise ValueError(
                "fastap: ref_labels was given without a database (without one the queries are "
                "their own database, with their labels)"
            )
        database = queries
        exclude_self = True if exclude_self is None else exclude_self
    else:
        check_embedding_matrix(database, "database")
        exclude_self = bool(exclude_self)
        if (database.shape[1], database.device) != (queries.shape[1], queries.device):
            raise ValueError(
                "fastap: queries and database must have the same dimension and device, got "
                f"{list(queries.shape)} on {queries.device} and {list(database.shape)} on "
                f"{database.device}"
            )
        queries, database = in_common_dtype(queries, database)
    num_bins, lo, hi = check_bins(num_bins, score_range, queries.dtype)
    labels = check_labels(labels, "labels", queries.shape[0], "query", queries, "queries")
    if ref_labels is None:
        if not same_set:
            raise ValueError("fastap: a database needs ref_labels (one label per row)")
        ref_labels = labels
    else:
        ref_labels = check_labels(
            ref_labels, "ref_labels", database.shape[0], "database row", queries, "queries"
        )
    if self_offset is None:
        self_offset = 0
    else:
        self_offset = check_int(self_offset, "self_offset", 0)
        if not exclude_self:
            raise ValueError("fastap: self_offset only applies with exclude_self=True")
    if exclude_self and queries.shape[0] + self_offset > database.shape[0]:
        raise ValueError(
            "fastap: exclude_self needs database row i + self_offset for every query i, got "
            f"{queries.shape[0]} queries, {database.shape[0]} database rows, offset {self_offset}"
        )
    if block_size is None:
        block_size = default_block_size(int(database.shape[0]), queries.element_size())
    block_size = check_int(block_size, "block_size", 1)
    check_finite_rows(queries, "queries")
    if not same_set:
        check_finite_rows(database, "database")
    # (Every backend runs fastap's operators: the blockwise one those of the score-matrix path.)
    require_extension()
    require_device_kernels(queries, "queries")
    unit_queries = unit_rows(queries)
    unit_database = unit_queries if same_set else unit_rows(database)
    # Under torch.autocast, the unit rows in the dtype autocast takes their product in (the
    # score-matrix path's scores; fastap.cosine): every backend then bins, and differentiates,
    # those scores, and the fused kernel runs on bf16/fp16 tensor cores.
    product_dtype = autocast_product_dtype(unit_queries)
    if product_dtype is not None:
        unit_queries = unit_queries.to(product_dtype)
        unit_database = unit_queries if same_set else unit_database.to(product_dtype)
    function: type[torch.autograd.Function]
    extra: tuple[int, ...]
    if _use_fused(backend, unit_queries, unit_database, num_bins):
        function, extra = EmbeddingHistogram, ()
    else:
        function, extra = _BlockedSoftHistogram, (block_size,)
    n, p, positives = apply_function(
        function,
        unit_queries,
        None if same_set else unit_database,
        labels,
        None if same_set else ref_labels,
        exclude_self,
        self_offset,
        num_bins,
        lo,
        hi,
        *extra,
    )
    # (No poisoned rows to look for: the embeddings were checked finite above, so every score is.)
    return n, p, positives


def ap_loss_from_embeddings(
    queries: torch.Tensor,
    database: torch.Tensor | None = None,
    *,
    labels: torch.Tensor,
    ref_labels: torch.Tensor | None = None,
    num_bins: int = DEFAULT_NUM_BINS,
    score_range: tuple[float, float] = DEFAULT_SCORE_RANGE,
    exclude_self: bool | None = None,
    self_offset: int | None = None,
    variant: str = "ap_q",
    query_weights: torch.Tensor | None = None,
    block_size: int | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """The AP loss of cosine-similarity retrieval, computed from the embeddings without the
    N x M score matrix (``backend``: block by block, or the fused CUDA kernel).

    Equal to ``fastap.ap_loss(fastap.cosine.cosine_scores(queries, database), labels=...,
    ref_labels=..., exclude_self=..., ...)`` given the same arguments (mind that exclude_self
    defaults to True here without a database, and to False in fastap.ap_loss, and that
    self_offset defaults to 0 here, where fastap.ap_loss refuses exclude_self on N != M scores
    without one; the weighting is
    the same: 1 - the weighted mean AP over the queries with a positive), with gradients for both
    embedding sets, but never holding more than a
    ``block_size`` x M tile of scores (default: about 32 MB; the fused CUDA kernel holds none).
    Arguments as in :func:`histograms_from_embeddings`, plus ``variant`` and ``query_weights`` as
    in :func:`fastap.ap_loss`.
    """
    check_variant(variant)
    if query_weights is not None:  # (before the histograms, which take O(N M D))
        check_embedding_matrix(queries, "queries")
        query_weights = check_query_weights(query_weights, queries, "queries")
    n, p, positives = histograms_from_embeddings(
        queries,
        database,
        labels=labels,
        ref_labels=ref_labels,
        num_bins=num_bins,
        score_range=score_range,
        exclude_self=exclude_self,
        self_offset=self_offset,
        block_size=block_size,
        backend=backend,
    )
    ap, has_positive = ap_from_histograms(n, p, positives, variant)
    return weighted_loss(ap, has_positive, query_weights)
