"""Cross-batch memory: past descriptors as extra database entries for a fastap loss."""

from __future__ import annotations

import torch

from fastap._validation import check_bool, check_int
from fastap.losses import APLoss, _EmbeddingAPLoss, check_batch, mean_over_valid


class CrossBatchMemory(torch.nn.Module):
    """A first-in first-out memory of the last ``size`` descriptors and labels, used as extra
    database entries (Wang et al., "Cross-Batch Memory for Embedding Learning", CVPR 2020).

    ``loss = CrossBatchMemory(fastap.APLoss(), size=4096)(embeddings, labels)`` ranks each
    embedding of the batch against the batch itself (its own entry excluded) and the memory, with
    the given fastap embedding loss (its bins, range and variant), then enqueues the batch.
    Gradients flow into the current batch only: the memory holds detached copies, which is what
    makes it cheap (and what makes old entries slightly stale as the model moves).

    Memory: ``size`` x D descriptors (in the dtype and on the device of the first batch) and
    ``size`` int64 labels, allocated on the first call; a batch of B embeddings costs a
    B x (B + size) score matrix. A batch larger than ``size`` keeps only its last ``size`` rows.
    """

    def __init__(self, loss: _EmbeddingAPLoss | None = None, size: int = 4096):
        super().__init__()
        size = check_int(size, "size", 1, "fastap.CrossBatchMemory")
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
        # A checkpoint of a memory of another size cannot be taken in (its ring of entries does
        # not map onto this one's): load_state_dict raises with the reason.
        saved_rows = {
            name: state_dict[prefix + name].shape[0]
            for name in ("embeddings", "labels")
            if prefix + name in state_dict and state_dict[prefix + name].numel() > 0
        }
        if len(set(saved_rows.values())) > 1:
            error_msgs.append(
                f"fastap: the checkpoint's CrossBatchMemory is inconsistent: its embeddings have "
                f"{saved_rows['embeddings']} rows and its labels {saved_rows['labels']}"
            )
            return
        rows = next(iter(saved_rows.values()), self.size)
        if rows != self.size:
            error_msgs.append(
                f"fastap: the checkpoint holds a CrossBatchMemory of size {rows}, this one has "
                f"size={self.size}: create it with size={rows}"
            )
            return
        for name in ("embeddings", "labels"):
            saved = state_dict.get(prefix + name)
            if saved is not None:
                current = getattr(self, name)
                setattr(self, name, current.new_empty(saved.shape, dtype=saved.dtype))
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def get_extra_state(self) -> dict:
        return {"filled": self.filled, "next": self.next}

    def set_extra_state(self, state: dict) -> None:
        filled, next_entry = int(state["filled"]), int(state["next"])
        held = self.embeddings.shape[0]
        if not (0 <= filled <= held and 0 <= next_entry < max(held, 1)):
            raise ValueError(
                f"fastap: CrossBatchMemory state filled={filled}, next={next_entry} does not fit "
                f"its {held} stored entries"
            )
        self.filled, self.next = filled, next_entry

    def reset(self) -> None:
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

    @torch.no_grad()
    def enqueue(self, embeddings: torch.Tensor, labels: torch.Tensor) -> None:
        """Add detached copies of a batch, dropping the oldest entries beyond ``size``."""
        labels = check_batch(embeddings, labels, "fastap.CrossBatchMemory.enqueue")
        if self.embeddings.numel() == 0:
            self.embeddings = embeddings.new_empty(self.size, embeddings.shape[1])
            self.labels = labels.new_empty(self.size, dtype=torch.long)
        self._check_dimension(embeddings)
        embeddings, labels = embeddings[-self.size :], labels[-self.size :]
        slots = torch.arange(self.next, self.next + len(labels), device=labels.device) % self.size
        self.embeddings[slots.to(self.embeddings.device)] = embeddings.detach().to(self.embeddings)
        self.labels[slots.to(self.labels.device)] = labels.to(self.labels)
        self.next = (self.next + len(labels)) % self.size
        self.filled = min(self.size, self.filled + len(labels))

    def forward(
        self, embeddings: torch.Tensor, labels: torch.Tensor, enqueue: bool = True
    ) -> torch.Tensor:
        """The loss of the batch against itself and the memory; then, with ``enqueue``, the
        batch joins the memory (pass ``enqueue=False`` to evaluate without changing it)."""
        labels = check_batch(embeddings, labels, "fastap.CrossBatchMemory")
        check_bool(enqueue, "enqueue", "fastap.CrossBatchMemory")
        if self.embeddings.numel() > 0:
            self._check_dimension(embeddings)
        stored, stored_labels = self.contents()
        stored = stored.to(embeddings)
        database = torch.cat([embeddings, stored])
        database_labels = torch.cat([labels, stored_labels.to(labels.device)])
        # The batch comes first in the database: query i's own entry is candidate i.
        per_query, valid = self.loss.per_query_loss(
            embeddings, database, labels, database_labels, exclude_self=True, self_offset=0
        )
        if enqueue:
            self.enqueue(embeddings, labels)
        return mean_over_valid(per_query, valid)
