"""Hugging Face conventions: keyword forwards (``model(**batch)``), ``ModelOutput``s holding caches, attention
masks and GPT-2's ``Conv1D``, through the core functions and the callbacks. Tiny models built from configs
(random weights, nothing downloaded)."""

from __future__ import annotations

import copy

import pytest
import pytorch_lightning as pl
import torch
from fvcore.nn import FlopCountAnalysis
from torch import nn
from torch.utils.data import DataLoader

from lightning_prune import AutoPruneCallback, GatePruningFromScratch, IterativeMagnitude
from lightning_prune.flops import FlopsPredictor, count_flops, sdpa_flop_jit
from lightning_prune.inputs import ModelInput
from lightning_prune.structure import (
    apply_plan, channel_masks, find_channel_groups, restore_structure, structure_from_state_dict, structure_record,
)

transformers = pytest.importorskip("transformers")
from transformers.pytorch_utils import Conv1D  # noqa: E402

pytestmark = pytest.mark.zoo

VOCAB, SEQ = 100, 8


def gpt2() -> nn.Module:
    config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=32)
    return transformers.GPT2LMHeadModel(config)


def bert() -> nn.Module:
    config = transformers.BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=VOCAB
    )
    return transformers.BertForSequenceClassification(config)


def tokens(batch: int = 2, labels: bool = False, classes: bool = False) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, VOCAB, (batch, SEQ))
    mask = torch.ones(batch, SEQ, dtype=torch.long)
    mask[0, -2:] = 0  # padding: the attention mask matters
    batch_ = {"input_ids": ids, "attention_mask": mask}
    if labels:
        batch_["labels"] = torch.randint(0, 2, (batch,)) if classes else ids.clone()
    return batch_


class KeywordModule(pl.LightningModule):
    """The usual Hugging Face LightningModule: ``forward(**batch)``, the loss from the model's output, no
    ``example_input_array``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, **batch: torch.Tensor):  # noqa: ANN201 - a ModelOutput
        return self.model(**batch)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self(**batch).loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self.log("val/loss", self(**batch).loss)

    def configure_optimizers(self):  # noqa: ANN201
        return torch.optim.SGD(self.parameters(), lr=0.01)


def loader(classes: bool, n: int = 4) -> DataLoader:
    """Dict batches of 4 sequences: input_ids, attention_mask, labels."""
    return DataLoader([tokens(4, labels=True, classes=classes) for _ in range(n)], batch_size=None)


def conv1d_weights(model: nn.Module) -> list[torch.Tensor]:
    return [module.weight for module in model.modules() if isinstance(module, Conv1D)]


def masked_copy(model: nn.Module, groups, plan) -> nn.Module:
    masked = copy.deepcopy(model)
    masks = channel_masks(masked, groups, plan)
    with torch.no_grad():
        for name, parameter in masked.named_parameters():
            if name in masks:
                parameter.mul_(masks[name])
    return masked


# ---------------------------------------------------------------- core functions


class _Positional(nn.Module):
    """What a user would write for fvcore by hand: positional tensors in, the logits out."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits


@pytest.mark.parametrize("build", [bert, gpt2])
def test_count_flops_of_keyword_arguments_equals_fvcore_on_a_positional_wrapper(build) -> None:
    model, batch = build().eval(), tokens()
    with torch.no_grad():
        expected = FlopCountAnalysis(_Positional(model), (batch["input_ids"], batch["attention_mask"]))
        expected.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("none")
        expected.set_op_handle("aten::scaled_dot_product_attention", sdpa_flop_jit)  # as count_flops counts attention
        expected = int(expected.total())
    assert expected > 0
    assert count_flops(model, batch).total == expected
    mixed = ModelInput((batch["input_ids"],), {"attention_mask": batch["attention_mask"]})
    assert count_flops(model, mixed).total == expected
    by_module = count_flops(model, batch).by_module
    assert by_module[""] == expected and by_module["classifier" if build is bert else "lm_head"] > 0  # model's own names


def test_gpt2_mlp_widths_are_channel_groups_through_conv1d_with_a_cache_in_the_output() -> None:
    torch.manual_seed(0)
    model, batch = gpt2().eval(), {**tokens(), "use_cache": True}
    groups = find_channel_groups(model, batch)
    assert [(group.root, group.size) for group in groups] == [
        ("transformer.h.0.mlp.c_fc", 128), ("transformer.h.1.mlp.c_fc", 128)
    ]
    assert {member.module for member in groups[0].members} >= {"transformer.h.0.mlp.c_fc", "transformer.h.0.mlp.c_proj"}
    plan = {group.index: torch.arange(0, group.size, 3) for group in groups}
    predicted = FlopsPredictor(model, batch, groups).predict(plan)
    masked, pruned = masked_copy(model, groups, plan), copy.deepcopy(model)
    apply_plan(pruned, groups, plan, batch)
    fc = pruned.transformer.h[0].mlp.c_fc
    assert fc.weight.shape == (32, 43) and fc.nf == 43 and pruned.transformer.h[0].mlp.c_proj.weight.shape == (43, 32)
    torch.testing.assert_close(pruned(**batch).logits, masked(**batch).logits, rtol=1e-5, atol=1e-6)
    assert predicted == count_flops(pruned, batch).total < count_flops(model, batch).total
    generated = pruned.generate(**tokens(), max_new_tokens=2, do_sample=False, pad_token_id=0)
    assert generated.shape == (2, SEQ + 2)
    for record in (structure_record(pruned), structure_from_state_dict(gpt2(), pruned.state_dict())):
        fresh = gpt2().eval()
        restore_structure(fresh, record)  # a dense model reshaped to the record loads the pruned weights strictly
        fresh.load_state_dict(pruned.state_dict())
        torch.testing.assert_close(fresh(**batch).logits, pruned(**batch).logits)


# ---------------------------------------------------------------- callbacks on a keyword-forward module


def test_element_pruning_prunes_gpt2_conv1d_weights(trainer_factory) -> None:
    module = KeywordModule(gpt2())
    pruning = IterativeMagnitude(sparsity=0.5, schedule="one_shot", monitor=None, verbose=False)
    trainer_factory([pruning], max_epochs=1).fit(module, loader(classes=False), loader(classes=False, n=1))
    weights = conv1d_weights(module.model)
    assert len(weights) == 8 and set(pruning.layers) >= {"model.transformer.h.0.mlp.c_fc", "model.transformer.h.1.attn.c_attn"}
    zeros = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
    assert zeros > 0.3  # global magnitude: the Conv1D weights carry most of the pruned entries
    assert pruning.figures.dense_flops is not None  # FLOPs counted through forward(**batch)


@pytest.mark.parametrize("build, classes", [(gpt2, False), (bert, True)])
def test_physical_channel_pruning_shrinks_mlp_widths_and_the_model_still_runs(trainer_factory, build, classes) -> None:
    module = KeywordModule(build())
    pruning = IterativeMagnitude(sparsity=0.5, schedule="one_shot", granularity="channel", physical=True, monitor=None, verbose=False)
    trainer_factory([pruning], max_epochs=1).fit(module, loader(classes), loader(classes, n=1))
    widths = [layer.weight.shape[1] if isinstance(layer, Conv1D) else layer.out_features
              for name, layer in module.model.named_modules() if name.endswith(("mlp.c_fc", "intermediate.dense"))]
    assert len(widths) == 2 and all(width < (128 if build is gpt2 else 64) for width in widths)
    batch = tokens(labels=True, classes=classes)
    module.eval()
    assert torch.isfinite(module(**batch).loss)
    assert count_flops(module, batch).total < pruning.figures.dense_flops.total * 2  # counted per batch of 2
    if build is gpt2:
        assert module.model.generate(**tokens(), max_new_tokens=2, do_sample=False, pad_token_id=0).shape == (2, SEQ + 2)


def test_a_physically_pruned_gpt2_resumes_from_its_checkpoint_and_still_generates(trainer_factory, tmp_path, recwarn) -> None:
    """``fit(ckpt_path=...)`` of a fresh, dense GPT-2 module reshapes it to the checkpoint's pruned widths (Conv1D's
    weight is ``(in, out)``), trains on, and the result still generates; the schedule that ran before the checkpoint
    counts as run (no "schedule incomplete" warning)."""
    module = KeywordModule(gpt2())
    make = lambda: IterativeMagnitude(sparsity=0.5, schedule="one_shot", granularity="channel", physical=True, monitor=None, verbose=False)  # noqa: E731
    trainer = trainer_factory([make()], max_epochs=1)
    trainer.fit(module, loader(False), loader(False, n=1))
    trainer.save_checkpoint(tmp_path / "pruned.ckpt")
    pruned = {name: parameter.shape for name, parameter in module.state_dict().items()}

    resumed = KeywordModule(gpt2())
    trainer = trainer_factory([make()], max_epochs=2)
    trainer.fit(resumed, loader(False), loader(False, n=1), ckpt_path=str(tmp_path / "pruned.ckpt"))
    assert trainer.global_step == 8  # one more epoch of 4 batches, from where the first fit ended
    assert not [w for w in recwarn if "schedule incomplete" in str(w.message)]
    assert {name: parameter.shape for name, parameter in resumed.state_dict().items()} == pruned
    assert any(shape != resumed_shape for shape, resumed_shape in zip(
        (p.shape for p in KeywordModule(gpt2()).state_dict().values()), pruned.values()))  # it was pruned at all
    resumed.eval()
    assert resumed.model.generate(**tokens(), max_new_tokens=2, do_sample=False, pad_token_id=0).shape == (2, SEQ + 2)


def test_a_dict_example_input_array_is_keyword_arguments(trainer_factory) -> None:
    module = KeywordModule(bert())
    module.example_input_array = tokens(1)
    pruning = IterativeMagnitude(sparsity=0.5, schedule="one_shot", granularity="channel", monitor=None, verbose=False)
    trainer_factory([pruning], max_epochs=1).fit(module, loader(classes=True))
    assert pruning.figures.example.kwargs.keys() == {"input_ids", "attention_mask"}
    assert pruning.figures.dense_flops.total == count_flops(module.model, tokens(1)).total
    assert len(pruning.figures.predictor.sizes) == 5  # groups: two layers' heads and MLP widths, the pooler


def test_example_input_fn_returning_a_dict_calls_forward_with_keywords(trainer_factory) -> None:
    module = KeywordModule(bert())
    pick = lambda batch: {key: batch[key] for key in ("input_ids", "attention_mask")}  # noqa: E731 - drop the labels
    pruning = IterativeMagnitude(sparsity=0.5, schedule="one_shot", granularity="channel", monitor=None, verbose=False,
                                 example_input_fn=pick)
    trainer_factory([pruning], max_epochs=1).fit(module, loader(classes=True))
    assert pruning.figures.example.kwargs.keys() == {"input_ids", "attention_mask"}
    assert pruning.figures.example.kwargs["input_ids"].shape == (1, SEQ)  # FLOPs per sample


def test_gate_pruning_meets_its_flops_target_on_a_keyword_forward(trainer_factory) -> None:
    module = KeywordModule(bert())
    dense = copy.deepcopy(module.model)
    pruning = GatePruningFromScratch(flops_ratio=0.9, gate_epochs=1, gate_position="conv", select="last", verbose=False)
    trainer_factory([pruning], max_epochs=2).fit(module, loader(classes=True))
    ratio = count_flops(module.model, tokens(1)).total / count_flops(dense, tokens(1)).total
    assert ratio == pytest.approx(pruning.reached_flops_ratio, abs=1e-9) and ratio <= 0.9
    assert torch.isfinite(module(**tokens(labels=True, classes=True)).loss)


def test_autoprune_switches_off_gpt2_mlp_channels_as_conv1d_columns(trainer_factory) -> None:
    module = KeywordModule(gpt2())
    callback = AutoPruneCallback(granularity="channel", aux_dataloader=loader(classes=False, n=2), init=0.1, aux_lr=0.1,
                                 reg=3.0, verbose=False)
    trainer_factory([callback], max_epochs=1).fit(module, loader(classes=False))
    assert callback.figures.example.kwargs.keys() == {"input_ids", "attention_mask", "labels"}
    fc = module.model.transformer.h[0].mlp.c_fc
    off = (fc.weight == 0).all(0)  # Conv1D: an output channel is a weight column (and a bias entry)
    assert off.any() and bool((fc.bias[off] == 0).all())
    model, batch = module.model.eval(), tokens()
    groups = find_channel_groups(model, batch)
    layers = dict(model.named_modules())
    plan = {group.index: (layers[group.root].weight != 0).any(0).nonzero().flatten() for group in groups}  # on columns
    pruned = copy.deepcopy(model)
    apply_plan(pruned, groups, plan, batch)  # AutoPrune gates c_fc's outputs; GELU(0) = 0 silences c_proj's rows
    assert pruned.transformer.h[0].mlp.c_fc.nf == 128 - int(off.sum())
    torch.testing.assert_close(pruned(**batch).logits, model(**batch).logits, rtol=1e-5, atol=1e-6)


def test_a_module_holding_torchmetrics_metrics_keeps_its_channel_groups_once_conv1d_is_known():
    """With transformers imported, discovery registers a pruner for ``Conv1D``; torch-pruning then compares every
    module with ``==`` against it, which torchmetrics' ``Metric`` overloads: the LightningModule's metrics must not
    make its layers count as left out (they did: the demo classifier traced to no group at all)."""
    from lightning_prune import ImageClassifier

    model = ImageClassifier("lenet5")
    assert any(type(module).__module__.startswith("torchmetrics") for module in model.modules())
    groups = find_channel_groups(model, torch.randn(1, 1, 8, 8))
    assert len(groups) == 4  # conv1, conv2, fc1, fc2 (fc3 is the output)
