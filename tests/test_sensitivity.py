"""Sensitivity analysis: each layer pruned alone, restored exactly; its proposals drive IterativeMagnitude."""

from __future__ import annotations

import csv

import pytest
import torch
from torchmetrics.classification import MulticlassAccuracy
from torchmetrics.regression import MeanSquaredError

from lightning_prune import DigitsDataModule, ImageClassifier, IterativeMagnitude, sparsity_report
from lightning_prune.criteria import layer_magnitude_masks
from lightning_prune.sensitivity import SensitivityTable, evaluate, sensitivity_analysis, threshold_for_level

LEVELS = [0.3, 0.6, 0.9]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from conftest import make_trainer
    import pytorch_lightning as pl

    pl.seed_everything(0)
    data = DigitsDataModule(batch_size=128)
    model = ImageClassifier("lenet300100")
    make_trainer(tmp_path_factory.mktemp("train"), max_epochs=3).fit(model, data)
    return model, data


def test_each_layer_pruned_alone_and_restored_bit_exactly(trained) -> None:
    model, data = trained
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    table = sensitivity_analysis(model, data.val_dataloader(), levels=LEVELS, progress=False)
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert table.layers == ["network.fc1", "network.fc2", "network.fc3"]
    assert table.metric == "accuracy" and table.higher_is_better
    model.eval()
    accuracy = MulticlassAccuracy(10, average="micro")
    assert table.baseline == pytest.approx(evaluate(model, data.val_dataloader(), accuracy))
    # one entry recomputed by hand: fc3 alone at 90% sparsity
    fc3 = model.network.fc3.weight
    keep = layer_magnitude_masks({"w": fc3}, {"w": 0.9})["w"]
    with torch.no_grad():
        fc3.mul_(keep)
    assert table.scores["network.fc3"][0.9] == pytest.approx(evaluate(model, data.val_dataloader(), accuracy))
    with torch.no_grad():
        fc3.copy_(before["network.fc3.weight"])
    assert table.drop("network.fc3", 0.9) > table.drop("network.fc1", 0.3)  # the output layer is the fragile one



def test_each_submodule_keeps_its_own_train_eval_flag(trained) -> None:
    model, data = trained
    model.train()
    model.network.fc2.eval()  # e.g. a frozen part of the network the user keeps in eval mode
    flags = {name: module.training for name, module in model.named_modules()}
    sensitivity_analysis(model, data.val_dataloader(), levels=(0.5,), progress=False)
    assert {name: module.training for name, module in model.named_modules()} == flags
    model.eval()
    model.network.fc1.train()
    flags = {name: module.training for name, module in model.named_modules()}
    sensitivity_analysis(model, data.val_dataloader(), levels=(0.5,), progress=False)
    assert {name: module.training for name, module in model.named_modules()} == flags

def test_proposals_feed_iterative_magnitude_per_layer_and_sensitivity(trained, trainer_factory) -> None:
    model, data = trained
    table = sensitivity_analysis(model, data.val_dataloader(), levels=LEVELS, progress=False)
    proposal = table.propose_sparsity(max_drop=0.02)
    assert set(proposal) == set(table.layers) and max(proposal.values()) > 0
    s = table.propose_sensitivity(max_drop=0.02)

    for kwargs in ({"scope": "layer", "sparsity": proposal}, {"criterion": "sensitivity", "sensitivity": s}):
        pruned = ImageClassifier("lenet300100")
        pruned.load_state_dict(model.state_dict())
        callback = IterativeMagnitude(schedule="one_shot", start_epoch=0, verbose=False, **kwargs)
        trainer_factory([callback], max_epochs=1, limit_train_batches=1, limit_val_batches=0).fit(pruned, data)
        for row in sparsity_report(pruned).layers:
            assert row.nonzero == row.total - round(proposal[row.layer] * row.total), (kwargs, row)


def test_threshold_drops_the_same_weights_as_the_level() -> None:
    torch.manual_seed(0)
    weight = torch.randn(50, 40)
    for level in (0.1, 0.5, 0.95):
        s = threshold_for_level(weight, level)
        kept = weight.abs() >= s * float(weight.std())
        assert torch.equal(kept, layer_magnitude_masks({"w": weight}, {"w": level})["w"])


def test_proposal_is_the_highest_level_before_the_first_violation() -> None:
    table = SensitivityTable(
        levels=[0.2, 0.4, 0.6, 0.8], baseline=0.9,
        scores={"a": {0.2: 0.9, 0.4: 0.89, 0.6: 0.8, 0.8: 0.88}, "b": {0.2: 0.7, 0.4: 0.9, 0.6: 0.9, 0.8: 0.9}},
        thresholds={"a": {0.2: 0.1, 0.4: 0.3, 0.6: 0.5, 0.8: 0.9}, "b": {0.2: 0.1, 0.4: 0.3, 0.6: 0.5, 0.8: 0.9}},
    )
    assert table.propose_sparsity(0.02) == {"a": 0.4, "b": 0.0}
    assert table.propose_sensitivity(0.02) == {"a": 0.3, "b": 0.0}
    assert table.propose_sparsity(0.5) == {"a": 0.8, "b": 0.8}
    loss = SensitivityTable([0.5], 1.0, {"a": {0.5: 1.5}}, {"a": {0.5: 0.7}}, "loss", higher_is_better=False)
    assert loss.drop("a", 0.5) == pytest.approx(0.5)
    assert loss.propose_sparsity(0.4) == {"a": 0.0}
    with pytest.raises(ValueError, match="`max_drop`"):
        table.propose_sparsity(-0.1)


def test_csv_plot_custom_metric_and_bad_levels(trained, tmp_path) -> None:
    model, data = trained
    one_hot = [(x, torch.nn.functional.one_hot(y, 10).float()) for x, y in data.val_dataloader()]
    table = sensitivity_analysis(model, one_hot, levels=[0.5], metric=MeanSquaredError(), parameters=["network.fc3"], progress=False)
    assert table.layers == ["network.fc3"] and not table.higher_is_better and table.metric == "meansquarederror"
    with open(table.to_csv(tmp_path / "s.csv")) as handle:
        rows = list(csv.DictReader(handle))
    assert [r["layer"] for r in rows] == ["dense", "network.fc3"]
    assert float(rows[1]["meansquarederror"]) == pytest.approx(table.scores["network.fc3"][0.5])
    assert table.plot(tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"
    for bad in ([], [0.5, 0.3], [1.0], [0.0]):
        with pytest.raises(ValueError, match="`levels`"):
            sensitivity_analysis(model, one_hot, levels=bad)
