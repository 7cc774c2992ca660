"""Architecture detection: where a model keeps its embedding, layer stack, final norm, positions and head."""

from __future__ import annotations

from typing import NamedTuple

from torch import nn


class ModelParts(NamedTuple):
    """Dotted paths (as in ``model.get_submodule``) of a model's pieces, from its root.

    Only ``layers`` is required: routing and truncation act on the layer stack
    and run the rest of the model through its own ``forward``. The other fields
    say where the pieces are, for code that needs them (``None`` = absent or
    not a module).

    Attributes:
      layers: the stack of layers, an ``nn.ModuleList`` or ``nn.Sequential``
        run bottom first, each layer mapping the hidden state (its first
        argument) to the next one (its output, or its output's first element).
      embedding: the module that turns input ids into the stack's input.
      final_norm: the norm between the last layer and the head.
      positions: the rotary or learned position embedding module.
      head: the module that turns final hidden states into logits.
    """

    layers: str
    embedding: str | None = None
    final_norm: str | None = None
    positions: str | None = None
    head: str | None = None


class _Layout(NamedTuple):
    families: str
    embedding: str
    layers: str
    final_norm: str | None
    positions: str | None


# Matched in order on (embedding, layers) inside the base model; final_norm and
# positions are reported when present. Structural rather than by config name, so
# close relatives of a family (same attribute layout) are found too.
_LAYOUTS = (
    _Layout("Llama, Mistral, Qwen2, Gemma, Phi-3", "embed_tokens", "layers", "norm", "rotary_emb"),
    _Layout("GPT-2, GPT-J", "wte", "h", "ln_f", "wpe"),
    _Layout("Falcon", "word_embeddings", "h", "ln_f", "rotary_emb"),
    _Layout("GPT-NeoX", "embed_in", "layers", "final_layer_norm", "rotary_emb"),
    _Layout("BERT, RoBERTa", "embeddings", "encoder.layer", None, "embeddings.position_embeddings"),
    _Layout("Mamba", "embeddings", "layers", "norm_f", None),
)
_HEADS = ("lm_head", "embed_out", "cls")
_STACK_TYPES = (nn.ModuleList, nn.Sequential)


def detect_parts(model: nn.Module) -> ModelParts:
    """Find the pieces of a Hugging Face model of a known family.

    Known layouts: Llama, Mistral, Qwen2, Gemma, Phi-3 (``model.layers``);
    GPT-2, GPT-J, Falcon (``transformer.h``); GPT-NeoX (``gpt_neox.layers``);
    BERT, RoBERTa (``bert.encoder.layer``); Mamba (``backbone.layers``). Both
    the bare base model and a model with a head (``...ForCausalLM``,
    ``...ForMaskedLM``) are recognised.

    Args:
      model: an ``nn.Module``.

    Returns:
      A :class:`ModelParts` of dotted paths from ``model``.

    Raises:
      ValueError: no known layout matches. There is no fallback: pass
        ``parts=ModelParts(layers="...")`` to the function that needs them.

    Example:
      >>> import torch
      >>> from cggr_fn.models import detect_parts
      >>> class Tiny(torch.nn.Module):
      ...     def __init__(self):
      ...         super().__init__()
      ...         self.wte, self.h = torch.nn.Embedding(8, 4), torch.nn.ModuleList([torch.nn.Linear(4, 4)])
      ...         self.ln_f, self.lm_head = torch.nn.LayerNorm(4), torch.nn.Linear(4, 8)
      >>> detect_parts(Tiny())
      ModelParts(layers='h', embedding='wte', final_norm='ln_f', positions=None, head='lm_head')
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    for base in _base_prefixes(model):
        for layout in _LAYOUTS:
            embedding, layers = base + layout.embedding, base + layout.layers
            if _find(model, embedding) is None or not isinstance(_find(model, layers), _STACK_TYPES):
                continue
            return ModelParts(
                layers=layers,
                embedding=embedding,
                final_norm=_present(model, base, layout.final_norm),
                positions=_present(model, base, layout.positions),
                head=next((head for head in _HEADS if _find(model, head) is not None), None),
            )
    raise ValueError(
        f"model: cannot find the layer stack of a {type(model).__name__}; known layouts are "
        + "; ".join(f"{layout.families} ({layout.layers!r})" for layout in _LAYOUTS)
        + ". Pass the pieces explicitly, e.g. parts=cggr_fn.models.ModelParts(layers='decoder.blocks'), "
        "with the dotted path of your model's nn.ModuleList of layers (see model.named_modules())"
    )


def resolve_parts(model: nn.Module, parts: ModelParts | None) -> ModelParts:
    """``parts`` checked against ``model``, or :func:`detect_parts` when ``None``."""
    if parts is None:
        return detect_parts(model)
    if not isinstance(parts, ModelParts):
        raise TypeError(f"parts: expected a cggr_fn.models.ModelParts or None, got {type(parts).__name__}")
    for field, path in zip(parts._fields, parts):
        if path is None and field != "layers":
            continue
        if not isinstance(path, str) or _find(model, path) is None:
            raise ValueError(f"parts: {field}={path!r} is not a submodule path of this {type(model).__name__}")
    stack = model.get_submodule(parts.layers)
    if not isinstance(stack, _STACK_TYPES) or len(stack) == 0:
        raise ValueError(
            f"parts: layers={parts.layers!r} must name a non-empty nn.ModuleList or nn.Sequential, "
            f"got a {type(stack).__name__}"
        )
    return parts


def layer_stack(model: nn.Module, parts: ModelParts) -> nn.ModuleList | nn.Sequential:
    return model.get_submodule(parts.layers)  # type: ignore[return-value]


def _base_prefixes(model: nn.Module) -> list[str]:
    """The model itself, then its base model (``model.model``, ``model.transformer``, ...) if any."""
    prefixes = [""]
    prefix = getattr(model, "base_model_prefix", None)
    if isinstance(prefix, str) and prefix and isinstance(_find(model, prefix), nn.Module):
        prefixes.append(prefix + ".")
    return prefixes


def _present(model: nn.Module, base: str, name: str | None) -> str | None:
    return None if name is None or _find(model, base + name) is None else base + name


def _find(model: nn.Module, path: str) -> nn.Module | None:
    module: object = model
    for name in path.split(".") if path else ():
        module = module._modules.get(name) if isinstance(module, nn.Module) else None
        if module is None:
            return None
    return module if isinstance(module, nn.Module) else None

