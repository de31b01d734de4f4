"""Attention heads as channel groups: a table of attention layouts (module type -> where its q/k/v and output
projections are, which attributes count its heads), one group per attention module whose channels are its
heads, and the head-count attributes brought back in line with the weights after removal.

A head occupies ``head_dim`` output positions of each of q, k and v (three blocks of a packed qkv projection)
and as many input positions of the output projection: one group channel of several positions per member, as
behind a flatten. Under grouped-query attention a channel is one key/value head together with its
``num_key_value_groups`` query heads (``group * head_dim`` positions of q and of the output projection).

Covered (:data:`HEAD_LAYOUTS`): Hugging Face ``BertAttention``, ``ViTAttention``, ``LlamaAttention`` (grouped-query
attention) and ``GPT2Attention`` (packed ``c_attn``, a ``Conv1D``), and timm's ``Attention`` (packed ``qkv``).
``nn.MultiheadAttention`` keeps its heads (its packed ``in_proj_weight`` is no Linear module).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Union

import torch
from torch import nn

from lightning_prune.structure.groups import GroupMember
from lightning_prune.targets import linear_features, linear_types


def _no_refusal(module: nn.Module) -> Optional[str]:
    return None


def _timm_refusal(module: nn.Module) -> Optional[str]:
    if getattr(module, "gate", None) is not None or not isinstance(getattr(module, "norm", nn.Identity()), nn.Identity):
        return "its output gate or scale norm spans all heads"
    return None


def _gpt2_refusal(module: nn.Module) -> Optional[str]:
    return "cross-attention (q_attn) is not covered" if getattr(module, "is_cross_attention", False) else None


@dataclass(frozen=True)
class HeadLayout:
    """Where an attention module holds its heads; paths are relative to the module.

    Attributes:
        projections: the q, k and v projections, or one packed projection whose outputs are the q, k and v
            blocks (timm's ``qkv``, GPT-2's ``c_attn``).
        output: the output projection (its input channels are the concatenated heads).
        head_dim: the attribute holding the width of one head.
        heads: attributes counting query heads; ``kv_heads``: key/value heads; ``widths``: query heads times
            ``head_dim``. Only those the module has are read and set.
        refusal: why a module of this type is left out (a sentence), or ``None``.
    """

    projections: tuple[str, ...]
    output: str
    head_dim: str
    heads: tuple[str, ...] = ()
    kv_heads: tuple[str, ...] = ()
    widths: tuple[str, ...] = ()
    refusal: Callable[[nn.Module], Optional[str]] = _no_refusal


_SEPARATE = ("q_proj", "k_proj", "v_proj")
HEAD_LAYOUTS: dict[str, HeadLayout] = {
    "transformers.models.bert.modeling_bert.BertAttention": HeadLayout(
        ("self.query", "self.key", "self.value"), "output.dense", "self.attention_head_size",
        heads=("self.num_attention_heads",), widths=("self.all_head_size",),
    ),
    "transformers.models.vit.modeling_vit.ViTAttention": HeadLayout(
        _SEPARATE, "o_proj", "head_dim", heads=("num_attention_heads",)
    ),
    "transformers.models.llama.modeling_llama.LlamaAttention": HeadLayout(
        _SEPARATE, "o_proj", "head_dim", heads=("num_heads",), kv_heads=("num_key_value_heads",)
    ),
    "transformers.models.gpt2.modeling_gpt2.GPT2Attention": HeadLayout(
        ("c_attn",), "c_proj", "head_dim", heads=("num_heads",), widths=("split_size",), refusal=_gpt2_refusal
    ),
    "timm.layers.attention.Attention": HeadLayout(
        ("qkv",), "proj", "head_dim", heads=("num_heads",), widths=("attn_dim",), refusal=_timm_refusal
    ),
}
"""Attention module type (``module.qualname``) -> its :class:`HeadLayout`; add an entry for another layout."""


def head_layout(module: nn.Module) -> Optional[HeadLayout]:
    """The :class:`HeadLayout` of an attention module of a covered type, else ``None``."""
    return HEAD_LAYOUTS.get(f"{type(module).__module__}.{type(module).__qualname__}")


def attention_sites(model: nn.Module) -> Iterator[tuple[str, nn.Module, HeadLayout]]:
    """``(name, module, layout)`` of every attention module of a covered type, in model order."""
    for name, module in model.named_modules():
        layout = head_layout(module)
        if layout is not None:
            yield name, module, layout


def _qualified(site: str, path: str) -> str:
    return f"{site}.{path}" if site else path


@dataclass(frozen=True)
class _Geometry:
    """An attention module's current heads: ``units`` key/value heads, each with ``group`` query heads of
    ``head_dim`` positions; ``packed``: q, k and v are the three blocks of one projection."""

    units: int
    group: int
    head_dim: int
    packed: bool


def _geometry(module: nn.Module, layout: HeadLayout) -> Union[_Geometry, str]:
    """The module's heads read off its projections' widths, or why they do not form whole heads."""
    projections = [module.get_submodule(path) for path in (*layout.projections, layout.output)]
    if not all(isinstance(projection, linear_types()) for projection in projections):
        return "its projections are not Linear layers"
    head_dim = int(getattr(module.get_submodule(_owner(layout.head_dim)), _attribute(layout.head_dim)))
    outs = [linear_features(projection)[1] for projection in projections[:-1]]
    if len(outs) == 1:
        if outs[0] % 3:
            return f"its packed projection's {outs[0]} outputs are not three equal blocks"
        outs = [outs[0] // 3] * 3
    query, key, value = outs
    if key != value or key % head_dim or query % key or linear_features(projections[-1])[0] != query:
        return f"its widths (q {query}, k {key}, v {value}, head_dim {head_dim}) do not form whole heads"
    return _Geometry(key // head_dim, query // key, head_dim, len(layout.projections) == 1)


def _blocks(units: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions and channels when each of ``units`` channels occupies ``width`` consecutive positions."""
    return torch.arange(units * width), torch.arange(units).repeat_interleave(width)


def head_members(model: nn.Module, site: str, order: dict[str, int]) -> Union[tuple[int, list[GroupMember]], str]:
    """The number of heads (key/value heads under grouped-query attention) of the attention module ``site``
    and the members of its head group (q/k/v ``"out"``, the output projection ``"in"``), or why its heads
    are not prunable (a sentence)."""
    module = model.get_submodule(site)
    layout = head_layout(module)
    geometry = layout.refusal(module) or _geometry(module, layout)
    if isinstance(geometry, str):
        return geometry
    query = _blocks(geometry.units, geometry.group * geometry.head_dim)
    kv = _blocks(geometry.units, geometry.head_dim)
    if geometry.packed:
        width = geometry.units * geometry.head_dim
        positions = torch.cat([kv[0] + block * width for block in range(3)])
        parts = [(layout.projections[0], "out", (positions, kv[1].repeat(3)))]
    else:
        parts = [(path, "out", blocks) for path, blocks in zip(layout.projections, (query, kv, kv))]
    parts.append((layout.output, "in", query))
    members = []
    for path, kind, (positions, channels) in parts:
        name = _qualified(site, path)
        members.append(GroupMember(name, kind, positions, channels, len(positions), order[name]))
    return geometry.units, sorted(members, key=lambda member: (member.order, member.kind))


def _owner(path: str) -> str:
    return path.rpartition(".")[0]


def _attribute(path: str) -> str:
    return path.rpartition(".")[2]


def _set(module: nn.Module, path: str, value: int) -> None:
    holder = module.get_submodule(_owner(path))
    if hasattr(holder, _attribute(path)):
        setattr(holder, _attribute(path), value)


def sync_head_counts(model: nn.Module) -> None:
    """Set every covered attention module's head-count attributes (:class:`HeadLayout` ``heads``, ``kv_heads``,
    ``widths``) from its projections' current widths, so that its ``forward`` agrees with its weights."""
    for _, module, layout in attention_sites(model):
        geometry = _geometry(module, layout)
        if isinstance(geometry, str):
            continue
        for paths, value in (
            (layout.heads, geometry.units * geometry.group),
            (layout.kv_heads, geometry.units),
            (layout.widths, geometry.units * geometry.group * geometry.head_dim),
        ):
            for path in paths:
                _set(module, path, value)
