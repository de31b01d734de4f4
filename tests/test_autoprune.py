"""AutoPrune: the auxiliary-parameter core (plain torch) and ``AutoPruneCallback`` on the digits data."""

from __future__ import annotations

import csv
import warnings

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.utils.parametrize as parametrize
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger
from torch import nn

from lightning_prune import AutoPruneCallback, DigitsDataModule, ImageClassifier, sparsity_report
from lightning_prune.auxiliary import AuxiliaryParameters, auxiliary_gradient, indicator, loss_signal, ste_derivative
from lightning_prune.demo.models import LeNet5, LeNet300100
from lightning_prune.diagnostics import count_ops
from lightning_prune.structure import find_channel_groups

from test_diagnostics import own_host_reads

FALLBACK = "learn from the training batches"
FAST = dict(init=0.1, aux_lr=0.05, reg=2.0, verbose=False)  # prunes within the two or three epochs of a test


# ---------------------------------------------------------------------- core: indicator and STEs
@pytest.mark.parametrize(
    ("ste", "expected"),
    [
        ("linear", [1.0, 1.0, 1.0]),
        ("leaky_relu", [0.25, 0.25, 1.0]),
        ("softplus", [torch.sigmoid(torch.tensor(-1.0)).item(), 0.5, torch.sigmoid(torch.tensor(2.0)).item()]),
    ],
)
def test_indicator_is_a_step_forward_and_its_ste_backward(ste, expected):
    m = torch.tensor([-1.0, 0.0, 2.0], requires_grad=True)
    h = indicator(m, ste, slope=0.25)
    assert h.tolist() == [0.0, 0.0, 1.0]
    h.backward(torch.ones(3))
    assert m.grad.tolist() == pytest.approx(expected)
    assert ste_derivative(m.detach(), ste, 0.25).tolist() == pytest.approx(expected)


def test_auxiliary_gradient_terms():
    gate_grad = torch.tensor([2.0, -1.0, 4.0, -3.0])
    aux = torch.tensor([1.0, 1.0, -1.0, -1.0])
    magnitude = torch.tensor([2.0, 1.0, 1.0, 4.0])
    plain = dict(sensitivity=False, correlation=False, direction=False)
    # reg = 0: the normalised chain rule h̃'(m) ⊙ G / mean|G|
    assert auxiliary_gradient(gate_grad, aux, magnitude, 0.0, "leaky_relu", 0.1, **plain).tolist() == pytest.approx(
        [0.8, -0.4, 0.16, -0.12]
    )
    # correlation: G / ‖w‖ before normalising
    corr = auxiliary_gradient(gate_grad, aux, magnitude, 0.0, "linear", **{**plain, "correlation": True})
    expected = torch.tensor([1.0, -1.0, 4.0, -0.75])
    assert corr.tolist() == pytest.approx((expected / expected.abs().mean()).tolist())
    # one normaliser for all tensors (the core passes the mean over the network)
    shared = auxiliary_gradient(gate_grad, aux, magnitude, 0.0, "linear", scale=4.0, **plain)
    assert shared.tolist() == pytest.approx((gate_grad / 4.0).tolist())
    # the pull alone: constant 1/2, weighted by 1 / (1 + |w|/mean|w|) with sensitivity, by h̃'(m) with direction
    zero = torch.zeros(4)
    assert auxiliary_gradient(zero, aux, magnitude, 1.0, **plain).tolist() == pytest.approx([0.5] * 4)
    sens = auxiliary_gradient(zero, aux, magnitude, 1.0, **{**plain, "sensitivity": True})
    assert sens.tolist() == pytest.approx((1 / (1 + magnitude / 2.0)).tolist())
    direct = auxiliary_gradient(zero, aux, magnitude, 1.0, "leaky_relu", 0.1, **{**plain, "direction": True})
    assert direct.tolist() == pytest.approx([0.5, 0.5, 0.05, 0.05])


# ---------------------------------------------------------------------- core: parametrization, recovery, checkpoints
def _element_core(net: nn.Module) -> AuxiliaryParameters:
    core = AuxiliaryParameters(net, ["fc1", "fc2"], "element", ste="leaky_relu", slope=0.1, init=0.1)
    core.prepare()
    return core


def test_switched_off_weight_keeps_its_value_and_returns_with_it():
    net = LeNet300100()
    core = _element_core(net)
    w = core.original(("fc1", "weight"))
    value = w[3, 5].item()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.5, momentum=0.9, weight_decay=0.1)
    core.values["fc1"][3, 5] = -0.2  # switch one weight off
    assert net.fc1.weight[3, 5].item() == 0.0
    for _ in range(3):  # training moves every other weight; decay and momentum must not reach this one
        optimizer.zero_grad()
        net(torch.randn(8, 64)).pow(2).mean().backward()
        assert w.grad[3, 5].item() == 0.0
        core.before_step()
        optimizer.step()
        core.after_step()
    assert w[3, 5].item() == value
    assert w[3, 6].item() != 0.0
    core.values["fc1"][3, 5] = 0.3  # and on again
    assert net.fc1.weight[3, 5].item() == value


def test_state_dict_holds_plain_masked_weights_and_resume_state_restores_the_switched_off_values():
    torch.manual_seed(0)
    net = LeNet300100()
    core = _element_core(net)
    core.values["fc1"][:10] = -1.0
    hidden = core.original(("fc1", "weight"))[:10].clone()
    state, aux_state = net.state_dict(), core.state_dict()
    assert "fc1.weight" in state and not any("parametrizations" in key for key in state)
    assert torch.equal(state["fc1.weight"][:10], torch.zeros(10, 64))
    assert not torch.signbit(state["fc1.weight"][:10]).any()  # +0.0, as MaskSet writes

    fresh = LeNet300100()
    fresh.load_state_dict(state)  # a plain model loads a mid-training state strictly
    assert torch.equal(fresh.fc1.weight, net.fc1.weight)

    resumed_net = LeNet300100()
    resumed = _element_core(resumed_net)
    resumed_net.load_state_dict(state)
    resumed.load_state_dict(aux_state)
    assert torch.equal(resumed.original(("fc1", "weight"))[:10], hidden)
    assert torch.equal(resumed.values["fc1"], core.values["fc1"])


def test_detach_makes_masks_permanent_on_the_same_parameters():
    net = LeNet300100()
    core = _element_core(net)
    original = core.original(("fc1", "weight"))
    core.values["fc1"][0] = -1.0
    core.finalize()
    assert not parametrize.is_parametrized(net)
    assert net.fc1.weight is original and torch.equal(net.fc1.weight[0], torch.zeros(64))
    assert set(dict(net.named_parameters())) == set(dict(LeNet300100().named_parameters()))


def test_channel_granularity_gates_whole_channels_with_their_biases():
    net = LeNet5()
    groups = find_channel_groups(net, torch.zeros(1, 1, 8, 8))
    core = AuxiliaryParameters(net, granularity="channel", groups=groups)
    core.prepare()
    assert {key: tuple(v.shape) for key, v in core.values.items()} == {
        group.root: (group.size,) for group in groups
    }
    conv = groups[0].root
    core.values[conv][2] = -1.0
    module = net.get_submodule(conv)
    assert torch.equal(module.weight[2], torch.zeros_like(module.weight[2])) and module.bias[2].item() == 0.0
    assert module.weight[1].abs().sum() > 0
    magnitude = core.magnitudes()[conv]
    original = getattr(module.parametrizations, "weight").original
    bias = getattr(module.parametrizations, "bias").original
    assert magnitude[1].item() == pytest.approx(float((original[1].pow(2).sum() + bias[1].pow(2)).sqrt()), rel=1e-5)


def test_channel_gates_are_computed_once_per_change_of_m():

    net = LeNet5()
    groups = find_channel_groups(net, torch.zeros(1, 1, 8, 8))
    core = AuxiliaryParameters(net, granularity="channel", groups=groups)
    core.prepare()
    x = torch.randn(2, 1, 8, 8)
    dense, unchanged = count_ops(net, x)
    assert unchanged.by_op["aten::index_select"] == 0  # computed when attached, reused since
    core.values[groups[0].root][2] = -1.0  # M changed: the gates follow at once
    pruned, changed = count_ops(net, x)
    assert changed.by_op["aten::index_select"] == 1 and not torch.equal(pruned, dense)  # one gather for every gate
    again, reused = count_ops(net, x)
    assert reused.by_op["aten::index_select"] == 0 and torch.equal(again, pruned)
    weight = net.get_submodule(groups[0].root).weight
    assert torch.equal(weight[2], torch.zeros_like(weight[2])) and weight[1].abs().sum() > 0


# ---------------------------------------------------------------------- callback: arguments
@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"aux_lr": 0.0}, "aux_lr"),
        ({"aux_lr": -1e-3}, "aux_lr"),
        ({"reg": -0.1}, "reg"),
        ({"ste": "sigmoid"}, "ste"),
        ({"granularity": "kernel"}, "granularity"),
        ({"aux_optimizer": "rmsprop"}, "aux_optimizer"),
        ({"init": 0.0}, "init"),
        ({"end_epoch": -1}, "end_epoch"),
        ({"physical": True}, "physical=True"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, argument):
    with pytest.raises(ValueError, match=f"`{argument}`"):
        AutoPruneCallback(**kwargs)


def test_patterns_matching_nothing_fail_before_any_weight_changes(trainer_factory):
    model = ImageClassifier("lenet300100")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = trainer_factory([AutoPruneCallback(parameters=["network.nope*"])], max_epochs=1)
    with pytest.raises(ValueError, match="`parameters` pattern 'network.nope\\*' matches no prunable module"):
        trainer.fit(model, DigitsDataModule(aux_fraction=0.5))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# ---------------------------------------------------------------------- callback: training
class CountingLoader:
    """An auxiliary loader that counts the batches drawn from it."""

    def __init__(self, loader):
        self.loader, self.batches = loader, 0

    def __iter__(self):
        for batch in self.loader:
            self.batches += 1
            yield batch


def _fit(trainer_factory, callback, data, arch="lenet300100", **kwargs):
    model = ImageClassifier(arch)
    trainer = trainer_factory([callback], **kwargs)
    trainer.fit(model, data)
    return model, trainer


@pytest.mark.parametrize("ste", ["linear", "leaky_relu", "softplus"])
def test_each_ste_prunes_and_makes_masks_permanent(trainer_factory, ste):
    callback = AutoPruneCallback(ste=ste, **FAST)
    model, trainer = _fit(trainer_factory, callback, DigitsDataModule(aux_fraction=0.5), max_epochs=3)
    report = sparsity_report(model)
    assert 0.3 < report.sparsity < 1.0
    assert not parametrize.is_parametrized(model) and callback.aux is None
    fresh = ImageClassifier("lenet300100")
    fresh.load_state_dict(model.state_dict())  # strict: plain keys, no auxiliary tensors
    assert sparsity_report(fresh).sparsity == report.sparsity
    optimized = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert optimized == {id(p) for p in model.parameters()}


def test_bilevel_uses_the_held_out_split_and_the_fallback_warns(trainer_factory):
    data = DigitsDataModule(aux_fraction=0.5)
    data.setup("fit")
    loader = CountingLoader(data.aux_dataloader())
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        warnings.filterwarnings("ignore", ".*switched off only.*")  # two short epochs prune little, on purpose
        callback = AutoPruneCallback(aux_dataloader=loader, end_epoch=1, verbose=False)
        _fit(trainer_factory, callback, data, max_epochs=3, limit_val_batches=0)
    assert loader.batches == 2 * len(data.train_dataloader())  # one held-out batch per optimizer step of epochs 0 and 1

    callback = AutoPruneCallback(verbose=False)
    _fit(trainer_factory, callback, DigitsDataModule(aux_fraction=0.5), max_epochs=1)
    assert callback.source == "datamodule"

    callback = AutoPruneCallback(verbose=False)
    with pytest.warns(UserWarning, match=FALLBACK):
        model, _ = _fit(trainer_factory, callback, DigitsDataModule(aux_fraction=0.0), max_epochs=1)
    assert callback.source == "train"


def test_channel_granularity_removes_channels_physically(trainer_factory):
    callback = AutoPruneCallback(granularity="channel", physical=True, **{**FAST, "reg": 3.0, "aux_lr": 0.1})
    model, _ = _fit(trainer_factory, callback, DigitsDataModule(aux_fraction=0.5), arch="lenet5", max_epochs=3)
    convs = [m for m in model.network.features if isinstance(m, nn.Conv2d)]
    linears = [m for m in model.network.classifier if isinstance(m, nn.Linear)]
    widths = [convs[0].out_channels, convs[1].out_channels, linears[0].out_features, linears[1].out_features]
    assert widths != [6, 16, 120, 84] and linears[2].out_features == 10
    assert not parametrize.is_parametrized(model)
    assert model(torch.zeros(2, 1, 8, 8)).shape == (2, 10)


def test_logs_sparsity_flops_revivals_per_epoch(tmp_path, trainer_factory):
    logger = CSVLogger(str(tmp_path), name="log")
    _fit(trainer_factory, AutoPruneCallback(**FAST), DigitsDataModule(aux_fraction=0.5), max_epochs=2, logger=logger)
    with open(logger.log_dir + "/metrics.csv") as handle:
        rows = [row for row in csv.DictReader(handle) if row.get("prune/sparsity")]
    assert len(rows) == 3  # two epochs and the end of fit
    for key in ("prune/flops_ratio", "prune/flops_macs", "prune/sparse_flops_ratio", "prune/sparse_flops_macs",
                "prune/revived", "prune/switched_off", "prune/sparsity/network.fc1"):
        assert rows[-1][key] != ""
    assert float(rows[-1]["prune/flops_ratio"]) == 1.0  # element pruning: the model still multiplies every weight
    assert 0.0 < float(rows[-1]["prune/sparse_flops_ratio"]) < 1.0  # what a sparse kernel would run
    assert float(rows[0]["prune/switched_off"]) > 0


def test_nan_auxiliary_gradient_stops_with_a_clear_error(trainer_factory):
    def nan_loss(module, batch):
        return module(batch[0]).sum() * float("nan")

    model = ImageClassifier("lenet300100")
    trainer = trainer_factory([AutoPruneCallback(loss_fn=nan_loss, verbose=False)], max_epochs=1)
    with pytest.raises(FloatingPointError, match="auxiliary step"):
        trainer.fit(model, DigitsDataModule(aux_fraction=0.5))
    assert not parametrize.is_parametrized(model)


@pytest.mark.parametrize("aux_optimizer", ["sgd", "adam"])  # Adam: M's moments must come back too
def test_resume_ends_with_the_masks_of_an_uninterrupted_run(tmp_path, trainer_factory, aux_optimizer):
    def run(ckpt_path=None, callbacks=()):
        pl.seed_everything(0)
        model = ImageClassifier("lenet300100")
        trainer = trainer_factory(
            [AutoPruneCallback(**FAST, aux_optimizer=aux_optimizer), *callbacks],
            max_epochs=3, enable_checkpointing=bool(callbacks),
        )
        trainer.fit(model, DigitsDataModule(aux_fraction=0.5), ckpt_path=ckpt_path)
        return model

    checkpoints = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_top_k=-1, every_n_epochs=1, filename="{epoch}")
    uninterrupted = run(callbacks=[checkpoints])
    middle = str(tmp_path / "ckpt" / "epoch=0.ckpt")
    plain = ImageClassifier("lenet300100")
    plain.load_state_dict(torch.load(middle, weights_only=False)["state_dict"])  # mid-training checkpoints load too
    resumed = run(ckpt_path=middle)
    for key, value in uninterrupted.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key
    assert sparsity_report(resumed).sparsity > 0.3


# ---------------------------------------------------------------------- core: the per-step path
@pytest.mark.parametrize("granularity", ["element", "channel"])
def test_a_training_step_and_an_auxiliary_step_never_synchronise_with_the_host(granularity):
    net = LeNet5()
    groups = find_channel_groups(net, torch.zeros(1, 1, 8, 8)) if granularity == "channel" else ()
    core = AuxiliaryParameters(net, ["features.0", "features.3"], granularity, groups, init=0.1)
    core.prepare()
    core.build_optimizer("adam", 0.05)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))

    def three_steps():
        for _ in range(3):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(net(x), y).backward()
            core.before_step()
            optimizer.step()
            core.after_step()
            core.learn(lambda: torch.nn.functional.cross_entropy(net(x), y), reg=1.0)

    _, count = count_ops(three_steps)
    assert count.sync_ops == own_host_reads(core.optimizer, 3)  # only Adam's own step counter, a host tensor
    counts = core.take_counts()
    assert counts["switched_off"] > 0 and not counts["nonfinite"]


def test_a_non_finite_gradient_leaves_m_unchanged_and_is_reported():
    core = _element_core(LeNet300100())
    core.build_optimizer("sgd", 0.1)
    before = {key: value.clone() for key, value in core.values.items()}
    core.learn(lambda: core.model(torch.randn(4, 64)).sum() * float("nan"), reg=1.0)
    assert all(torch.equal(before[key], value) for key, value in core.values.items())
    assert core.take_counts()["nonfinite"] and not core.take_counts()["nonfinite"]  # read once, then reset


def test_learning_window_epochs_steps_and_what_it_warns_about():
    from lightning_prune.schedules import LearningWindow

    default = LearningWindow()
    assert [default.learning(epoch, 0, 8, -1) for epoch in range(8)] == [True] * 6 + [False] * 2  # epochs 0..int(6) - 1
    assert [default.learning(0, step, -1, 16) for step in (0, 11, 12, 15)] == [True, True, False, False]
    assert default.learning(0, 0, -1, 1)  # fast_dev_run: one step still learns
    assert default.problem(8, -1) is None and default.problem(-1, 16) is None
    assert "the last of `max_epochs`=1" in default.problem(1, -1)
    assert "until training ends" in default.problem(-1, -1)
    assert "never learns" in LearningWindow(start_epoch=3).problem(3, -1)
    fixed = LearningWindow(1, 2)
    assert [fixed.learning(epoch, 0, 10, -1) for epoch in range(4)] == [False, True, True, False]


def test_the_flat_step_is_the_per_tensor_formula_with_one_network_scale():
    torch.manual_seed(0)
    core = _element_core(LeNet300100())
    core.build_optimizer("sgd", 0.1)
    core.values["fc1"][:5] = -0.3
    core.values["fc1"][5:2000] = -1e-4  # switched off, close enough to return
    core.take_counts()  # counts start here
    grads = {key: torch.randn_like(value) for key, value in core.values.items()}
    magnitudes, before = core.magnitudes(), {key: value.clone() for key, value in core.values.items()}
    signals = torch.cat([loss_signal(grads[key], magnitudes[key]).flatten() for key in core.values])
    expected = {
        key: before[key] - 0.1 * auxiliary_gradient(grads[key], before[key], magnitudes[key], 2.0, "leaky_relu", 0.1,
                                                    scale=signals.abs().mean())
        for key in core.values
    }
    core.step(torch.cat([grads[key].flatten() for key in core.values]), reg=2.0)
    for key, value in core.values.items():
        torch.testing.assert_close(value, expected[key])
    counts = core.take_counts()
    revived = sum(int(((before[key] <= 0) & (core.values[key] > 0)).sum()) for key in before)
    switched_off = sum(int(((before[key] > 0) & (core.values[key] <= 0)).sum()) for key in before)
    assert (counts["revived"], counts["switched_off"]) == (revived, switched_off) and revived > 0 and switched_off > 0
    assert core.take_counts()["revived"] == core.take_counts()["switched_off"] == 0  # read once, then reset


@pytest.mark.parametrize("ste", ["leaky_relu", "linear", "softplus"])
def test_the_fused_sgd_step_is_sgd_on_the_gradient(ste, monkeypatch):
    fused, stepped = (_element_core(torch.manual_seed(0) and LeNet300100()) for _ in range(2))  # the same weights
    for core in (fused, stepped):
        core.ste = ste
        core.build_optimizer("sgd", 0.1)
        core.values["fc1"][:300] = -0.05
    grad = torch.randn(sum(value.numel() for value in fused.values.values()))
    fused.step(grad, reg=1.0)
    monkeypatch.setattr(stepped, "_plain_sgd_lr", lambda: None)  # through SGD.step on the written gradient
    stepped.step(grad, reg=1.0)
    torch.testing.assert_close(fused._flat, stepped._flat)
    assert not torch.equal(fused._flat, torch.full_like(fused._flat, 0.1))


def test_a_pruned_layer_outside_the_held_out_loss_gets_the_pull_alone():
    torch.manual_seed(0)
    net = nn.ModuleDict({"used": nn.Linear(4, 3), "unused": nn.Linear(4, 3)})
    core = AuxiliaryParameters(net, ["used", "unused"], "element", init=1.0)
    core.prepare()
    core.build_optimizer("sgd", 0.1)
    core.learn(lambda: net["used"](torch.randn(8, 4)).pow(2).mean(), reg=1.0, sensitivity=False)
    # no loss signal: ∂M = (0 + s·reg/2)·h̃'/s = reg/2 for switched-on entries
    assert torch.allclose(core.values["unused"], torch.full((3, 4), 1.0 - 0.1 * 0.5))
    assert not torch.allclose(core.values["used"], torch.full((3, 4), 1.0 - 0.1 * 0.5))


class _Allocations(torch.utils._python_dispatch.TorchDispatchMode):
    """Ops that return a fresh tensor of at least ``size`` elements (not a view, not in place, no ``out=``)."""

    def __init__(self, size):
        super().__init__()
        self.size, self.fresh = size, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        name = func.overloadpacket.__name__
        if not (func.is_view or name.endswith("_") or "out" in kwargs) and isinstance(result, torch.Tensor):
            if result.numel() >= self.size:
                self.fresh.append(name)
        return result


def test_bf16_weights_gate_with_a_cast_of_h_kept_until_m_changes():
    net = LeNet300100().to(torch.bfloat16)
    core = AuxiliaryParameters(net, ["fc1"], "element", init=0.1)
    core.prepare()
    x = torch.randn(2, 64, dtype=torch.bfloat16)
    dense = net(x)
    core.values["fc1"][0] = -1.0
    assert not net.fc1.weight[0].any() and not torch.equal(net(x), dense)
    core.values["fc1"][0] = 1.0
    assert torch.equal(net(x), dense)
    with _Allocations(core.values["fc1"].numel()) as allocations:
        net.fc1.weight  # W ⊙ h(M): the product is the only new tensor (no cast of h per forward)
    assert allocations.fresh == ["mul"]


@pytest.mark.parametrize("ste", ["leaky_relu", "linear", "softplus"])
def test_an_auxiliary_step_allocates_nothing_of_the_size_of_m(ste):
    core = _element_core(LeNet300100())
    core.ste = ste
    core.build_optimizer("sgd", 0.1)
    grad = torch.randn(sum(value.numel() for value in core.values.values()))
    core.step(grad, reg=1.0)
    with _Allocations(grad.numel() // 4) as allocations:  # a quarter of M: no single layer is larger here
        core.step(grad, reg=1.0)
    assert allocations.fresh == []
