"""Distributed training: rank each process's queries against the descriptors of every process.

Uses torch.distributed's own collectives (NCCL on GPUs, gloo on CPU): an all_gather whose
backward all-reduces the gradient of the gathered tensor, so the gradient of every descriptor
flows back to the process that owns it, summed over the processes whose losses used it.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from fastap._validation import SCORE_DTYPES, type_name, values_of_one_batch
from fastap.losses import APLoss, _EmbeddingAPLoss, check_batch
from fastap.ops import apply_function, from_compute


@from_compute
class _AllGather(torch.autograd.Function):
    """Concatenation of every process's (equally shaped) tensor, in rank order. Backward: the
    gradients of all processes summed (all_reduce), and this process's rows returned."""

    @staticmethod
    def compute(tensor, group):
        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, tensor.contiguous(), group=group)
        return torch.cat(parts)

    @staticmethod
    def save_context(ctx, inputs, output):
        tensor, group = inputs
        ctx.group = group
        ctx.rank = dist.get_rank(group)
        ctx.rows = tensor.shape[0]

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows], None


def gather_embeddings(
    embeddings: torch.Tensor, labels: torch.Tensor, group=None
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """All processes' embeddings and labels, in rank order, with gradients to their owners.

    Args:
        embeddings: [B_r, D] this process's embeddings (B_r may differ between processes).
        labels: [B_r] integer labels.
    Returns:
        (all_embeddings [sum B_r, D], all_labels [sum B_r], offset): ``offset`` is where this
        process's rows start in the gathered tensors (the labels as int64).
    """
    owner = "fastap.distributed.gather_embeddings"
    return _gather_checked(embeddings, labels, _check_group(group, owner), owner)[:3]


def _check_group(group, owner: str):
    """A process group argument: None (the default group) or a torch.distributed ProcessGroup."""
    if group is not None and not isinstance(group, getattr(dist, "ProcessGroup", ())):
        raise TypeError(
            f"{owner}: group must be a torch.distributed process group or None (the default "
            f"group), got {type_name(group)}"
        )
    return group


# The collectives run eagerly under torch.compile (a graph break): traced, the size exchange (a
# gloo all_gather, read back to the host) deadlocked in torch 2.13, gloo's thread waiting for the
# GIL that the tracing thread held while it waited for the collective.
@torch.compiler.disable
def _gather_checked(
    embeddings, labels, group, owner: str
) -> tuple[torch.Tensor, torch.Tensor, int, torch.Tensor]:
    """gather_embeddings, with the batch checked (check_batch) on every process before any
    collective but the first: a batch refused on one process is refused on all (the process
    raises its own error, the others say which process refused), where the others used to wait
    in the next collective for a process that had left. Returns gather_embeddings' three and this
    process's labels as int64."""
    try:
        labels = check_batch(embeddings, labels, owner)
        values_of_one_batch(
            dict(embeddings=embeddings, labels=labels),
            owner,
            "cannot be gathered (the collectives take one batch per process)",
        )
        if embeddings.device.type == "meta":
            raise ValueError(
                f"{owner}: embeddings are on the meta device, which holds no batch sizes to "
                "exchange between processes"
            )
        refusal = None
    except (TypeError, ValueError) as error:
        refusal = error
    if not dist.is_available() or not dist.is_initialized():
        if refusal is not None:
            raise refusal
        raise RuntimeError("fastap: torch.distributed is not initialised (init_process_group)")
    world = dist.get_world_size(group)
    rank = dist.get_rank(group)
    # Each process's rows, dimension and dtype (-1 rows: its batch was refused): the collectives
    # below need the same dimension and dtype everywhere (gloo aborts the process otherwise), and
    # every process raises alike.
    if refusal is None:
        row = [embeddings.shape[0], embeddings.shape[1], SCORE_DTYPES.index(embeddings.dtype)]
        device = embeddings.device
    else:
        row, device = [-1, 0, 0], _exchange_device(embeddings, group)
    shape = torch.tensor(row, device=device)
    gathered_shapes = [torch.zeros_like(shape) for _ in range(world)]
    dist.all_gather(gathered_shapes, shape, group=group)
    if refusal is not None:
        raise refusal
    shapes = [tuple(int(v) for v in s) for s in gathered_shapes]
    refused = [r for r, s in enumerate(shapes) if s[0] < 0]
    if refused:
        ranks = ", ".join(str(r) for r in refused)
        raise ValueError(
            f"{owner}: the batch of rank {ranks} was refused (that process raised why); every "
            "process raises with it"
        )
    if any(s[1:] != shapes[rank][1:] for s in shapes):
        described = ", ".join(
            f"rank {r}: {SCORE_DTYPES[code]} of dimension {dim}"
            for r, (_, dim, code) in enumerate(shapes)
        )
        raise ValueError(
            f"{owner}: the processes' embeddings differ in dimension or dtype ({described}); "
            "every process must give the same"
        )
    sizes = [s[0] for s in shapes]
    largest = max(sizes)
    pad = largest - embeddings.shape[0]
    # Collectives need equal shapes: pad to the largest batch, then drop the padding.
    padded = F.pad(embeddings, (0, 0, 0, pad))
    padded_labels = F.pad(labels, (0, pad))
    gathered = apply_function(_AllGather, padded, group).split(largest)
    gathered_labels = [torch.empty_like(padded_labels) for _ in range(world)]
    dist.all_gather(gathered_labels, padded_labels.contiguous(), group=group)
    all_embeddings = torch.cat([g[:s] for g, s in zip(gathered, sizes)])
    all_labels = torch.cat([g[:s] for g, s in zip(gathered_labels, sizes)])
    return all_embeddings, all_labels, sum(sizes[:rank]), labels


def _exchange_device(embeddings, group) -> torch.device:
    """Where a process whose batch was refused puts its part of the size exchange: its
    embeddings' device if they have values, else the backend's (NCCL: the current CUDA device)."""
    if isinstance(embeddings, torch.Tensor) and embeddings.device.type != "meta":
        return embeddings.device
    if "nccl" in str(dist.get_backend(group)).lower():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


@torch.compiler.disable
def _global_sum(value: torch.Tensor, group) -> torch.Tensor:
    """`value` summed over the processes (in place; eager under torch.compile, as above)."""
    dist.all_reduce(value, group=group)
    return value


class DistributedAPLoss(torch.nn.Module):
    """A fastap embedding loss over the global batch, computed where the data are.

    Each process ranks its own B_r embeddings (queries) against the embeddings of all processes
    (each query's own entry excluded) with ``loss`` (default ``fastap.APLoss()``; any of
    ``fastap.APLoss``/``fastap.FastAPLoss`` with their settings) and returns its share of the
    global loss: the sum over its queries with a positive of (1 - AP_i), divided by the number of
    such queries in the whole global batch. The shares add up to the single-process loss of the
    global batch, ``loss(all_embeddings, all_labels)``, and after backward the gradient of each
    embedding is that of the global loss (all_gather's backward sums it over processes).
    DistributedDataParallel averages parameter gradients over processes, i.e. divides that
    gradient by the world size: multiply the loss by ``dist.get_world_size()`` (or the learning
    rate) to undo that.

    Memory per process: a B_r x sum(B_r) score matrix (above the loss's ``score_matrix_limit``,
    computed from the embeddings without it).
    """

    def __init__(self, loss: _EmbeddingAPLoss | None = None, group=None):
        super().__init__()
        self.loss = APLoss() if loss is None else loss
        if not isinstance(self.loss, _EmbeddingAPLoss):
            raise TypeError("fastap: loss must be a fastap embedding loss (APLoss, FastAPLoss)")
        self.group = _check_group(group, "fastap.distributed.DistributedAPLoss")

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """This process's share of the global loss (see the class): embeddings [B_r, D] and labels
        [B_r] of this process's batch; every process of the group must call it (a collective)."""
        # (A batch refused on one process is refused on every process, in the size exchange.)
        owner = "fastap.distributed.DistributedAPLoss"
        all_embeddings, all_labels, offset, labels = _gather_checked(
            embeddings, labels, self.group, owner
        )
        # Query i of this process is row offset + i of the gathered batch: not its own positive.
        per_query, valid = self.loss.per_query_loss(
            embeddings, all_embeddings, labels, all_labels, exclude_self=True, self_offset=offset
        )
        mask = valid.to(per_query.dtype)
        count = _global_sum(mask.sum().detach(), self.group)
        share = (mask * per_query).sum() / count.clamp_min(1)
        return torch.where(count > 0, share, torch.zeros_like(share))
