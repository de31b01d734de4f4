"""Attention heads as channel groups: a table of attention layouts (module type -> where its q/k/v and output
projections are, which attributes count its heads), one group per attention module whose channels are its
heads, and the head-count attributes brought back in line with the weights after removal.

A head occupies ``head_dim`` output positions of each of q, k and v (three blocks of a packed qkv projection)
and as many input positions of the output projection: one group channel of several positions per member, as
behind a flatten. Under grouped-query attention a channel is one key/value head together with its
``num_key_value_groups`` query heads (``group * head_dim`` positions of q and of the output projection).

A per-head table (a relative position bias: one column per query head) loses the removed heads' columns with
them. Attention modules that share their heads (T5: the first layer's position bias, with its heads, is added in
every later layer of the stack) form one group: head ``c`` goes from all of them.

Covered (:data:`HEAD_LAYOUTS`): Hugging Face ``BertAttention``, ``ViTAttention``, ``LlamaAttention`` (grouped-query
attention), ``GPT2Attention`` (packed ``c_attn``, a ``Conv1D``) and ``T5Attention`` (relative position bias, heads
shared along each stack), timm's ``Attention`` and Swin's ``WindowAttention`` (packed ``qkv``). Refused with the
reason (:data:`UNPRUNABLE_HEADS`): ``nn.MultiheadAttention`` and torchvision's Swin attention, whose functional
forwards take the head width from the input width.
"""

from __future__ import annotations

import re
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
        head_dim: the attribute holding the width of one head, or a function reading it off the module (timm's
            Swin keeps only its scale, ``head_dim ** -0.5``).
        heads: attributes counting query heads; ``kv_heads``: key/value heads; ``widths``: query heads times
            ``head_dim``. Only those the module has are read and set.
        tables: modules whose own parameters hold one column per query head in their last dimension (T5's
            ``relative_attention_bias`` embedding; ``""``: the attention module itself, Swin's
            ``relative_position_bias_table``); those a module lacks are skipped.
        tied: the key under which modules of this type share their heads, from a module's name (modules with
            one key form one group), or ``None``: each module's heads are its own.
        refusal: why a module of this type is left out (a sentence), or ``None``.
    """

    projections: tuple[str, ...]
    output: str
    head_dim: Union[str, Callable[[nn.Module], int]]
    heads: tuple[str, ...] = ()
    kv_heads: tuple[str, ...] = ()
    widths: tuple[str, ...] = ()
    tables: tuple[str, ...] = ()
    tied: Optional[Callable[[str], str]] = None
    refusal: Callable[[nn.Module], Optional[str]] = _no_refusal


def _along_t5_stack(site: str) -> str:
    """T5's layers of one stack share their heads: layer 0's position bias (and the cross-attention's zero bias)
    of ``n_heads`` columns is added in every layer, so each layer index of the name is one key."""
    return re.sub(r"\.block\.\d+\.", ".block.*.", site)


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
    "transformers.models.t5.modeling_t5.T5Attention": HeadLayout(
        ("q", "k", "v"), "o", "key_value_proj_dim", heads=("n_heads", "relative_attention_bias.embedding_dim"),
        widths=("inner_dim",), tables=("relative_attention_bias",), tied=_along_t5_stack,
    ),
    "timm.layers.attention.Attention": HeadLayout(
        ("qkv",), "proj", "head_dim", heads=("num_heads",), widths=("attn_dim",), refusal=_timm_refusal
    ),
    "timm.models.swin_transformer.WindowAttention": HeadLayout(
        ("qkv",), "proj", lambda module: round(module.scale ** -2), heads=("num_heads",), tables=("",)
    ),
}
"""Attention module type (``module.qualname``) -> its :class:`HeadLayout`; add an entry for another layout."""

_INPUT_WIDTH = "its functional attention takes the head width from the input width"
UNPRUNABLE_HEADS: dict[str, str] = {
    "torch.nn.modules.activation.MultiheadAttention": (
        f"{_INPUT_WIDTH} (head_dim = embed_dim // num_heads, q/k/v packed in in_proj_weight), so fewer heads "
        "cannot be removed without replacing the module"
    ),
    **{
        f"torchvision.models.swin_transformer.{name}": (
            f"{_INPUT_WIDTH} (C // num_heads in shifted_window_attention), so fewer heads cannot be removed "
            "without replacing the module"
        )
        for name in ("ShiftedWindowAttention", "ShiftedWindowAttentionV2")
    },
}
"""Attention module type -> why its heads are not prunable (reported by ``refused_channel_groups(heads=True)``)."""


def _type_name(module: nn.Module) -> str:
    return f"{type(module).__module__}.{type(module).__qualname__}"


def head_layout(module: nn.Module) -> Optional[HeadLayout]:
    """The :class:`HeadLayout` of an attention module of a covered type, else ``None``."""
    return HEAD_LAYOUTS.get(_type_name(module))


def attention_sites(model: nn.Module) -> Iterator[tuple[str, nn.Module, HeadLayout]]:
    """``(name, module, layout)`` of every attention module of a covered type, in model order."""
    for name, module in model.named_modules():
        layout = head_layout(module)
        if layout is not None:
            yield name, module, layout


def _qualified(site: str, path: str) -> str:
    return f"{site}.{path}" if site and path else site or path


def _tables(module: nn.Module, layout: HeadLayout) -> list[str]:
    """The paths of the layout's per-head tables that ``module`` has."""
    return [path for path in layout.tables if _has_submodule(module, path)]


def _has_submodule(module: nn.Module, path: str) -> bool:
    try:
        module.get_submodule(path)
    except AttributeError:
        return False
    return True


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
    outs = [linear_features(projection)[1] for projection in projections[:-1]]
    if len(outs) == 1:
        if outs[0] % 3:
            return f"its packed projection's {outs[0]} outputs are not three equal blocks"
        outs = [outs[0] // 3] * 3
    query, key, value = outs
    head_dim = layout.head_dim(module) if callable(layout.head_dim) else _read(module, layout.head_dim)
    if key != value or key % head_dim or query % key or linear_features(projections[-1])[0] != query:
        return f"its widths (q {query}, k {key}, v {value}, head_dim {head_dim}) do not form whole heads"
    return _Geometry(key // head_dim, query // key, head_dim, len(layout.projections) == 1)


def _read(module: nn.Module, path: str) -> int:
    return int(getattr(module.get_submodule(_owner(path)), _attribute(path)))


def _blocks(units: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions and channels when each of ``units`` channels occupies ``width`` consecutive positions."""
    return torch.arange(units * width), torch.arange(units).repeat_interleave(width)


_Heads = Union[tuple[int, list[GroupMember]], str]
"""A head group's size and members, or why the heads are not pruned (a sentence)."""


def _site_members(model: nn.Module, site: str, order: dict[str, int]) -> _Heads:
    """The number of heads (key/value heads under grouped-query attention) of the attention module ``site``
    and the members of its head group (q/k/v ``"out"``, the output projection ``"in"``, per-head tables
    ``"table"``), or why its heads are not prunable (a sentence)."""
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
    parts += [(path, "table", _blocks(geometry.units, geometry.group)) for path in _tables(module, layout)]
    members = []
    for path, kind, (positions, channels) in parts:
        name = _qualified(site, path)
        members.append(GroupMember(name, kind, positions, channels, len(positions), order[name]))
    return geometry.units, sorted(members, key=lambda member: (member.order, member.kind))


def head_groups(model: nn.Module, order: dict[str, int]) -> Iterator[tuple[str, _Heads]]:
    """Per head group of ``model``: the name of its (first) attention module and the group's size and members
    (those of every module sharing the heads, :attr:`HeadLayout.tied`), or why the heads are not pruned;
    ``order``: module name -> position in ``named_modules()``."""
    tied: dict[str, list[str]] = {}
    for name, module in model.named_modules():
        if _type_name(module) in UNPRUNABLE_HEADS:
            yield name, UNPRUNABLE_HEADS[_type_name(module)]
        layout = head_layout(module)
        if layout is not None:
            tied.setdefault(layout.tied(name) if layout.tied else name, []).append(name)
    for sites in tied.values():
        found = {site: _site_members(model, site, order) for site in sites}
        reasons = [f"{site!r}: {heads}" if len(sites) > 1 else heads
                   for site, heads in found.items() if isinstance(heads, str)]
        sizes = {heads[0] for heads in found.values() if not isinstance(heads, str)}
        if len(sizes) > 1:
            reasons.append(f"the modules sharing their heads ({sites}) have different head counts {sorted(sizes)}")
        if reasons:
            yield sites[0], "; ".join(reasons)
        else:
            members = [member for _, group in found.values() for member in group]  # type: ignore[misc]
            yield sites[0], (sizes.pop(), sorted(members, key=lambda member: (member.order, member.kind)))


def _owner(path: str) -> str:
    return path.rpartition(".")[0]


def _attribute(path: str) -> str:
    return path.rpartition(".")[2]


def _set(module: nn.Module, path: str, value: int) -> None:
    if not _has_submodule(module, _owner(path)):
        return
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
