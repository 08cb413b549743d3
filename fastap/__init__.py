"""fastap: listwise Average Precision loss with fused C++/CUDA soft-binning kernels.

Public API:
    average_precision(scores, relevance=None, *, labels, ref_labels, num_bins, score_range,
                      ignore, exclude_self, self_offset, variant) -> [N] AP per query
    ap_loss(<same>, query_weights=None) -> scalar 1 - weighted mean AP (AP_Q by default)
    APLoss(num_bins=20, score_range=(-1, 1), variant="ap_q"): nn.Module on embeddings, called
        like pytorch-metric-learning losses; FastAPLoss(num_bins=10): FastAP, likewise
    fastap.compat: APLoss / TAPLoss with the authors' call signature
    fastap.reference: the same math in plain PyTorch (oracle and baseline)
    ap_loss_from_embeddings(queries, database=None, *, labels, ...): the loss from embeddings,
        block by block or in the fused CUDA kernel, without the N x M score matrix
    fastap.train.multistage_backward: batches larger than fit through the model at once
    fastap.distributed.DistributedAPLoss, fastap.memory.CrossBatchMemory: larger databases
    fastap.metrics: exact mAP, recall@k, mAP@R and the revisited Oxford/Paris protocol
    fastap.cosine: the cosine scores of embeddings that all of the above compute (unit_rows)
    set_value_checks(mode): turn the eager checks of input values (and their host sync) off or on
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from fastap import compat, cosine, metrics, reference, train
from fastap._validation import VARIANTS, set_value_checks
from fastap.embeddings import ap_loss_from_embeddings
from fastap.functional import ap_loss, average_precision
from fastap.losses import APLoss, FastAPLoss

if TYPE_CHECKING:
    from fastap import distributed, memory

# Imported at their first use, as ``fastap.memory`` (or ``from fastap.memory import ...``):
# their torch.compiler.disable imports torch._dynamo, which took over a second, half of
# ``import fastap``, in every process that never uses them (DataLoader workers started by
# "spawn", scripts, tests' subprocesses).
_ON_FIRST_USE = ("distributed", "memory")


def __getattr__(name: str):
    if name in _ON_FIRST_USE:
        return importlib.import_module(f"fastap.{name}")
    raise AttributeError(f"module 'fastap' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_ON_FIRST_USE))


__all__ = [
    "VARIANTS",
    "APLoss",
    "FastAPLoss",
    "ap_loss",
    "ap_loss_from_embeddings",
    "average_precision",
    "compat",
    "cosine",
    "distributed",
    "memory",
    "metrics",
    "reference",
    "set_value_checks",
    "train",
]
__version__ = "0.1.0"
