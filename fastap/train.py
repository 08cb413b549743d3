"""Multi-stage backpropagation: a listwise loss over a batch larger than fits through the model
at once (Revaud et al. 2019, section 4.2).

1. Compute every descriptor chunk by chunk without a graph.
2. Compute the loss on all descriptors and its gradient with respect to them.
3. Recompute each chunk with a graph and backpropagate the stored gradient of its descriptors.

Memory: the model's activations for one chunk, plus the descriptors of the whole batch.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Sequence

import torch

from fastap._validation import check_bool, check_int, type_name

_BATCHNORM = (torch.nn.modules.batchnorm._BatchNorm,)
# The layers with running statistics (BatchNorm, SyncBatchNorm, and InstanceNorm with
# track_running_stats): their base class, whose buffers stage 1 leaves as they were.
_RUNNING_STATISTICS = (torch.nn.modules.batchnorm._NormBase,)


def _split(inputs, chunk_size: int):
    # (An empty batch is one empty chunk: the model and the loss see it as they would any batch.)
    if isinstance(inputs, torch.Tensor):
        _check_batch_dimension(inputs)
        return [(chunk,) for chunk in inputs.split(chunk_size)]
    if isinstance(inputs, Sequence) and not isinstance(inputs, str):
        if len(inputs) == 0:
            raise ValueError("fastap: inputs is an empty sequence (give at least one tensor)")
        if all(isinstance(t, torch.Tensor) for t in inputs):
            for t in inputs:
                _check_batch_dimension(t)
            sizes = {t.shape[0] for t in inputs}
            if len(sizes) != 1:
                raise ValueError(
                    f"fastap: the inputs must share their first dimension, got {sizes}"
                )
            return list(zip(*(t.split(chunk_size) for t in inputs)))
    raise TypeError("fastap: inputs must be a tensor or a sequence of tensors (batch first)")


def _check_batch_dimension(t: torch.Tensor) -> None:
    if t.dim() == 0:
        raise ValueError("fastap: inputs must be batch first, got a 0-d tensor")


def _devices_of(chunks) -> list[int]:
    devices = {t.device.index for chunk in chunks for t in chunk if t.is_cuda}
    return sorted(d for d in devices if d is not None)


@contextlib.contextmanager
def _random_state(state, devices):
    """Run the block with the CPU (and CUDA) random state set to `state`, restoring afterwards."""
    with torch.random.fork_rng(devices=devices):
        torch.set_rng_state(state[0])
        for device, cuda_state in zip(devices, state[1]):
            torch.cuda.set_rng_state(cuda_state, device)
        yield


def multistage_backward(
    model: torch.nn.Module,
    inputs: torch.Tensor | Sequence[torch.Tensor],
    loss_fn: Callable[[torch.Tensor], torch.Tensor],
    chunk_size: int,
    *,
    autocast_dtype: torch.dtype | None = None,
    scaler: torch.amp.GradScaler | None = None,
    preserve_rng_state: bool = True,
) -> torch.Tensor:
    """Backpropagate ``loss_fn(model(inputs))`` through ``model`` chunk by chunk.

    Leaves on the parameters the ``.grad`` of a plain full-batch ``loss.backward()`` (added to
    what is already there, so gradient accumulation works as usual; call
    ``optimizer.zero_grad()`` yourself), up to float rounding, when the model's output for a
    sample does not depend on the other samples of its chunk (see BatchNorm below).

    Args:
        model: maps a chunk of inputs to descriptors [chunk, D].
        inputs: [B, ...] tensor, or a sequence of tensors that share their first dimension (each
            chunk is passed as ``model(*chunk)``).
        loss_fn: maps all descriptors [B, D] to a scalar loss tensor (capture the labels in it,
            e.g. ``lambda d: fastap.APLoss()(d, labels)``); a loss that does not depend on the
            descriptors gives them, and so the parameters, a zero gradient.
        chunk_size: samples per forward pass (stages 1 and 3).
        autocast_dtype: run the model under ``torch.autocast`` with this dtype (the loss is
            computed on the descriptors upcast to float32).
        scaler: a ``torch.amp.GradScaler`` for fp16: the loss is scaled before its backward, so
            the parameter gradients come out scaled as ``scaler.step`` expects.
        preserve_rng_state: replay each chunk's random state in stage 3 so that dropout and other
            random layers see the same masks as in stage 1 (as torch.utils.checkpoint does).
    Returns:
        The loss (detached).

    BatchNorm in training mode normalises each chunk with the chunk's statistics, so the
    descriptors (and gradients) are those of a chunked forward, not of one full-batch forward.
    Running statistics are updated once per chunk (stage 3 only; stage 1 leaves them as they
    were, those of InstanceNorm with ``track_running_stats`` too; other layers that update
    buffers in their forward, such as ``spectral_norm``'s power iteration, do so in both
    stages). The usual remedy for retrieval fine-tuning is to freeze BatchNorm:
    :func:`freeze_batchnorm`.

    Where the model or ``loss_fn`` raises, the exception propagates: the BatchNorm statistics are
    then as they were before the call if it was in stages 1 or 2, while in stage 3 the
    parameters' ``.grad`` holds the gradients of the chunks done (zero them before a retry).
    A model with no parameter that requires grad, on inputs that require none, is refused
    before stage 1 (ValueError; nothing has run). A model whose output does not require grad
    all the same (it detaches it) is refused at stage 3's first chunk, with the BatchNorm
    statistics as they were, but after ``loss_fn`` has run (a cross-batch memory has taken the
    batch).

    Dropout and other random layers draw their masks per chunk: with ``preserve_rng_state`` the
    gradients are exactly those of one backward through the same chunks. Under
    DistributedDataParallel the gradient all-reduce runs once, with the last chunk (the others
    run under ``no_sync()``), so processes with different numbers of chunks do not wait on each
    other.
    """
    owner = "fastap.train.multistage_backward"
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"{owner}: model must be a torch.nn.Module, got {type_name(model)}")
    if not callable(loss_fn):
        raise TypeError(f"{owner}: loss_fn must be callable, got {type_name(loss_fn)}")
    chunk_size = check_int(chunk_size, "chunk_size", 1)
    if autocast_dtype is not None and not isinstance(autocast_dtype, torch.dtype):
        # (a numpy array or a tensor would be compared element by element below)
        raise TypeError(
            f"{owner}: autocast_dtype must be torch.float16, torch.bfloat16 or None, got "
            f"{type_name(autocast_dtype)}"
        )
    if autocast_dtype is not None and autocast_dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(
            f"{owner}: autocast_dtype must be torch.float16, torch.bfloat16 or None, got "
            f"{autocast_dtype!r}"
        )
    if scaler is not None and not isinstance(scaler, torch.amp.GradScaler):
        raise TypeError(
            f"{owner}: scaler must be a torch.amp.GradScaler or None, got {type_name(scaler)}"
        )
    check_bool(preserve_rng_state, "preserve_rng_state", owner)
    if not torch.is_grad_enabled():
        raise RuntimeError(
            "fastap.train.multistage_backward: gradients are disabled here (torch.no_grad or "
            "torch.inference_mode); call it where they are enabled"
        )
    chunks = _split(inputs, chunk_size)
    # Refused before anything runs (so loss_fn, a cross-batch memory's enqueue with it, and the
    # BatchNorm statistics see nothing): a model with no parameter that takes a gradient, on
    # inputs that take none, has nothing to backpropagate to.
    if not any(p.requires_grad for p in model.parameters()) and not any(
        t.requires_grad for t in chunks[0]
    ):
        raise ValueError(
            f"{owner}: no parameter of the model and no input requires grad (are all its "
            "parameters frozen?): there is nothing to backpropagate to"
        )
    devices = _devices_of(chunks)
    device_type = "cuda" if devices else "cpu"

    def autocast():
        if autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type, dtype=autocast_dtype)

    # Stage 1: descriptors without a graph; keep each chunk's random state for stage 3 and leave
    # the running statistics (BatchNorm's, InstanceNorm's) untouched (stage 3 updates them).
    saved_buffers = {
        name: buffer.clone()
        for module_name, module in model.named_modules()
        if isinstance(module, _RUNNING_STATISTICS)
        for name, buffer in (
            (f"{module_name}.{n}", b) for n, b in module.named_buffers(recurse=False)
        )
    }

    def restore_running_statistics() -> None:
        buffers = dict(model.named_buffers())
        with torch.no_grad():
            for name, value in saved_buffers.items():
                buffers[name].copy_(value)

    states, outputs = [], []
    try:
        with torch.no_grad():
            for chunk in chunks:
                if preserve_rng_state:
                    states.append(
                        (torch.get_rng_state(), [torch.cuda.get_rng_state(d) for d in devices])
                    )
                with autocast():
                    outputs.append(_descriptors(model(*chunk), owner))
    finally:  # (also where the model raised part-way)
        restore_running_statistics()

    # Stage 2: the loss and its gradient with respect to every descriptor.
    descriptors = torch.cat(outputs)
    if descriptors.dtype in (torch.float16, torch.bfloat16):
        descriptors = descriptors.float()  # the loss on fp32 descriptors under autocast
    descriptors.requires_grad_()
    loss = loss_fn(descriptors)
    if not isinstance(loss, torch.Tensor):
        raise TypeError(f"fastap: loss_fn must return a tensor, got {type(loss).__name__}")
    if loss.dim() != 0:
        raise ValueError(f"fastap: loss_fn must return a scalar, got shape {list(loss.shape)}")
    if loss.requires_grad:  # (else a constant: nothing to backpropagate)
        (scaler.scale(loss) if scaler is not None else loss).backward()
    # A loss that does not reach the descriptors (loss_fn ignores them) gives them no gradient:
    # zero, so that every chunk still takes part in stage 3 (and in DDP's one reduction).
    grad = descriptors.grad if descriptors.grad is not None else torch.zeros_like(descriptors)
    grads = grad.split([len(o) for o in outputs])

    # Stage 3: recompute each chunk with a graph and backpropagate its descriptors' gradient.
    # Under DistributedDataParallel, gradients are all-reduced once, with the last chunk: every
    # process then takes part in exactly one reduction whatever its number of chunks.
    no_sync = getattr(model, "no_sync", None)
    for index, (chunk, grad) in enumerate(zip(chunks, grads)):
        replay = _random_state(states[index], devices) if preserve_rng_state else None
        last = index == len(chunks) - 1
        sync = contextlib.nullcontext() if last or no_sync is None else no_sync()
        with sync:
            with replay or contextlib.nullcontext(), autocast():
                output = model(*chunk)
            if not output.requires_grad:  # (a model that detaches its output: at chunk 0)
                if index == 0:  # (a later chunk's refusal leaves the chunks done as they are)
                    restore_running_statistics()
                raise ValueError(
                    f"{owner}: the model's output does not require grad (does it detach "
                    "it?): there is nothing to backpropagate to"
                )
            output.backward(grad.to(output.dtype))
    return loss.detach()


def _descriptors(output, owner: str) -> torch.Tensor:
    """The model's output for a chunk, checked: a floating-point tensor, batch first."""
    if not isinstance(output, torch.Tensor):
        raise TypeError(
            f"{owner}: the model must return a tensor of descriptors [chunk, D], got "
            f"{type_name(output)}"
        )
    if not output.is_floating_point() or output.dim() == 0:
        raise TypeError(
            f"{owner}: the model must return floating-point descriptors [chunk, D], got "
            f"{output.dtype} of shape {list(output.shape)}"
        )
    return output


def _stay_in_eval(module: torch.nn.Module, mode: bool = True) -> torch.nn.Module:
    """A frozen BatchNorm's ``train()``: it stays in eval mode."""
    module.training = False
    return module


def freeze_batchnorm(model: torch.nn.Module) -> torch.nn.Module:
    """Freeze every BatchNorm layer: eval mode (running statistics used, never updated), which a
    later ``model.train()`` does not undo, and no gradient for its affine parameters. The rest of
    the model keeps its mode. Returns the model."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(
            "fastap.train.freeze_batchnorm: model must be a torch.nn.Module, got "
            f"{type_name(model)}"
        )
    for module in model.modules():
        if isinstance(module, _BATCHNORM):
            module.eval()
            # A partial of a module-level function, not a bound method: pickle (torch.save of the
            # whole model) stores it by name, where a bound method was looked up, and not found,
            # on the module when it was loaded.
            module.train = functools.partial(_stay_in_eval, module)  # type: ignore[method-assign, assignment]
            for parameter in module.parameters(recurse=False):
                parameter.requires_grad_(False)
    return model
