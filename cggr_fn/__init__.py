"""cggr_fn: Confidence-Gated Gradient Routing as pure, composable torch.func transforms.

Score every token's difficulty from logits, sort tokens into depth buckets under
an explicit curriculum step, select fixed-size token sets, and route gradients so
easy tokens train only the top of the network while hard tokens train all of it.
"""

from importlib import metadata as _metadata

from cggr_fn._bucketing import bucket, bucket_capacity, bucket_depth, bucket_sizes
from cggr_fn._checks import checking
from cggr_fn._curriculum import dynamic_ratio, ratio_schedule
from cggr_fn._head import HeadLoss, fused_head_loss, fused_linear_token_stats, fused_selective_loss
from cggr_fn._loss import selective_loss
from cggr_fn._ranking import capacity
from cggr_fn._reference import Ema, EmaState, ema, excess, trim
from cggr_fn._routing import depth_masks, route_depth, route_grad
from cggr_fn._scoring import score
from cggr_fn._selection import Sample, priority_sample, select
from cggr_fn._stats import TokenStats, token_stats

try:
    __version__ = _metadata.version("cggr-fn")
except _metadata.PackageNotFoundError:
    # Imported from a source tree that was never installed: no metadata names
    # this copy's version, so say so (a PEP 440 version below every release)
    # rather than guess one.
    __version__ = "0+unknown"

__all__ = [
    "Ema",
    "EmaState",
    "HeadLoss",
    "Sample",
    "TokenStats",
    "bucket",
    "bucket_capacity",
    "bucket_depth",
    "bucket_sizes",
    "capacity",
    "checking",
    "depth_masks",
    "dynamic_ratio",
    "ema",
    "excess",
    "fused_head_loss",
    "fused_linear_token_stats",
    "fused_selective_loss",
    "priority_sample",
    "ratio_schedule",
    "route_depth",
    "route_grad",
    "score",
    "select",
    "selective_loss",
    "token_stats",
    "trim",
]
