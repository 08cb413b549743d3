"""fastap: listwise Average Precision loss with fused C++/CUDA soft-binning kernels.

Public API:
    average_precision(scores, relevance=None, *, labels, ref_labels, num_bins, score_range,
                      ignore, exclude_self) -> [N] AP_Q per query
    ap_loss(<same>, query_weights=None) -> scalar 1 - weighted mAP_Q
    APLoss(num_bins=20, score_range=(-1, 1)): nn.Module on embeddings, called like PML losses
    fastap.reference: the same math in plain PyTorch (oracle and baseline)
"""

from fastap import reference
from fastap.functional import ap_loss, average_precision
from fastap.losses import APLoss

__all__ = ["APLoss", "ap_loss", "average_precision", "reference"]
__version__ = "0.1.0"
