"""Loading the extension, and the checks that it loaded and has kernels for the device
(require_extension, require_device_kernels); the fake (shape-only) functions that make the ops
work under torch.compile, meta tensors and torch.export; and the autograd Functions over the ops,
registered as the ops' own autograd. fastap.embeddings' blockwise path calls the score-matrix ops
too, tile by tile, after the same checks.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import os

import torch
import torch.autograd.forward_ad as forward_ad

from fastap._validation import (
    check_bins,
    check_bool,
    check_int,
    check_variant,
    type_name,
)

try:
    # (import_module rather than `from fastap import _C`, whose error for a missing module blames
    # a circular import)
    _C = importlib.import_module("fastap._C")  # registers the operators

    _LOAD_ERROR: Exception | None = None
except ImportError as error:  # pragma: no cover - only without a build
    _LOAD_ERROR = error


def _built_for() -> str | None:
    """The torch requirement of the installed fastap's metadata, e.g. "torch==2.13.*": the torch
    minor version its extension was built against (setup.py writes it), where it is installed."""
    try:
        requirements = importlib.metadata.requires("fastap") or []
    except importlib.metadata.PackageNotFoundError:
        return None
    pins = [r for r in requirements if r.replace(" ", "").startswith("torch==") and ";" not in r]
    return pins[0].replace(" ", "") if pins else None


def require_extension() -> None:
    """Raises, saying what went wrong and how to build it, where the compiled extension did not
    load: not built, or built against another torch."""
    if _LOAD_ERROR is None:
        return
    package = os.path.dirname(os.path.abspath(__file__))
    built = sorted(name for name in os.listdir(package) if name.startswith("_C."))
    if built:
        built_for = _built_for()
        against = f" (built for {built_for})" if built_for else ""
        problem = (
            f"the compiled extension fastap/{built[0]}{against} failed to load with torch "
            f"{torch.__version__} ({_LOAD_ERROR}): it loads only with the torch it was built "
            "against."
        )
    else:
        problem = f"the compiled extension fastap._C is not built ({_LOAD_ERROR})."
    unbuilt_source_tree = not built and os.path.exists(os.path.join(package, os.pardir, "setup.py"))
    where = (
        f" This fastap is imported from the source tree {os.path.dirname(package)}, which has "
        "no built extension: build it there, or, if a built fastap is installed, run from "
        "outside that tree so that it is the one imported."
        if unbuilt_source_tree
        else ""
    )
    raise RuntimeError(
        f"fastap: {problem} Rebuild fastap against the torch you run, from its source (a checkout, "
        "or the sdist): `pip install --no-build-isolation .` (`-e .` in a checkout you work in)."
        f"{where}"
    )


# Decided once at import so that the check below costs nothing and traces under torch.compile.
HAS_CUDA_KERNELS = _LOAD_ERROR is None and torch._C._dispatch_has_kernel_for_dispatch_key(
    "fastap::soft_histogram", "CUDA"
)


#: The fused from-embeddings kernels (csrc/cuda/embedding_histogram.cu) are in this build.
HAS_FUSED_EMBEDDING_KERNELS = (
    _LOAD_ERROR is None
    and torch._C._dispatch_has_kernel_for_dispatch_key("fastap::embedding_histogram", "CUDA")
)


def require_device_kernels(tensor: torch.Tensor, name: str = "scores") -> None:
    """Raises, saying how to rebuild, where `tensor` is on a CUDA device and this build has no
    CUDA kernels."""
    if tensor.device.type == "cuda" and not HAS_CUDA_KERNELS:
        raise RuntimeError(
            f"fastap: {name} is on a CUDA device but this build of fastap has no CUDA kernels. "
            "Rebuild with a CUDA toolkit and a CUDA build of torch: "
            "`FASTAP_CUDA=1 pip install --no-build-isolation -e .`"
        )


def histogram_dtype(scores_dtype: torch.dtype) -> torch.dtype:
    """The dtype of the histograms (and of the loss): float64 for float64 scores, else float32."""
    return torch.float64 if scores_dtype == torch.float64 else torch.float32


#: The ops' optional tensor arguments (the others are required).
_OPTIONAL_TENSORS = ("relevance", "labels", "ref_labels", "ignore")


def _check_fake_tensors(first: str, tensors: dict, optional: tuple[str, ...] = ()) -> None:
    """The fake functions' checks of their tensors, as the kernels make them: each required one
    is a tensor (a None that a direct op call gives reaches the function as None), and all are on
    one device (one tensor argument on another device, a meta tensor beside CPU ones, say, sends
    a call to the fake function instead of a kernel, whose own check would have refused it)."""
    for name, t in tensors.items():
        if t is None and name not in optional:
            raise TypeError(f"fastap: {name} must be a tensor, got None")
    device = tensors[first].device
    for name, t in tensors.items():
        if t is not None and t.device != device:
            raise ValueError(f"fastap: {name} is on {t.device} but {first} is on {device}")


if _LOAD_ERROR is None:

    @torch.library.register_fake("fastap::soft_histogram")
    def _soft_histogram_fake(
        scores, relevance, labels, ref_labels, ignore, exclude_self, num_bins, lo, hi, self_offset=0
    ):
        _check_fake_tensors(
            "scores",
            dict(
                scores=scores,
                relevance=relevance,
                labels=labels,
                ref_labels=ref_labels,
                ignore=ignore,
            ),
            _OPTIONAL_TENSORS,
        )
        shape = (scores.shape[0], num_bins)
        dtype = histogram_dtype(scores.dtype)
        return (
            scores.new_empty(shape, dtype=dtype),
            scores.new_empty(shape, dtype=dtype),
            scores.new_empty((scores.shape[0],), dtype=torch.int64),
        )

    @torch.library.register_fake("fastap::soft_histogram_backward")
    def _soft_histogram_backward_fake(
        grad_n, grad_p, scores, relevance, labels, ref_labels, ignore, exclude_self, num_bins,
        lo, hi, self_offset=0,
    ):  # fmt: skip
        _check_fake_tensors(
            "scores",
            dict(
                scores=scores,
                grad_n=grad_n,
                grad_p=grad_p,
                relevance=relevance,
                labels=labels,
                ref_labels=ref_labels,
                ignore=ignore,
            ),
            _OPTIONAL_TENSORS,
        )
        return torch.empty_like(scores, memory_format=torch.contiguous_format)

    @torch.library.register_fake("fastap::embedding_histogram")
    def _embedding_histogram_fake(
        queries, database, labels, ref_labels, exclude_self, self_offset, num_bins, lo, hi
    ):
        _check_fake_tensors(
            "queries",
            dict(queries=queries, database=database, labels=labels, ref_labels=ref_labels),
        )
        shape = (queries.shape[0], num_bins)
        return (
            queries.new_empty(shape, dtype=torch.float32),
            queries.new_empty(shape, dtype=torch.float32),
            queries.new_empty((queries.shape[0],), dtype=torch.int64),
        )

    @torch.library.register_fake("fastap::embedding_histogram_backward")
    def _embedding_histogram_backward_fake(
        grad_n, grad_p, queries, database, labels, ref_labels, exclude_self, self_offset,
        num_bins, lo, hi,
    ):  # fmt: skip
        _check_fake_tensors(
            "queries",
            dict(
                queries=queries,
                grad_n=grad_n,
                grad_p=grad_p,
                database=database,
                labels=labels,
                ref_labels=ref_labels,
            ),
        )
        return (
            torch.empty_like(queries, memory_format=torch.contiguous_format),
            torch.empty_like(database, memory_format=torch.contiguous_format),
        )

    @torch.library.register_fake("fastap::ap_from_histograms")
    def _ap_from_histograms_fake(n, p, positives, variant):
        _check_fake_tensors("n", dict(n=n, p=p, positives=positives))
        return n.new_empty((n.shape[0],))

    @torch.library.register_fake("fastap::ap_from_histograms_backward")
    def _ap_from_histograms_backward_fake(grad_ap, n, p, positives, variant):
        _check_fake_tensors("n", dict(n=n, grad_ap=grad_ap, p=p, positives=positives))
        return torch.empty_like(n, memory_format=torch.contiguous_format), torch.empty_like(
            p, memory_format=torch.contiguous_format
        )


DOUBLE_BACKWARD_MESSAGE = (
    "fastap: the gradient of the AP loss is not differentiable: a backward through it (after "
    "create_graph=True, as in a gradient penalty) is not supported"
)


def from_compute(function: type[torch.autograd.Function]) -> type[torch.autograd.Function]:
    """Class decorator: the Function's forward, from its compute(*inputs) (the forward's work)
    and save_context(ctx, inputs, output) (what the backward needs). The forward takes a ctx,
    the form torch.compile traces in every supported torch; `transformable` builds the form the
    torch.func transforms take from the same two."""

    def forward(ctx, *inputs):
        output = function.compute(*inputs)  # type: ignore[attr-defined]
        function.save_context(ctx, inputs, output)  # type: ignore[attr-defined]
        return output

    function.forward = staticmethod(forward)  # type: ignore[method-assign]
    return function


FORWARD_MODE_MESSAGE = (
    "fastap: forward-mode differentiation (torch.func.jvp, torch.func.jacfwd, "
    "torch.autograd.forward_ad) is not supported; use reverse mode (loss.backward(), "
    "torch.autograd.grad, torch.func.grad, vjp or jacrev)"
)


@from_compute
class _RaisesWhenDifferentiated(torch.autograd.Function):
    """forward(k, *tensors): copies of tensors[k:], wired to every one of tensors[:k] (the
    anchors); a backward through them raises."""

    @staticmethod
    def compute(num_anchors, *tensors):
        return tuple(t.clone() for t in tensors[num_anchors:])

    @staticmethod
    def save_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, *_):
        raise RuntimeError(DOUBLE_BACKWARD_MESSAGE)


@functools.cache
def transformable(function: type[torch.autograd.Function]) -> type[torch.autograd.Function]:
    """The form of one of fastap's autograd Functions that the torch.func transforms take.

    fastap's Functions take a ctx in their forward: the form torch.compile traces in every
    supported torch (the other, whose forward takes none and a setup_context stores what the
    backward needs, fails to trace in torch 2.13 when no input requires a gradient). The
    torch.func transforms take only the other, so each Function also has its forward's work as
    `compute(*inputs)` and its storing as `save_context(ctx, inputs, output)`, from which this
    builds it, with the same backward. Under vmap, the forward runs on the batched tensors
    (generate_vmap_rule): torch then runs fastap's operators once per batch element. Forward-mode
    AD (jvp) raises FORWARD_MODE_MESSAGE."""

    def refuse_forward_mode(ctx, *tangents):
        raise RuntimeError(FORWARD_MODE_MESSAGE)

    return type(
        f"{function.__name__}UnderTransforms",
        (torch.autograd.Function,),
        {
            "__doc__": f"{function.__name__} in the form the torch.func transforms take.",
            "generate_vmap_rule": True,
            "forward": staticmethod(function.compute),  # type: ignore[attr-defined]
            "setup_context": staticmethod(function.save_context),  # type: ignore[attr-defined]
            "backward": staticmethod(function.backward),
            "jvp": staticmethod(refuse_forward_mode),
        },
    )


def apply_function(function: type[torch.autograd.Function], *inputs):
    """function.apply(*inputs); under a torch.func transform (grad, vjp, jacrev, vmap, ...) or
    forward-mode AD's dual level (not while torch.compile traces), its transformable form's."""
    if not torch.compiler.is_compiling() and (
        torch._C._are_functorch_transforms_active() or forward_ad._current_level >= 0
    ):
        return transformable(function).apply(*inputs)
    return function.apply(*inputs)


def differentiable_once(backward):
    """Wraps the backward of fastap's autograd Functions. Their backward ops have no derivative of
    their own, so the gradients are computed without recording them; under create_graph they
    come back wired to raise when differentiated (with respect to anything they depend on: the
    saved inputs and the incoming gradients), rather than as constants whose own gradient would
    silently be zero. Copies, so only under create_graph: the memory of the gradients twice."""

    @functools.wraps(backward)
    def wrapper(ctx, *grads):
        with torch.no_grad():
            outputs = backward(ctx, *grads)
        if not torch.is_grad_enabled():
            return outputs
        single = not isinstance(outputs, tuple)
        outputs = (outputs,) if single else outputs
        anchors = [
            t
            for t in (*ctx.saved_tensors, *grads)
            if isinstance(t, torch.Tensor) and t.requires_grad
        ]
        present = [g for g in outputs if g is not None]
        if anchors and present:
            copies = apply_function(_RaisesWhenDifferentiated, len(anchors), *anchors, *present)
            wired = iter(copies)
            outputs = tuple(None if g is None else next(wired) for g in outputs)
        return outputs[0] if single else outputs

    return wrapper


def dense_histogram_grads(grad_n, grad_p):
    """The incoming gradients of (n, p) as tensors. (Defensive: torch materialises an unused
    output's gradient as zeros on the Function, torch.ops and torch.compile paths, as far as
    tests with torch 2.13 see, but a None would otherwise reach the kernels.)"""
    if grad_n is None:
        grad_n = torch.zeros_like(grad_p)
    if grad_p is None:
        grad_p = torch.zeros_like(grad_n)
    return grad_n, grad_p


@from_compute
class SoftHistogram(torch.autograd.Function):
    """Soft-binned histograms of each query row's scores, differentiable with respect to scores.

    forward(scores [N, M], relevance [N, M] bool/uint8 or None, labels [N] int64 or None,
    ref_labels [M] int64 or None, ignore [N, M] bool/uint8 or None, exclude_self, num_bins, lo, hi,
    self_offset) returns (n, p, positives): n and p [N, num_bins] soft counts of every counted
    candidate and of the positives; positives [N] int64, the exact number of positives (not
    differentiable). With exclude_self, candidate i + self_offset is query i itself and counts
    nowhere. Arguments are expected to be checked already (see fastap.functional).
    """

    @staticmethod
    def compute(*inputs):
        return torch.ops.fastap.soft_histogram(*inputs)

    @staticmethod
    def save_context(ctx, inputs, output):
        scores, relevance, labels, ref_labels, ignore, *options = inputs
        ctx.save_for_backward(scores, relevance, labels, ref_labels, ignore)
        ctx.options = tuple(options)  # exclude_self, num_bins, lo, hi, self_offset
        ctx.mark_non_differentiable(output[2])

    @staticmethod
    @differentiable_once
    def backward(ctx, grad_n, grad_p, _grad_positives):
        scores, relevance, labels, ref_labels, ignore = ctx.saved_tensors
        grad_n, grad_p = dense_histogram_grads(grad_n, grad_p)
        grad_scores = torch.ops.fastap.soft_histogram_backward(
            grad_n, grad_p, scores, relevance, labels, ref_labels, ignore, *ctx.options
        )
        return (grad_scores, None, None, None, None) + (None,) * len(ctx.options)


def soft_histogram(
    scores: torch.Tensor,
    relevance: torch.Tensor | None,
    labels: torch.Tensor | None,
    ref_labels: torch.Tensor | None,
    ignore: torch.Tensor | None,
    exclude_self: bool,
    num_bins: int,
    lo: float,
    hi: float,
    self_offset: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Differentiable (n, p) histograms and the positive counts, from the fused kernels (see
    SoftHistogram). The Python arguments are checked as the front ends check them; the tensors'
    shapes, dtypes and devices by the kernels; their values not at all (docs/api.md)."""
    if not isinstance(scores, torch.Tensor):
        raise TypeError(f"fastap: scores must be a torch.Tensor, got {type_name(scores)}")
    check_bool(exclude_self, "exclude_self")
    num_bins, lo, hi = check_bins(num_bins, (lo, hi), scores.dtype)
    self_offset = check_int(self_offset, "self_offset", 0)
    if self_offset and not exclude_self:
        raise ValueError("fastap: self_offset only applies with exclude_self=True")
    return soft_histogram_of_checked_args(
        scores, relevance, labels, ref_labels, ignore, exclude_self, num_bins, lo, hi, self_offset
    )


def soft_histogram_of_checked_args(*args) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """soft_histogram's Function on arguments that soft_histogram or check_histogram_args has
    checked already: the front ends' path, which checks them once.

    The kernels read contiguous N x M tensors: scores or masks of other strides (a transposed
    or sliced matrix, an expanded mask) are copied here, once, and the Function saves the copies
    for the backward, whose op would otherwise copy them again."""
    require_extension()
    require_device_kernels(args[0])
    scores, relevance, labels, ref_labels, ignore, *options = args
    scores, relevance, ignore = (
        t.contiguous() if isinstance(t, torch.Tensor) else t for t in (scores, relevance, ignore)
    )
    return apply_function(SoftHistogram, scores, relevance, labels, ref_labels, ignore, *options)


def embedding_sets(queries, database, labels, ref_labels):
    """The (queries, database, labels, ref_labels) of an embedding Function. database and
    ref_labels are None for the in-batch case (the database is the queries): the Functions take
    each tensor once, which torch.compile requires, and give the queries both gradients."""
    if database is None:
        return queries, queries, labels, labels
    return queries, database, labels, ref_labels


def embedding_grads(saved_database, grad_queries, grad_database):
    """The Function's gradients of (queries, database): in-batch (the saved database is None),
    the queries get their sum."""
    if saved_database is None:
        return grad_queries + grad_database, None
    return grad_queries, grad_database


@from_compute
class EmbeddingHistogram(torch.autograd.Function):
    """(n, p, positives) of the cosine scores queries @ database.T from the fused CUDA kernels,
    which never store a score (fastap::embedding_histogram); differentiable with respect to both
    embedding sets.

    forward(queries [N, D], database [M, D] or None (the queries: in-batch), both L2-normalised,
    one of float32/bfloat16/float16, labels [N] int64, ref_labels [M] int64 or None (in-batch),
    exclude_self, self_offset, num_bins, lo, hi). Arguments are expected to be checked already
    (see fastap.embeddings).
    """

    @staticmethod
    def compute(queries, database, labels, ref_labels, *options):
        sets = embedding_sets(queries, database, labels, ref_labels)
        return torch.ops.fastap.embedding_histogram(*sets, *options)

    @staticmethod
    def save_context(ctx, inputs, output):
        queries, database, labels, ref_labels, *options = inputs
        ctx.save_for_backward(queries, database, labels, ref_labels)
        ctx.options = tuple(options)  # exclude_self, self_offset, num_bins, lo, hi
        ctx.mark_non_differentiable(output[2])

    @staticmethod
    @differentiable_once
    def backward(ctx, grad_n, grad_p, _grad_positives):
        saved = ctx.saved_tensors
        grad_n, grad_p = dense_histogram_grads(grad_n, grad_p)
        grads = torch.ops.fastap.embedding_histogram_backward(
            grad_n, grad_p, *embedding_sets(*saved), *ctx.options
        )
        return (*embedding_grads(saved[1], *grads), None, None) + (None,) * len(ctx.options)


@from_compute
class ApFromHistograms(torch.autograd.Function):
    """Per-query AP of a loss variant from the histograms (fastap::ap_from_histograms: one
    kernel for the O(N Q) formula instead of some thirty small tensor ops), differentiable with
    respect to n and p.

    forward(n [N, Q], p [N, Q] (float32 or float64), positives [N] (exact counts), variant)
    returns ap [N], 0 for a query without positives (no gradient). The formulas are those of
    fastap.reference.ap_from_histograms (csrc/ap_formula.h).
    """

    @staticmethod
    def compute(n, p, positives, variant):
        return torch.ops.fastap.ap_from_histograms(n, p, positives, variant)

    @staticmethod
    def save_context(ctx, inputs, output):
        n, p, positives, variant = inputs
        ctx.save_for_backward(n, p, positives)
        ctx.variant = variant

    @staticmethod
    @differentiable_once
    def backward(ctx, grad_ap):
        n, p, positives = ctx.saved_tensors
        grad_n, grad_p = torch.ops.fastap.ap_from_histograms_backward(
            grad_ap, n, p, positives, ctx.variant
        )
        return grad_n, grad_p, None, None


def ap_from_histograms(
    n: torch.Tensor, p: torch.Tensor, positives: torch.Tensor, variant: str
) -> torch.Tensor:
    """Differentiable per-query AP from the histograms (see ApFromHistograms)."""
    require_extension()
    return apply_function(ApFromHistograms, n, p, positives, check_variant(variant))


if _LOAD_ERROR is None:
    # The operators themselves differentiate as their Functions do, so that a direct
    # torch.ops.fastap call (or a graph that holds one) has the same gradients: the Functions'
    # own save_context and backward, registered once for both. (save_context, not
    # setup_context: that name would make the Functions "new style", whose forward takes no ctx
    # and which torch.compile, in torch 2.13, fails to trace when no input requires a gradient.)
    for _name, _function in (
        ("fastap::soft_histogram", SoftHistogram),
        ("fastap::embedding_histogram", EmbeddingHistogram),
        ("fastap::ap_from_histograms", ApFromHistograms),
    ):
        torch.library.register_autograd(
            _name, _function.backward, setup_context=_function.save_context
        )
