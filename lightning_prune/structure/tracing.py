"""torch-pruning's ``DependencyGraph`` of a model, called the way the model's ``forward`` is called.

:func:`dependency_graph` builds the graph on a :class:`~lightning_prune.inputs.ModelInput` (positional and
keyword arguments: ``model(**batch)`` traces as well as ``model(x)``), traces back from every tensor of the
output computed from the parameters (a tuple, a Hugging Face ``ModelOutput``, a key/value cache), and knows Hugging Face's ``Conv1D``
(GPT-2's linear layer, weight stored ``(in, out)``) through a customized pruner, so its widths form channel
groups like a ``Linear``'s.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Sequence

import torch

import torch_pruning as tp
from torch import nn
from torch_pruning.dependency import index_mapping

from lightning_prune.inputs import ExampleInput, ModelInput, model_input, output_tensors
from lightning_prune.targets import set_linear_features, transposed_linear_types


class TransposedLinearPruner(tp.pruner.function.BasePruningFunc):
    """torch-pruning pruner of Hugging Face's ``Conv1D``: output channels are weight columns and bias entries,
    input channels weight rows; ``nf``/``nx`` (``forward`` reads ``nf``) follow."""

    def prune_out_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        keep = sorted(set(range(layer.weight.shape[1])) - set(idxs))
        layer.weight = self._prune_parameter_and_grad(layer.weight, keep, 1)
        layer.bias = self._prune_parameter_and_grad(layer.bias, keep, 0)
        set_linear_features(layer, layer.weight.shape[0], len(keep))
        return layer

    def prune_in_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        keep = sorted(set(range(layer.weight.shape[0])) - set(idxs))
        layer.weight = self._prune_parameter_and_grad(layer.weight, keep, 0)
        set_linear_features(layer, len(keep), layer.weight.shape[1])
        return layer

    def get_out_channels(self, layer: nn.Module) -> int:
        return layer.weight.shape[1]

    def get_in_channels(self, layer: nn.Module) -> int:
        return layer.weight.shape[0]


def _traced_outputs(output: Any) -> list[torch.Tensor]:
    """The output tensors torch-pruning traces back from (those computed from the parameters), each behind a
    view of its own: torch-pruning marks a model output only where its last operation is no module's, so a
    module's output that is returned *and* used further (features beside the logits) would not count as one."""
    traced = [tensor.view_as(tensor) for tensor in output_tensors(output) if tensor.grad_fn is not None]
    if not traced:
        raise ValueError(
            f"the model's output on `example_input` ({type(output).__name__}) holds no tensor computed from its "
            "parameters, so no channel can be traced; pass an input the model computes its output from."
        )
    return traced


class _IdentityList(list):
    """torch-pruning's list of layers left out of tracing, with membership by identity. Its own ``in`` compares
    with ``==``, which torchmetrics' ``Metric`` overloads (returning a truthy metric); with a customized pruner
    registered (``Conv1D``) torch-pruning puts a LightningModule's metrics in that list, and then every layer
    would count as left out: the model would trace to no channel group at all."""

    def __contains__(self, item: object) -> bool:
        return any(item is entry for entry in self)


def _call(model: nn.Module, inputs: ModelInput) -> Any:
    return inputs.call(model)


def dependency_graph(model: nn.Module, example_input: ExampleInput) -> tp.DependencyGraph:
    """torch-pruning's graph of ``model`` traced on ``example_input`` (read by :func:`~lightning_prune.inputs.model_input`;
    the caller sets eval mode and enables gradients)."""
    pruners = {layer_type: TransposedLinearPruner() for layer_type in transposed_linear_types()}
    graph = tp.DependencyGraph()
    graph.IGNORED_LAYERS_IN_TRACING = _IdentityList()
    with index_mapping_fixed():
        return graph.build_dependency(
            model,
            example_inputs=model_input(example_input),
            forward_fn=_call,
            output_transform=_traced_outputs,
            customized_pruners=pruners,
            verbose=False,
        )


def _concat_of_unknown_widths_unmapped(update: Any) -> Any:
    """torch-pruning 1.6.1 sums a concatenation's input widths before it checks that they are known, so a concat
    along a negative dim whose inputs' widths are unknown (a key/value cache growing along the sequence,
    ``torch.cat([past, key], dim=-2)``) raises ``TypeError``. Where a width is unknown, torch-pruning's own
    rule a line later is to leave the concat without an index mapping: this wrapper does that instead of raising."""

    def update_concat(graph: Any, node: Any) -> None:
        try:
            update(graph, node)
        except TypeError:
            if None not in (node.module.concat_sizes or ()):
                raise

    return update_concat


@contextlib.contextmanager
def index_mapping_fixed() -> Iterator[None]:
    """torch-pruning's concat index mapping with :func:`_concat_of_unknown_widths_unmapped`, for the calls of
    this package into torch-pruning only (building a graph, expanding a group): restored on exit, so that
    torch-pruning used directly (its ``MetaPruner``) in the same process is torch-pruning as released."""
    update = index_mapping.update_concat_index_mapping
    index_mapping.update_concat_index_mapping = _concat_of_unknown_widths_unmapped(update)
    try:
        yield
    finally:
        index_mapping.update_concat_index_mapping = update
