"""The whole CGGR training loss as one pure function: scores -> selection -> compacted routed forward -> loss."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import nn

from cggr_fn import _checks
from cggr_fn._bucketing import bucket_capacity, bucket_depth, tier_depths
from cggr_fn._compaction import partition, to_partition_order
from cggr_fn._curriculum import Step
from cggr_fn._distributed import Group, check_group, check_unsharded, global_select, rank_capacity, rank_index, rescale
from cggr_fn._head import fused_linear_token_stats, fused_selective_loss
from cggr_fn._loss import selective_loss
from cggr_fn._ranking import capacity
from cggr_fn._reference import excess, trim
from cggr_fn._scoring import ScoreMethod, resolve_method, scores_from_stats
from cggr_fn._selection import _position_hash, priority_sample, select
from cggr_fn.models._common import check_model, select_tensors, tensor_names
from cggr_fn.models._detect import ModelParts, resolve_parts
from cggr_fn.models._routed_forward import DepthRoutedForward, depth_routed_forward
from cggr_fn.models._router import TruncatedRouter, truncated_router
from cggr_fn.models._wrappers import lm_targets

SELECTIONS = ("topk", "priority", "random", "buckets")
SCOPES = (None, "rank", "global")
# Config fields of models whose logits are more than ``head(final hidden)``.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "output_multiplier_scale", "logits_scaling")


class Routing(NamedTuple):
    """What a :class:`CGGRLoss` call routed (constants, for logging and tests).

    Attributes:
      depth: int64 ``(batch, seq)`` gradient depth of every token (layers it trains).
      scores: float ``(batch, seq)`` scores the selection ranked (``-inf`` = no target).
      weights: float ``(batch, seq)`` weight of every token in the loss's sum
        (0 = not in the loss; importance weights for ``"priority"``).
    """

    depth: torch.Tensor
    scores: torch.Tensor
    weights: torch.Tensor


class CGGRLoss:
    """A pure loss ``loss_fn(params, input_ids, step, *, labels=None, attention_mask=None, reference=None) -> (loss, Routing)``.

    See :func:`cggr_loss`. Attributes mirror its arguments; ``forward`` is the
    :class:`DepthRoutedForward` and ``router`` the :class:`TruncatedRouter`
    (``None`` for ``"random"``) it calls.
    """

    def __init__(self, model: nn.Module, *, selection: str, ratio: float, router_layers: int, method: ScoreMethod,
                 num_buckets: int, warmup_steps: int, capacity_step: int | None, trim: float, fused_head: bool,
                 route_attention: bool, parts: ModelParts | None, scope: str | None = None,
                 capacity_factor: float = 2.0,
                 group: Group = None) -> None:
        check_model(model)
        check_unsharded(model)
        if selection not in SELECTIONS:
            raise ValueError(f"selection: expected one of {SELECTIONS}, got {selection!r}")
        _checks.check_fraction(ratio, "ratio", low_open=True)
        _checks.check_fraction(trim, "trim")
        if selection == "random" and trim:
            raise ValueError(f"trim: random selection has no scores to trim, got trim={trim}")
        _checks.check_int(num_buckets, "num_buckets", minimum=1)
        _checks.check_int(warmup_steps, "warmup_steps", minimum=0)
        if capacity_step is not None:
            _checks.check_int(capacity_step, "capacity_step", minimum=0)
        if scope not in SCOPES:
            raise ValueError(f"scope: expected one of {SCOPES}, got {scope!r}")
        if scope == "global" and selection != "topk":
            raise ValueError(f"scope: global selection ranks every rank's scores together, which selection='topk' "
                             f"does; selection={selection!r} selects per rank (scope='rank')")
        _checks.check_real(capacity_factor, "capacity_factor", minimum=1.0)
        check_group(group)
        if group is not None and scope is None:
            raise ValueError("group: a loss with scope=None runs no collective; pass scope='rank' or 'global'")
        for field in _LOGIT_TRANSFORMS:
            value = getattr(getattr(model, "config", None), field, None)
            if value not in (None, 1, 1.0):
                raise ValueError(f"model: its logits are transformed after the head ({field}={value}); "
                                 "cggr_loss computes the head itself and supports plain linear heads only")
        self.selection = selection
        self.scope = scope
        self.capacity_factor = float(capacity_factor)
        self.group = group
        self.ratio = float(ratio)
        self.trim = float(trim)
        if not isinstance(fused_head, bool):
            raise TypeError(f"fused_head: expected a bool, got {type(fused_head).__name__}")
        self.fused_head = fused_head
        self.method = method
        self.num_buckets = num_buckets
        self.warmup_steps = warmup_steps
        self.capacity_step = warmup_steps if capacity_step is None else capacity_step
        self.forward: DepthRoutedForward = depth_routed_forward(model, parts=parts, route_attention=route_attention)
        self.num_layers = self.forward.num_layers
        _checks.check_int(router_layers, "router_layers", minimum=1)
        if router_layers > self.num_layers:
            raise ValueError(f"router_layers: expected at most the model's {self.num_layers} layers, got {router_layers}")
        self.router: TruncatedRouter | None = (
            None if selection == "random" else truncated_router(model, num_layers=router_layers, parts=parts)
        )
        self._base, self._head = _base_and_head(model, resolve_parts(model, parts))
        self._head_names = _aliases(model, self._head)
        self._router_names = (
            frozenset() if self.router is None else tensor_names(self.router.module.get_submodule(self._base))
        )

    def __call__(self, params: dict[str, torch.Tensor], input_ids: torch.Tensor, step: Step, *,
                 labels: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                 reference: torch.Tensor | None = None) -> tuple[torch.Tensor, Routing]:
        """The routed loss and what was routed; see :func:`cggr_loss`."""
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            raise ValueError(f"input_ids: expected a (batch, seq) tensor, got {getattr(input_ids, 'shape', type(input_ids).__name__)}")
        if reference is not None and self.router is None:
            raise ValueError("reference: random selection has no scores to compare with a reference; pass reference=None")
        labels = input_ids if labels is None else labels
        kwargs: dict[str, Any] = {"input_ids": input_ids}
        if attention_mask is not None:
            kwargs["attention_mask"] = attention_mask
        targets = lm_targets(labels, attention_mask=attention_mask)
        base_params = self._strip_base(params)
        scores = self._scores(params, base_params, kwargs, targets, step, reference)
        n = input_ids.numel()
        base = self.forward.module.get_submodule(self._base)
        flat_targets = targets.reshape(n)
        labelled = flat_targets != -100
        if self.selection == "buckets":
            depth = bucket_depth(scores, step, num_layers=self.num_layers, num_buckets=self.num_buckets,
                                 warmup_steps=self.warmup_steps)
            layer_capacity = bucket_capacity(n, self.capacity_step, num_layers=self.num_layers,
                                             num_buckets=self.num_buckets, warmup_steps=self.warmup_steps)
            hidden = self.forward.call_module(base, base_params, depth, (), kwargs, capacity=layer_capacity,
                                              levels=tier_depths(self.num_layers, self.num_buckets))[0]
            # Every labelled token trains the head: the mean over them is the model's own loss.
            loss = self._head_loss(params, hidden.reshape(n, hidden.shape[-1]), flat_targets, labelled, None, "selected")
            return self._across(loss, labelled.sum()), Routing(depth, scores, labelled.reshape(targets.shape).to(scores.dtype))
        if self.selection == "priority":
            # Importance must be >= 0; -inf (no target) stays unsampleable.
            importance = torch.where(torch.isneginf(scores), scores, scores.clamp_min(0.0))
            mask, weights = priority_sample(importance, ratio=self.ratio, seed=step)
        elif self.scope == "global":
            mask = global_select(scores, ratio=self.ratio, capacity_factor=self.capacity_factor, group=self.group)
            weights = mask.to(scores.dtype)
        else:
            mask = select(scores, ratio=self.ratio)
            weights = mask.to(scores.dtype)
        depth = torch.where(mask, self.num_layers, 0)
        k = (capacity(n, ratio=self.ratio) if self.scope != "global" else
             rank_capacity(n, ratio=self.ratio, capacity_factor=self.capacity_factor, group=self.group))
        hidden = self.forward.call_module(base, base_params, depth, (), kwargs, capacity=k,
                                          levels=(0, self.num_layers))[0]
        # Only the selected tokens reach the head: its forward and backward run on k rows.
        part = partition(mask, k)
        rows = to_partition_order(hidden.reshape(n, hidden.shape[-1]), part)[:k]
        routed_targets = flat_targets.index_select(0, part.routed)
        if self.selection != "priority":
            loss = self._head_loss(params, rows, routed_targets, part.keep, None, "selected")
            return self._across(loss, (part.keep & (routed_targets != -100)).sum()), Routing(depth, scores, weights)
        # The unbiased estimate of the dense mean: sum(w * nll) over the sample / all labelled tokens
        # ("valid" divides by the labelled slots only; the factor makes it all labelled tokens).
        loss = self._head_loss(params, rows, routed_targets, part.keep, weights.reshape(n).index_select(0, part.routed),
                               "valid")
        share = labelled.index_select(0, part.routed).sum().to(loss.dtype) / labelled.sum().clamp_min(1).to(loss.dtype)
        return self._across(loss * share, labelled.sum()), Routing(depth, scores, weights)

    def _across(self, loss: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
        """A loss divided by this rank's ``count`` as its share of the global mean (``scope`` set)."""
        return loss if self.scope is None else rescale(loss, count, self.group)

    def _head_loss(self, params: dict[str, torch.Tensor], rows: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor,
                   weights: torch.Tensor | None, normalize: str) -> torch.Tensor:
        """:func:`cggr_fn.selective_loss` of the head's logits of ``rows``; fused: no logits stored."""
        weight, bias = self._head_tensors(params)
        if self.fused_head:
            return fused_selective_loss(rows, weight, targets, mask, weights=weights, bias=bias, normalize=normalize)
        logits = nn.functional.linear(rows, weight, bias)
        return selective_loss(logits, targets, mask, weights=weights, normalize=normalize)

    def _scores(self, params: dict[str, torch.Tensor], base_params: dict[str, torch.Tensor], kwargs: dict[str, Any],
                targets: torch.Tensor, step: Step, reference: torch.Tensor | None) -> torch.Tensor:
        if self.router is None:
            # Uniform draws from a hash of (position, step): pure, the same on every device.
            # Under data parallelism a rank hashes its tokens' global positions
            # (rank-major), so ranks draw independently.
            n = targets.numel()
            offset = rank_index(self.group) * n if self.scope is not None else 0
            draws = _position_hash(n, step, targets.device, offset).reshape(targets.shape).float()
            return torch.where(targets != -100, draws, float("-inf"))
        base = self.router.module.get_submodule(self._base)
        with torch.no_grad():
            hidden = torch.func.functional_call(base, select_tensors(base_params, self._router_names), (),
                                                {**self.router._defaults, **kwargs})[0]
            weight, bias = self._head_tensors(params)
            # Statistics straight from the final hidden states: the router's
            # logits are never materialised (one chunk at a time).
            stats = fused_linear_token_stats(hidden, weight.detach(), targets,
                                             bias=None if bias is None else bias.detach())
        scores = scores_from_stats(stats, targets, resolve_method(self.method, targets), -100)
        if reference is not None:
            scores = excess(scores, reference)
        return trim(scores, self.trim) if self.trim else scores

    def _strip_base(self, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        prefix = self._base + "."
        return {name[len(prefix):]: value for name, value in params.items() if name.startswith(prefix)}

    def _head_tensors(self, params: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        weight = next((params[name] for name in self._head_names["weight"] if name in params), None)
        if weight is None:
            raise KeyError(f"params: no entry for the head's weight (any of {self._head_names['weight']})")
        bias_names = self._head_names.get("bias", [])
        bias = next((params[name] for name in bias_names if name in params), None)
        return weight, bias

    def __repr__(self) -> str:
        return (f"CGGRLoss({type(self.forward.module).__name__}, selection={self.selection!r}, ratio={self.ratio}, "
                f"num_layers={self.num_layers})")


def _base_and_head(model: nn.Module, parts: ModelParts) -> tuple[str, str]:
    base = getattr(model, "base_model_prefix", "")
    if not base or not parts.layers.startswith(base + ".") or parts.head is None:
        raise ValueError(f"model: cggr_loss needs a causal LM with a base model (base_model_prefix) holding the "
                         f"layers and a head; got base {base!r}, layers {parts.layers!r}, head {parts.head!r}")
    head = model.get_submodule(parts.head)
    if type(head) is not nn.Linear:
        raise ValueError(f"model: cggr_loss computes the head as a linear map; {parts.head} is a {type(head).__name__}")
    return base, parts.head


def _aliases(model: nn.Module, head: str) -> dict[str, list[str]]:
    """Every name (tied ones included) under which the head's tensors appear in ``model.named_parameters()``."""
    module = model.get_submodule(head)
    names: dict[str, list[str]] = {}
    for attribute in ("weight", "bias"):
        tensor = getattr(module, attribute, None)
        if tensor is not None:
            names[attribute] = [name for name, p in model.named_parameters(remove_duplicate=False) if p is tensor]
    return names


def cggr_loss(
    model: nn.Module,
    *,
    selection: str = "topk",
    ratio: float = 0.25,
    router_layers: int = 2,
    method: ScoreMethod = "combined",
    num_buckets: int = 4,
    warmup_steps: int = 0,
    capacity_step: int | None = None,
    trim: float = 0.0,
    fused_head: bool = False,
    route_attention: bool = False,
    parts: ModelParts | None = None,
    scope: str | None = None,
    capacity_factor: float = 2.0,
    group: Group = None,
) -> CGGRLoss:
    """The CGGR language-model loss of a causal LM as one pure, compacted function.

    ``loss_fn(params, input_ids, step, *, labels=None, attention_mask=None,
    reference=None)`` returns ``(loss, routing)``;
    ``torch.func.grad_and_value(loss_fn, has_aux=True)`` is the training step
    (or ``loss.backward()``). Each call:

    1. scores every token (next-token aligned, padding and the last position
       excluded): a :func:`truncated_router` of ``router_layers`` layers
       (``router_layers`` = all layers scores with the model itself) and
       :func:`cggr_fn.score` by ``method``, computed from the router's final
       hidden states by :func:`cggr_fn.fused_linear_token_stats` (its logits
       are never materialised); minus ``reference`` when given
       (:func:`cggr_fn.excess`: per-token scores of a reference model on the
       same batch, e.g. ``token_scores(reference_logits, labels,
       method="loss")`` with ``method="loss"``: the excess loss of Rho-1);
       the hardest ``trim`` share dropped (:func:`cggr_fn.trim`). For
       ``"random"``: uniform draws from a hash of (position, ``step``), the
       compute-matched control;
    2. selects: ``"topk"``/``"random"`` keep ``k = capacity(tokens,
       ratio=ratio)`` tokens (:func:`cggr_fn.select`) that train every
       layer, the rest train none, and the loss is their mean;
       ``"priority"`` samples ``k`` tokens with probability increasing in the
       score (:func:`cggr_fn.priority_sample`, seeded by ``step``; scores
       below 0 count as 0) and the loss is the unbiased importance-weighted
       estimate of the dense mean (``sum(w * nll)`` over the sample divided
       by the number of labelled tokens); ``"buckets"`` gives every token a
       depth (:func:`cggr_fn.bucket_depth` at ``step``) and the loss is
       :func:`lm_loss` over all tokens;
    3. runs the model through :func:`depth_routed_forward` compacted: in each
       layer, the token-wise parts run under autograd only for the tokens
       that train it; except for ``"buckets"`` the head and the loss run on
       the ``k`` selected tokens only.

    Shapes are static and nothing synchronises with the host, so the loss
    compiles with ``torch.compile(fullgraph=True)`` and a step can be captured
    in a CUDA graph. Capacities are static: for ``"buckets"`` they are those
    of ``capacity_step`` (default: ``warmup_steps``, the final partition), and
    hold for every step at or after it; a step before it routes more tokens
    than fit (:func:`cggr_fn.checking` raises), so during warmup build a loss
    with an earlier ``capacity_step``.

    FLOP model (per token; ``P`` = a layer's linear parameters, ``A`` = its
    attention FLOPs forward, ``L`` layers, ``H`` = head parameters, ``K`` =
    ``router_layers``, ``r`` = the share of tokens a layer trains):
    dense is ``L (6P + 3.5A) + 6H``; routed is ``K (2P + A) + 2H`` (router)
    ``+ L (2P + A + 4 r P + 2.5A) + 6 r H`` (head on the selected tokens;
    ``6H`` for ``"buckets"``): attention's backward runs over every query
    (``2.5A``). With ``route_attention=True`` attention runs forward over
    every query without autograd, then forward and backward over the routed
    queries again: ``3.5 r A`` instead of ``2.5A`` (where it can: not with
    attention dropout, under ``torch.func`` on the GPU, or for
    implementations other than ``"sdpa"`` and ``"eager"``).

    Data parallelism (DistributedDataParallel, FSDP2; the module to wrap is
    :func:`cggr_fn.distributed.loss_module`): with ``scope="rank"`` every rank
    selects from its own tokens as above (equal, fixed work on every rank);
    with ``scope="global"`` (``"topk"`` only) the ``k`` hardest of all ranks'
    tokens together are selected (:func:`cggr_fn.distributed.global_select`:
    exact, each rank within a fixed capacity of ``capacity_factor`` times its
    share). Either way the loss is the rank's share of the *global* mean
    (:func:`cggr_fn.distributed.global_mean`: the count it divides by is
    summed over ranks, times the world size), so the gradients DDP and FSDP2
    average are those of one process over the concatenated batch with the
    same selection. A rank's loss value is not a mean; average it over
    ranks to log it. Without an initialised process group, or with one
    process, both scopes equal ``scope=None``.

    Args:
      model: a causal LM whose logits are ``head(final hidden)`` with a linear
        head (Llama, Mistral, Qwen2, GPT-2, ...).
      selection: ``"topk"``, ``"priority"``, ``"random"`` or ``"buckets"``.
      ratio: share of tokens trained, in ``(0, 1]`` (``"topk"``, ``"random"``).
      router_layers: layers of the scoring router, >= 1.
      method: a :func:`cggr_fn.score` method.
      num_buckets, warmup_steps: the curriculum of ``"buckets"``.
      capacity_step: the first step the ``"buckets"`` capacities hold for.
      trim: share of the hardest scored tokens never selected, in ``[0, 1]``.
      fused_head: compute the head and its loss with
        :func:`cggr_fn.fused_selective_loss` (no logits stored; gradients
        formed chunk by chunk in the forward) instead of the head's logits
        and :func:`cggr_fn.selective_loss`. The same loss and gradients.
      route_attention: run attention's backward over the routed queries
        only (see the FLOP model; the same loss and gradients). Off by
        default: on an H200 its FlexAttention kernels are slower today
        than the whole attention they replace (see the README).
      parts: where the model's pieces are; detected if ``None``.
      scope: data parallelism (see below): ``None`` (one process, no
        collective), ``"rank"`` or ``"global"``.
      capacity_factor: with ``scope="global"``, a rank's fixed capacity as a
        multiple of its even share of the selected tokens, a float >= 1
        (:func:`cggr_fn.distributed.global_select`).
      group: the data-parallel process group for ``scope``; ``None``: the
        default group.

    Returns:
      A :class:`CGGRLoss`.

    Example:
      >>> import torch, transformers
      >>> from cggr_fn.models import cggr_loss
      >>> config = transformers.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
      ...                                   num_hidden_layers=2, num_attention_heads=2)
      >>> model = transformers.LlamaForCausalLM(config)
      >>> loss_fn = cggr_loss(model, selection="topk", ratio=0.25, router_layers=1)
      >>> params = {k: v.detach() for k, v in model.named_parameters()}
      >>> ids = torch.randint(0, 32, (2, 8))
      >>> grads, (loss, routing) = torch.func.grad_and_value(loss_fn, has_aux=True)(params, ids, 0)
      >>> int((routing.depth > 0).sum())  # 4 of the 16 tokens trained
      4
    """
    return CGGRLoss(model, selection=selection, ratio=ratio, router_layers=router_layers, method=method,
                    num_buckets=num_buckets, warmup_steps=warmup_steps, capacity_step=capacity_step, trim=trim,
                    fused_head=fused_head, route_attention=route_attention, parts=parts, scope=scope,
                    capacity_factor=capacity_factor, group=group)
