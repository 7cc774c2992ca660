"""A tiny byte-level GPT written as pure functions of a parameter dict, for ``torch.func``.

``init_params`` builds a ``dict[str, Tensor]``; ``forward(params, tokens)`` is a
pure function of it, so ``torch.func.grad(loss)(params, ...)`` differentiates
the whole model with no ``nn.Module`` in sight. Passing ``depth`` (one integer
per token) runs the layer stack through :func:`cggr_fn.route_depth`: token ``t``
then trains only the top ``depth[t]`` blocks, while the outputs stay exactly
those of the plain model.

The architecture is the usual pre-norm decoder: learned positions, causal
multi-head self-attention through ``F.scaled_dot_product_attention``, a GELU
MLP, a final LayerNorm, and an LM head tied to the token embedding.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import cggr_fn

Params = dict[str, torch.Tensor]


@dataclass(frozen=True)
class GPTConfig:
    """Shape of the model. The defaults train in about a minute on two CPU cores."""

    vocab_size: int = 256  # bytes
    max_seq_len: int = 128
    dim: int = 128
    num_layers: int = 4
    num_heads: int = 4
    mlp_ratio: int = 4


def init_params(config: GPTConfig, generator: torch.Generator) -> Params:
    """GPT-2 style initialisation: N(0, 0.02), residual outputs scaled by 1/sqrt(2 L).

    The attention projection is stored as ``(3, heads, head_dim, dim)`` so that
    :func:`forward` can read the head count off the parameters and needs no config.
    """
    d, heads, layers = config.dim, config.num_heads, config.num_layers
    if d % heads:
        raise ValueError(f"dim={d} is not divisible by num_heads={heads}")

    def normal(*shape: int, std: float = 0.02) -> torch.Tensor:
        return torch.randn(*shape, generator=generator) * std

    residual_std = 0.02 / math.sqrt(2 * layers)
    params: Params = {"embed": normal(config.vocab_size, d), "pos": normal(config.max_seq_len, d)}
    for i in range(layers):
        p = f"blocks.{i}."
        params |= {
            p + "norm1.weight": torch.ones(d), p + "norm1.bias": torch.zeros(d),
            p + "attn.qkv": normal(3, heads, d // heads, d), p + "attn.qkv_bias": torch.zeros(3, heads, 1, d // heads),
            p + "attn.out": normal(d, d, std=residual_std), p + "attn.out_bias": torch.zeros(d),
            p + "norm2.weight": torch.ones(d), p + "norm2.bias": torch.zeros(d),
            p + "mlp.up": normal(config.mlp_ratio * d, d), p + "mlp.up_bias": torch.zeros(config.mlp_ratio * d),
            p + "mlp.down": normal(d, config.mlp_ratio * d, std=residual_std), p + "mlp.down_bias": torch.zeros(d),
        }  # fmt: skip
    params |= {"norm_f.weight": torch.ones(d), "norm_f.bias": torch.zeros(d)}
    return params


def num_layers(params: Params) -> int:
    """How many blocks ``params`` holds."""
    return sum(1 for name in params if name.endswith(".attn.qkv"))


def block(p: Params, x: torch.Tensor) -> torch.Tensor:
    """One pre-norm decoder block on ``x`` of shape ``(batch, seq, dim)``; ``p`` holds its own weights."""
    batch, seq, dim = x.shape
    h = F.layer_norm(x, (dim,), p["norm1.weight"], p["norm1.bias"])
    # (batch, seq, dim) x (3, heads, head_dim, dim) -> q, k, v of (batch, heads, seq, head_dim).
    q, k, v = torch.einsum("bsd,thed->tbhse", h, p["attn.qkv"]) + p["attn.qkv_bias"].unsqueeze(1)
    attn = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    x = x + F.linear(attn.transpose(1, 2).reshape(batch, seq, dim), p["attn.out"], p["attn.out_bias"])
    h = F.layer_norm(x, (dim,), p["norm2.weight"], p["norm2.bias"])
    h = F.gelu(F.linear(h, p["mlp.up"], p["mlp.up_bias"]), approximate="tanh")
    return x + F.linear(h, p["mlp.down"], p["mlp.down_bias"])


def block_params(params: Params, index: int) -> Params:
    """The slice of ``params`` that block ``index`` owns, with the prefix stripped."""
    prefix = f"blocks.{index}."
    return {name[len(prefix) :]: value for name, value in params.items() if name.startswith(prefix)}


def forward(params: Params, tokens: torch.Tensor, *, depth: torch.Tensor | None = None) -> torch.Tensor:
    """Logits of shape ``(batch, seq, vocab)`` for integer ``tokens`` of shape ``(batch, seq)``.

    Args:
      params: from :func:`init_params` (or any dict of the same structure).
      tokens: byte values, ``seq <= max_seq_len``.
      depth: optional integer tensor of ``tokens.shape`` with values in
        ``[0, num_layers]``: how many of the top blocks each token trains.
        ``None`` trains every block on every token (standard training).
        The logits are the same either way; only the backward pass changes.
    """
    seq = tokens.shape[-1]
    x = params["embed"][tokens] + params["pos"][:seq]
    # Each layer is a closure over its own weights: route_depth sees plain
    # functions hidden -> hidden and gates the hidden state between them.
    layers = [functools.partial(block, block_params(params, i)) for i in range(num_layers(params))]
    if depth is None:
        for layer in layers:
            x = layer(x)
    else:
        x = cggr_fn.route_depth(layers, depth)(x)
    x = F.layer_norm(x, (x.shape[-1],), params["norm_f.weight"], params["norm_f.bias"])
    return x @ params["embed"].T  # tied LM head
