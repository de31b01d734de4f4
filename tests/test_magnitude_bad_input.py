"""Every bad argument of `IterativeMagnitude` fails before any weight changes, naming the argument."""

import pytest
import torch
from torch import nn
import pytorch_lightning as pl
from pytorch_lightning.utilities.exceptions import MisconfigurationException

from lightning_prune import DigitsDataModule, ImageClassifier, IterativeMagnitude

from conftest import make_trainer


@pytest.mark.parametrize(
    "kwargs, argument",
    [
        (dict(sparsity=1.0), "sparsity"),
        (dict(sparsity=-0.1), "sparsity"),
        (dict(sparsity={"network.fc1": 1.5}, scope="layer"), "sparsity"),
        (dict(sparsity={"network.fc1": 0.5}), "scope"),
        (dict(schedule="cubic"), "schedule"),
        (dict(scope="network"), "scope"),
        (dict(criterion="taylor"), "criterion"),
        (dict(criterion="sensitivity"), "sensitivity"),
        (dict(criterion="sensitivity", sensitivity=-1.0), "sensitivity"),
        (dict(sensitivity=1.0), "sensitivity"),
        (dict(granularity="kernel"), "granularity"),
        (dict(channel_norm="l3"), "channel_norm"),
        (dict(start_epoch=5, end_epoch=2), "start_epoch"),
        (dict(start_epoch=-1), "start_epoch"),
        (dict(frequency=0), "frequency"),
        (dict(start_epoch=0, end_epoch=3, frequency=2, schedule="iterative"), "frequency"),
        (dict(rewind="final"), "rewind"),
        (dict(rewind=4, start_epoch=2, end_epoch=3), "rewind"),
        (dict(physical=True), "physical"),
        (dict(granularity="channel", physical=True, make_permanent=False), "physical"),
        # wrong types: a bool is not a number, a string is not a list of patterns
        (dict(sparsity=True), "sparsity"),
        (dict(sparsity="0.5"), "sparsity"),
        (dict(sparsity={1: 0.5}, scope="layer"), "sparsity"),
        (dict(start_epoch=1.5), "start_epoch"),
        (dict(start_epoch=True), "start_epoch"),
        (dict(end_epoch=2.0), "end_epoch"),
        (dict(frequency="1"), "frequency"),
        (dict(interval="batch"), "interval"),
        (dict(parameters="fc1"), "parameters"),
        (dict(parameters=[None]), "parameters"),
        (dict(exclude="network.fc3"), "exclude"),
        (dict(max_layer_sparsity=0.0), "max_layer_sparsity"),
        (dict(max_layer_sparsity=1.5), "max_layer_sparsity"),
        (dict(max_layer_sparsity=True), "max_layer_sparsity"),
        (dict(sparsity=0.995), "max_layer_sparsity"),
        (dict(sparsity={"network.fc1": 0.995}, scope="layer"), "max_layer_sparsity"),
        (dict(criterion="sensitivity", sensitivity="1"), "sensitivity"),
        (dict(rewind=1.5), "rewind"),
        (dict(rewind=True), "rewind"),
        (dict(make_permanent=1), "make_permanent"),
        (dict(physical="yes"), "physical"),
        (dict(verbose=None), "verbose"),
        (dict(monitor=3), "monitor"),
        (dict(name=""), "name"),
        (dict(example_input_fn="first"), "example_input_fn"),
        (dict(example_input_fn=lambda: None), "example_input_fn"),
        # AGP's initial sparsity s_i: in [0, 1), a number, at most s_f, only for AGP on a sparsity criterion
        (dict(initial_sparsity=0.6, sparsity=0.5), "initial_sparsity"),
        (dict(initial_sparsity=0.3, sparsity={"network.fc1": 0.5, "network.fc2": 0.2}, scope="layer"), "initial_sparsity"),
        (dict(initial_sparsity=1.0, sparsity=0.9), "initial_sparsity"),
        (dict(initial_sparsity=-0.1), "initial_sparsity"),
        (dict(initial_sparsity="0.1"), "initial_sparsity"),
        (dict(initial_sparsity=True), "initial_sparsity"),
        (dict(initial_sparsity=0.1, schedule="iterative"), "initial_sparsity"),
        (dict(initial_sparsity=0.1, criterion="sensitivity", sensitivity=1.0), "initial_sparsity"),
        (dict(initial_sparsity=0.1, start_epoch=2, end_epoch=2), "initial_sparsity"),
    ],
)
def test_bad_arguments_raise_at_construction_naming_the_argument(kwargs, argument):
    with pytest.raises(ValueError, match=f"`{argument}`") as error:
        IterativeMagnitude(**kwargs)
    if argument in kwargs and not callable(kwargs[argument]) and f"`{argument}` must be" in str(error.value):
        assert repr(kwargs[argument]) in str(error.value)  # the message names the value too


def test_yaml_values_are_type_checked_at_parse_time():
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(IterativeMagnitude, "pruning")
    assert parser.parse_args(["--pruning.start_epoch", "2", "--pruning.max_layer_sparsity", "0.9"]).pruning.start_epoch == 2
    for argument, value in [("start_epoch", "1.5"), ("frequency", "0"), ("max_layer_sparsity", "1.5"), ("sparsity", "1.0"), ("interval", "batch")]:
        with pytest.raises(Exception):
            parser.parse_args([f"--pruning.{argument}", value])


@pytest.mark.parametrize(
    "kwargs, max_epochs, argument, error",
    [
        (dict(parameters=["network.conv*"]), 3, "parameters", ValueError),
        (dict(exclude=["*.missing"]), 3, "exclude", ValueError),
        (dict(parameters=["network.fc1"], exclude=["network.fc1"]), 3, "parameters", ValueError),
        (dict(schedule="agp", start_epoch=1, end_epoch=5), 3, "end_epoch", MisconfigurationException),
        (dict(scope="layer", sparsity={"network.fc9": 0.5}), 3, "sparsity", ValueError),
        (dict(criterion="sensitivity", sensitivity={"fc1": 1.0}), 3, "sensitivity", ValueError),
    ],
)
def test_bad_setup_fails_before_any_training_step_or_weight_change(tmp_path, kwargs, max_epochs, argument, error):
    model = ImageClassifier("lenet300100")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = make_trainer(tmp_path, [IterativeMagnitude(**kwargs)], max_epochs=max_epochs)
    with pytest.raises(error, match=f"`{argument}`"):
        trainer.fit(model, DigitsDataModule())
    assert trainer.global_step == 0
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name


class NoWeights(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1))

    def training_step(self, batch, batch_idx):
        return (self.scale * batch[0]).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_a_model_without_prunable_weights_is_refused(tmp_path):
    with pytest.raises(ValueError, match="no prunable weight"):
        make_trainer(tmp_path, [IterativeMagnitude()], max_epochs=1).fit(NoWeights(), DigitsDataModule())
