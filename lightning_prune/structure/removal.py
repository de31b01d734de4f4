"""Physical channel removal: :func:`apply_plan` shrinks the model in place with torch-pruning."""

from __future__ import annotations

from typing import Sequence

from torch import nn

from lightning_prune.structure.groups import ChannelGroup, ExampleInput, _check_groups_match, _Graph
from lightning_prune.structure.plans import ChannelPlan, _removed, check_plan
from lightning_prune.structure.records import StructureRecord, structure_record


def apply_plan(
    model: nn.Module, groups: Sequence[ChannelGroup], plan: ChannelPlan, example_input: ExampleInput
) -> StructureRecord:
    """Remove the channels ``plan`` drops, in place, with torch-pruning: every coupled Conv, BatchNorm and
    Linear gets smaller parameters (and buffers), so ``model`` stays a plain ``nn.Module`` that runs and
    trains without this package. ``requires_grad`` flags and training modes are kept. Parameters are new
    tensors: re-create optimizers (``training_state.rebuild_training_state`` inside ``Trainer.fit``), and find the
    groups again before the next plan. Returns :func:`structure_record` of the pruned model."""
    check_plan(groups, plan)
    modules = _check_groups_match(model, groups)
    requires_grad = {name: parameter.requires_grad for name, parameter in model.named_parameters()}
    traced = _Graph(model, example_input)
    for group in groups:
        if group.index in plan:
            removed = _removed(group, plan[group.index]).nonzero().flatten().tolist()
            if removed:
                traced.pruning_group(modules[group.root], removed).prune()
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(requires_grad[name])
    return structure_record(model)
