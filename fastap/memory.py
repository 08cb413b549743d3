"""Cross-batch memory: past descriptors as extra database entries for a fastap loss."""

from __future__ import annotations

import torch
from torch._functorch.pyfunctorch import temporarily_clear_interpreter_stack

from fastap._validation import (
    SCORE_DTYPES,
    check_bool,
    check_int,
    is_integer_tensor,
    values_of_one_batch,
)
from fastap.cosine import unit_rows
from fastap.losses import APLoss, _EmbeddingAPLoss, check_batch, mean_over_valid

#: The key suffix under which torch's modules save get_extra_state.
_EXTRA_STATE = "_extra_state"

#: How the messages name the class.
_OWNER = "fastap.memory.CrossBatchMemory"


class CrossBatchMemory(torch.nn.Module):
    """A first-in first-out memory of the last ``size`` descriptors and labels, used as extra
    database entries (Wang et al., "Cross-Batch Memory for Embedding Learning", CVPR 2020).

    ``loss = CrossBatchMemory(fastap.APLoss(), size=4096)(embeddings, labels)`` ranks each
    embedding of the batch against the batch itself (its own entry excluded) and the memory, with
    the given fastap embedding loss (its bins, range and variant), then enqueues the batch.
    Gradients flow into the current batch only: the memory holds detached copies (of the unit
    rows), which is what makes it cheap (and what makes old entries slightly stale as the model
    moves).

    Memory: ``size`` x D descriptors (in the dtype and on the device of the first batch) and
    ``size`` int64 labels, allocated on the first call; a batch of B embeddings costs a
    B x (B + size) score matrix (above the loss's ``score_matrix_limit``, computed from the
    embeddings without it). A batch larger than ``size`` keeps only its last ``size`` rows.
    The memory holds the batches' directions, their unit rows (all that the losses' cosine
    scores read), so that they keep their meaning in every float dtype: a finite descriptor does
    not turn into infinities or zeros in a float16 memory, or a memory cast by ``.half()``. A
    meta batch gets a meta loss against the entries and is not enqueued.
    """

    def __init__(self, loss: _EmbeddingAPLoss | None = None, size: int = 4096):
        super().__init__()
        size = check_int(size, "size", 1, _OWNER)
        self.loss = APLoss() if loss is None else loss
        if not isinstance(self.loss, _EmbeddingAPLoss):
            raise TypeError("fastap: loss must be a fastap embedding loss (APLoss, FastAPLoss)")
        self.size = size
        self.embeddings: torch.Tensor
        self.labels: torch.Tensor
        self.register_buffer("embeddings", torch.empty(0), persistent=True)
        self.register_buffer("labels", torch.empty(0, dtype=torch.long), persistent=True)
        self.filled = 0  # entries in use
        self.next = 0  # where the next entry goes

    def extra_repr(self) -> str:
        return f"size={self.size}, filled={self.filled}"

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        # The buffers are sized on the first batch: size them from the checkpoint before loading.
        # The whole state is checked first, so that a refused one (load_state_dict raises with
        # the reasons) leaves this memory as it was.
        problem = self._state_problem(state_dict, prefix)
        if problem is not None:
            error_msgs.append(f"fastap: {problem}")
            return
        for name in ("embeddings", "labels"):
            saved = state_dict.get(prefix + name)
            if saved is not None:
                # On this memory's device; in its dtype if it holds entries (as torch's modules
                # load), else in the checkpoint's, as its first batch would have set it.
                current = getattr(self, name)
                dtype = current.dtype if current.numel() else saved.dtype
                if name == "labels":
                    dtype = torch.int64  # (whatever integer dtype the checkpoint's are in)
                setattr(self, name, current.new_empty(saved.shape, dtype=dtype))
                narrowing = torch.promote_types(saved.dtype, dtype) != dtype
                if name == "embeddings" and narrowing and saved.numel():
                    # Into a dtype that does not hold the checkpoint's, as directions (a
                    # checkpoint's entries may be raw ones, of another version or program);
                    # otherwise as they are, so that a round trip keeps their bits. (torch's
                    # load_state_dict hands each module its own copy of the dict.)
                    state_dict[prefix + name] = unit_rows(saved).to(dtype)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def _state_problem(self, state_dict, prefix) -> str | None:
        """What is wrong with a checkpoint's state of a memory (None: it can be loaded)."""
        embeddings = state_dict.get(prefix + "embeddings")
        labels = state_dict.get(prefix + "labels")
        extra = state_dict.get(prefix + _EXTRA_STATE)
        parts = {"embeddings": embeddings, "labels": labels, _EXTRA_STATE: extra}
        missing = [name for name, part in parts.items() if part is None]
        if len(missing) == len(parts):
            return None  # (nothing of a memory: load_state_dict reports the missing keys)
        if missing:
            return f"the checkpoint's CrossBatchMemory lacks its {' and '.join(missing)}"
        if not isinstance(embeddings, torch.Tensor) or not isinstance(labels, torch.Tensor):
            return "the checkpoint's CrossBatchMemory embeddings and labels must be tensors"
        if not isinstance(extra, dict) or not all(
            type(extra.get(key)) is int for key in ("filled", "next")
        ):
            return (
                "the checkpoint's CrossBatchMemory state must be a dict of int filled and next, "
                f"got {extra!r}"
            )
        filled, next_entry = extra["filled"], extra["next"]
        if embeddings.numel() == 0 and labels.numel() == 0:  # saved before its first batch
            if (filled, next_entry) != (0, 0):
                return (
                    f"the checkpoint's CrossBatchMemory state filled={filled}, next={next_entry} "
                    "does not fit its 0 stored entries"
                )
            return None
        if embeddings.dim() != 2 or embeddings.dtype not in SCORE_DTYPES or embeddings.shape[1] < 1:
            return (
                "the checkpoint's CrossBatchMemory embeddings must be 2-D floating point with at "
                f"least one column, got {embeddings.dtype} of shape {list(embeddings.shape)}"
            )
        if labels.dim() != 1 or not is_integer_tensor(labels):
            return (
                "the checkpoint's CrossBatchMemory labels must be 1-D integer, got "
                f"{labels.dtype} of shape {list(labels.shape)}"
            )
        if self.embeddings.numel() and embeddings.shape[1] != self.embeddings.shape[1]:
            return (
                f"the checkpoint's CrossBatchMemory holds embeddings of dimension "
                f"{embeddings.shape[1]}, this memory's entries have dimension "
                f"{self.embeddings.shape[1]}"
            )
        rows = embeddings.shape[0]
        if labels.shape[0] != rows:
            return (
                f"the checkpoint's CrossBatchMemory is inconsistent: its embeddings have {rows} "
                f"rows and its labels {labels.shape[0]}"
            )
        if rows != self.size:
            return (
                f"the checkpoint holds a CrossBatchMemory of size {rows}, this one has "
                f"size={self.size}: create it with size={rows}"
            )
        # Entries fill slots 0, 1, ... until the memory is full: until then next == filled.
        if not (0 <= filled <= rows and 0 <= next_entry < rows) or (
            filled < rows and next_entry != filled
        ):
            return (
                f"the checkpoint's CrossBatchMemory state filled={filled}, next={next_entry} does "
                f"not fit its {rows} stored entries"
            )
        if filled and "meta" in (embeddings.device.type, labels.device.type):
            return "the checkpoint's CrossBatchMemory entries are on the meta device: no values"
        if not bool(torch.isfinite(embeddings[:filled]).all()):
            return "the checkpoint's CrossBatchMemory embeddings contain NaN or infinity"
        return None

    def get_extra_state(self) -> dict:
        return {"filled": self.filled, "next": self.next}

    def set_extra_state(self, state: dict) -> None:
        # (Checked with the rest of the state in _load_from_state_dict.)
        self.filled, self.next = state["filled"], state["next"]

    def reset(self) -> None:
        """Forget every entry: the memory is as a new one, its buffers released (the next batch,
        or a checkpoint, sets their dtype, dimension and device, as the first one does)."""
        self.embeddings = self.embeddings.new_empty(0)
        self.labels = self.labels.new_empty(0)
        self.filled = 0
        self.next = 0

    def contents(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(embeddings [filled, D], labels [filled]) currently held, oldest first."""
        if self.filled < self.size:
            return self.embeddings[: self.filled], self.labels[: self.filled]
        order = (
            torch.arange(self.next, self.next + self.size, device=self.labels.device) % self.size
        )
        return self.embeddings[order], self.labels[order]

    def _check_dimension(self, embeddings: torch.Tensor) -> None:
        if embeddings.dim() != 2 or embeddings.shape[1:] != self.embeddings.shape[1:]:
            raise ValueError(
                f"fastap: embeddings must be 2-D with the dimension the memory holds "
                f"({self.embeddings.shape[1]}), got shape {list(embeddings.shape)}"
            )

    def _check_entries_hold_values(self, embeddings: torch.Tensor) -> None:
        """Entries moved to the meta device (by .to) hold no values for a batch that has them."""
        if self.filled and self.embeddings.device.type == "meta":
            if embeddings.device.type != "meta":
                raise ValueError(
                    f"{_OWNER}: the memory's entries are on the meta device, which holds no "
                    "values: reset() it, or load a checkpoint"
                )

    # (Eager under torch.compile: the ring's position, a Python int that every call moves, would
    # make each call a new graph, and the compile fail at its recompile limit.)
    @torch.compiler.disable
    @torch.no_grad()
    def enqueue(self, embeddings: torch.Tensor, labels: torch.Tensor) -> None:
        """Add detached copies of a batch, dropping the oldest entries beyond ``size``. (Under a
        torch.func transform, the values are stored; a batch batched by vmap is refused.)"""
        labels = check_batch(embeddings, labels, f"{_OWNER}.enqueue")
        if not torch._C._are_functorch_transforms_active():
            self._store(embeddings.detach(), labels)
            return
        # Under a transform: the values, stored at the base level (a transform refuses to mutate
        # the entries, which it did not create, and its wrappers must not outlive the call).
        embeddings, labels = values_of_one_batch(
            dict(embeddings=embeddings.detach(), labels=labels),
            _OWNER,
            "cannot be enqueued (the memory keeps one batch at a time): pass enqueue=False "
            "under vmap",
        )
        with temporarily_clear_interpreter_stack():
            self._store(embeddings, labels)

    def _store(self, embeddings: torch.Tensor, labels: torch.Tensor) -> None:
        """enqueue's work on a checked, detached batch."""
        memory_on_meta = self.embeddings.device.type == "meta"
        if embeddings.device.type == "meta" and not memory_on_meta:
            raise ValueError(
                f"{_OWNER}.enqueue: embeddings are on the meta device, which holds no values to "
                "remember"
            )
        self._check_entries_hold_values(embeddings)
        if self.embeddings.numel() == 0 or (memory_on_meta and self.filled == 0):
            self.embeddings = embeddings.new_empty(self.size, embeddings.shape[1])
            self.labels = labels.new_empty(self.size, dtype=torch.long)
        self._check_dimension(embeddings)
        embeddings, labels = embeddings[-self.size :], labels[-self.size :]
        slots = torch.arange(self.next, self.next + len(labels), device=labels.device) % self.size
        stored = unit_rows(embeddings).to(self.embeddings)
        self.embeddings[slots.to(self.embeddings.device)] = stored
        self.labels[slots.to(self.labels.device)] = labels.to(self.labels)
        self.next = (self.next + len(labels)) % self.size
        self.filled = min(self.size, self.filled + len(labels))

    @torch.compiler.disable
    def forward(
        self, embeddings: torch.Tensor, labels: torch.Tensor, enqueue: bool = True
    ) -> torch.Tensor:
        """The loss of the batch against itself and the memory; then, with ``enqueue``, the
        batch joins the memory (pass ``enqueue=False`` to evaluate without changing it)."""
        labels = check_batch(embeddings, labels, _OWNER)
        check_bool(enqueue, "enqueue", _OWNER)
        if self.embeddings.numel() > 0:
            self._check_dimension(embeddings)
        self._check_entries_hold_values(embeddings)
        stored, stored_labels = self.contents() if self.filled else (embeddings[:0], labels[:0])
        stored = stored.to(embeddings)
        database = torch.cat([embeddings, stored])
        database_labels = torch.cat([labels, stored_labels.to(labels.device)])
        # The batch comes first in the database: query i's own entry is candidate i.
        per_query, valid = self.loss.per_query_loss(
            embeddings, database, labels, database_labels, exclude_self=True, self_offset=0
        )
        # (A meta batch, which holds no values, is evaluated, for its shapes, but not enqueued.)
        if enqueue and (embeddings.device.type != "meta" or self.embeddings.device.type == "meta"):
            self.enqueue(embeddings, labels)
        return mean_over_valid(per_query, valid)
