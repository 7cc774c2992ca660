"""Hugging Face ``transformers`` integration: CGGR on a model's own parameters, without model surgery.

Everything here runs the model's own ``forward`` through
:func:`torch.func.functional_call` on *views* of the model (new module objects
over the model's tensors), so the model is never modified and no weight is
copied:

* :func:`detect_parts` / :class:`ModelParts`: where the layer stack and the
  other pieces are, for the supported families or given explicitly.
* :func:`truncated_router`: scoring logits from the first K layers.
* :func:`depth_routed_forward`: the whole model with per-token gradient depth,
  gated in place or compacted (``capacity=``).
* :func:`cggr_loss`: the whole CGGR loss (scores, selection, compacted routed
  forward, loss) as one pure function of ``(params, input_ids, step)``.
* The seed's wrappers as pure functions: :func:`hardest_sequence_loss`
  (``CGGRModel``), :func:`routing_mask` (``CGGRScorer``),
  :func:`selective_lm_loss` (``CGGRLoss``), and their building blocks.
"""

from cggr_fn.models._detect import ModelParts, detect_parts
from cggr_fn.models._routed_forward import DepthRoutedForward, depth_routed_forward
from cggr_fn.models._router import TruncatedRouter, truncated_router
from cggr_fn.models._step import CGGRLoss, Routing, cggr_loss
from cggr_fn.models._wrappers import (
    ScoredMask,
    hardest_sequence_loss,
    hardest_sequences,
    lm_loss,
    lm_targets,
    routing_mask,
    selective_lm_loss,
    sequence_scores,
    take_sequences,
    token_scores,
)

__all__ = [
    "CGGRLoss",
    "DepthRoutedForward",
    "ModelParts",
    "Routing",
    "ScoredMask",
    "TruncatedRouter",
    "cggr_loss",
    "depth_routed_forward",
    "detect_parts",
    "hardest_sequence_loss",
    "hardest_sequences",
    "lm_loss",
    "lm_targets",
    "routing_mask",
    "selective_lm_loss",
    "sequence_scores",
    "take_sequences",
    "token_scores",
    "truncated_router",
]
