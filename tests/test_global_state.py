"""Channel-group discovery leaves no global state behind: torch-pruning's functions, which discovery patches
while it expands groups (bounded expansion, index mappings kept as built, a concat of unknown widths left
unmapped), are torch-pruning's own again whenever control is back with the caller. A patch left in place
would change Torch-Pruning's ``MetaPruner`` and every later discovery in the same process (the order-dependent
results of the transformers benchmark were the suspected symptom)."""

from __future__ import annotations

import torch
from torch import nn
from torch_pruning.dependency import Group, index_mapping

from lightning_prune.structure import find_channel_groups
from lightning_prune.structure.groups import _Graph

_RELEASED = {
    "index_mapping.update_index_mapping": (index_mapping, "update_index_mapping", "torch_pruning.dependency.index_mapping"),
    "index_mapping.update_concat_index_mapping": (
        index_mapping, "update_concat_index_mapping", "torch_pruning.dependency.index_mapping",
    ),
    "Group.add_dep": (Group, "add_dep", "torch_pruning.dependency.group"),
    "Group.has_pruning_op": (Group, "has_pruning_op", "torch_pruning.dependency.group"),
}


def _patched() -> list[str]:
    """The torch-pruning functions that are not torch-pruning's own (defined elsewhere, or nested wrappers)."""
    found = []
    for label, (owner, attribute, module) in _RELEASED.items():
        function = getattr(owner, attribute)
        if function.__module__ != module or "<locals>" in function.__qualname__:
            found.append(f"{label} is {function.__module__}.{function.__qualname__}")
    return found


class _Concat(nn.Module):
    """Two branches concatenated along the channels, then a 1x1 conv: groups through a concat mapping."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 6, 1)
        self.out = nn.Conv2d(10, 5, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.cat([self.a(x), self.b(x)], dim=1)).mean((2, 3))


def test_importing_and_discovering_leaves_torch_pruning_as_released():
    assert _patched() == []  # lightning_prune (imported above) patches nothing at import
    groups = find_channel_groups(_Concat(), torch.randn(2, 3, 4, 4))
    assert [group.root for group in groups] == ["a", "b"]
    assert _patched() == []


def test_torch_pruning_is_released_while_a_caller_holds_the_root_groups():
    # the groups are handed out after the expansion's patches are undone: a caller that stops after the first
    # group, or raises while it reads the groups, leaves nothing patched (a suspended generator did, until it
    # was collected; two closed out of order left the patches for good)
    graph = _Graph(_Concat(), torch.randn(2, 3, 4, 4))
    groups = iter(graph.root_groups([]))  # held, as a loop that raises holds it in its traceback
    assert next(groups)[0] == "a"
    assert _patched() == []
    assert [root for root, _, _ in groups] == ["b", "out"]  # "out": refused later, coupled to the output
