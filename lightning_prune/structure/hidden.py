"""Model attributes that state the hidden (residual-stream) width, kept in line with the weights after a hidden
group is removed or a structure record restored: timm's ``VisionTransformer`` ``embed_dim``/``num_features``/
``head_hidden_size`` and ``ConvNeXt`` ``num_features`` (its last stage's width), a Hugging Face model's
``config.hidden_size`` (GPT-2's ``n_embd`` through the config's alias). Read off a layer's width, as
:func:`~lightning_prune.structure.attention.sync_head_counts` reads head counts off the projections."""

from __future__ import annotations

from typing import Optional

from torch import nn

from lightning_prune.structure.groups import _out_width, is_norm, norm_width

HIDDEN_WIDTH_ATTRIBUTES: dict[str, tuple[str, tuple[str, ...]]] = {
    "timm.models.vision_transformer.VisionTransformer": ("patch_embed.proj", ("embed_dim", "num_features", "head_hidden_size")),
    "timm.models.convnext.ConvNeXt": ("head.norm", ("num_features",)),
}
"""Model type (``module.qualname``) -> (the layer whose output width is the hidden width, the attributes that
state it)."""


def _width(module: nn.Module) -> int:
    """A layer's output width (a norm's: its weight's length)."""
    return norm_width(module) if is_norm(module) else _out_width(module)

HF_MODEL_TYPES = ("bert", "vit", "gpt2", "llama")
"""Hugging Face ``config.model_type`` s whose ``config.hidden_size`` is the input embedding's width."""


def _hf_input_width(module: nn.Module) -> Optional[int]:
    """The width of a covered Hugging Face model's input embedding (token embedding or patch projection)."""
    config = getattr(module, "config", None)
    if getattr(config, "model_type", None) not in HF_MODEL_TYPES or not hasattr(module, "get_input_embeddings"):
        return None
    embedding = module.get_input_embeddings()
    source = embedding if isinstance(embedding, nn.Embedding) else getattr(embedding, "projection", None)
    return None if source is None else _out_width(source)


def sync_hidden_widths(model: nn.Module) -> None:
    """Set the hidden-width attributes of every covered model inside ``model`` (:data:`HIDDEN_WIDTH_ATTRIBUTES`,
    a covered Hugging Face model's ``config.hidden_size``) from its current weights."""
    for module in model.modules():
        layout = HIDDEN_WIDTH_ATTRIBUTES.get(f"{type(module).__module__}.{type(module).__qualname__}")
        if layout is not None:
            width = _width(module.get_submodule(layout[0]))
            for attribute in layout[1]:
                if hasattr(module, attribute):
                    setattr(module, attribute, width)
        width = _hf_input_width(module)
        if width is not None:
            module.config.hidden_size = width
