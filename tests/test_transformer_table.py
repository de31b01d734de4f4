"""The transformer model x property table (docs/transformer_table.md): every cell is one check on one tiny model
(built from its config or class with random weights, nothing downloaded), one parametrized test here, and one cell
of the page, which ``python docs/transformer_table.py --write`` generates from these same checks.

A cell the page marks ✓ is asserted; a cell the page explains is run too and must fail with the reason the page
gives (reported as xfail): a cell that starts to pass, or fails for another reason, fails its test until the page
is regenerated, so the table stays current as attention layouts and gates are added.
"""

from __future__ import annotations

import copy
import functools
import re
import runpy
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from conftest import make_trainer
from lightning_prune import AutoPruneCallback, GatePruningFromScratch, IterativeMagnitude
from lightning_prune.flops import FlopsPredictor, count_flops
from lightning_prune.structure import (
    ChannelGroup, apply_plan, find_channel_groups, refused_channel_groups, restore_structure, structure_record,
)
from pruning_checks import with_batchnorm_statistics
from zoo_models import import_torchvision, small_resnext

transformers = pytest.importorskip("transformers")
timm = pytest.importorskip("timm")
from test_attention_heads import bert, call, gpt2, hf_vit, llama, random_plan, timm_vit  # noqa: E402
from test_gate_pruning import ListLogger  # noqa: E402
from test_huggingface import masked_copy  # noqa: E402

pytestmark = pytest.mark.zoo

ROOT = Path(__file__).resolve().parents[1]
VOCAB, SEQ, CLASSES = 100, 8, 10
CHECK = "✓"


class Missing(AssertionError):
    """A property the model does not have, with the reason the table shows."""


# ---------------------------------------------------------------- the models


def t5() -> nn.Module:
    config = transformers.T5Config(d_model=32, d_ff=64, d_kv=8, num_heads=4, num_layers=2, num_decoder_layers=2,
                                   vocab_size=VOCAB, decoder_start_token_id=0)
    return transformers.T5ForConditionalGeneration(config)


class TransformerEncoderClassifier(nn.Module):
    """``nn.TransformerEncoder`` (2 layers, width 32, 4 heads) over a sequence of vectors, mean-pooled into a
    ``Linear`` classifier."""

    def __init__(self) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(d_model=32, nhead=4, dim_feedforward=64, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.head = nn.Linear(32, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x).mean(1))


def _torchvision(name: str, *args, **kwargs) -> Callable[[], nn.Module]:
    return lambda: getattr(import_torchvision().models, name)(*args, num_classes=CLASSES, **kwargs)


def regnet() -> nn.Module:
    """regnet_x_400mf's design space (``BlockParams.from_init_params``, grouped convs of width 4), 4 blocks."""
    from torchvision.models.regnet import BlockParams

    return _torchvision("RegNet", BlockParams.from_init_params(depth=4, w_0=8, w_a=8.0, w_m=2.0, group_width=4))()


def convnext() -> nn.Module:
    """convnext_tiny's blocks, two stages of one block (widths 16 and 32)."""
    from torchvision.models.convnext import CNBlockConfig

    return _torchvision("ConvNeXt", [CNBlockConfig(16, 32, 1), CNBlockConfig(32, None, 1)])()


def _timm(name: str, **kwargs) -> Callable[[], nn.Module]:
    return lambda: timm.create_model(name, pretrained=False, num_classes=CLASSES, **kwargs)


def token_inputs(batch: int) -> dict[str, torch.Tensor]:
    mask = torch.ones(batch, SEQ, dtype=torch.long)
    mask[0, -2:] = 0  # padding: the attention mask matters
    return {"input_ids": torch.randint(0, VOCAB, (batch, SEQ)), "attention_mask": mask}


def image_inputs(side: int, key: str = "x") -> Callable[[int], dict[str, torch.Tensor]]:
    return lambda batch: {key: torch.randn(batch, 3, side, side)}


@dataclass(frozen=True)
class Model:
    """One row: how to build the model, its keyword inputs for a batch of ``n``, and its training labels."""

    label: str
    build: Callable[[], nn.Module]
    inputs: Callable[[int], dict[str, torch.Tensor]]
    labels: str  # "classes": one class per sample, cross-entropy; "tokens": the model's own loss on its input ids
    huggingface: bool = False
    attention: bool = True
    classes: int = CLASSES

    def batch(self, n: int) -> dict[str, torch.Tensor]:
        """Inputs and labels (``labels``: a Hugging Face model computes its loss from them)."""
        inputs = self.inputs(n)
        if self.labels == "tokens":
            return {**inputs, "labels": inputs["input_ids"].clone()}
        return {**inputs, "labels": torch.randint(0, self.classes, (n,))}


def t5_inputs(batch: int) -> dict[str, torch.Tensor]:
    return {**token_inputs(batch), "decoder_input_ids": torch.randint(0, VOCAB, (batch, SEQ))}


MODELS: dict[str, Model] = {
    "hf_bert": Model("HF `BertForSequenceClassification`", bert, token_inputs, "classes", huggingface=True, classes=2),
    "hf_gpt2": Model("HF `GPT2LMHeadModel`", gpt2, token_inputs, "tokens", huggingface=True),
    "hf_llama": Model("HF `LlamaForCausalLM` (4 heads, 2 kv heads)", llama, token_inputs, "tokens", huggingface=True),
    "hf_vit": Model("HF `ViTForImageClassification`", hf_vit, image_inputs(16, "pixel_values"), "classes", huggingface=True,
                    classes=3),
    "hf_t5": Model("HF `T5ForConditionalGeneration`", t5, t5_inputs, "tokens", huggingface=True),
    "timm_vit_tiny": Model("timm `vit_tiny_patch16_224`", timm_vit, image_inputs(32), "classes", classes=5),
    "timm_deit_tiny": Model("timm `deit_tiny_patch16_224`", _timm("deit_tiny_patch16_224", img_size=32, depth=2),
                            image_inputs(32), "classes"),
    "timm_swin_tiny": Model("timm `swin_tiny_patch4_window7_224`",
                            _timm("swin_tiny_patch4_window7_224", img_size=32, window_size=4, embed_dim=32, depths=(1, 1),
                                  num_heads=(2, 4)), image_inputs(32), "classes"),
    "tv_vit_b_16": Model("torchvision `VisionTransformer` (vit_b_16's class)",
                         _torchvision("VisionTransformer", image_size=32, patch_size=16, num_layers=2, num_heads=4,
                                      hidden_dim=32, mlp_dim=64), image_inputs(32), "classes"),
    "tv_swin_t": Model("torchvision `SwinTransformer` (swin_t's class)",
                       _torchvision("SwinTransformer", patch_size=[4, 4], embed_dim=32, depths=[1, 1], num_heads=[2, 4],
                                    window_size=[4, 4]), image_inputs(32), "classes"),
    "nn_transformer_encoder": Model("`nn.TransformerEncoder`", TransformerEncoderClassifier,
                                    lambda batch: {"x": torch.randn(batch, SEQ, 32)}, "classes"),
    "tv_resnext50_32x4d": Model("torchvision `resnext50_32x4d`'s class (8 conv groups of 4, one block a stage)",
                                small_resnext, image_inputs(32), "classes", attention=False),
    "tv_regnet_x_400mf": Model("torchvision `RegNet` (regnet_x_400mf's design space)", regnet, image_inputs(32), "classes",
                               attention=False),
    "tv_convnext_tiny": Model("torchvision `ConvNeXt` (convnext_tiny's blocks)", convnext, image_inputs(32), "classes",
                              attention=False),
}


@functools.cache
def discovered(name: str) -> tuple[nn.Module, dict[str, torch.Tensor], list[ChannelGroup], list]:
    """The model (eval mode, BatchNorm statistics set), its example input, its groups with heads, and the refused ones."""
    torch.manual_seed(0)
    model = with_batchnorm_statistics(MODELS[name].build())
    x = MODELS[name].inputs(2)
    return model, x, find_channel_groups(model, x, heads=True), refused_channel_groups(model, x, heads=True)


def _plan(groups: list[ChannelGroup]) -> dict[int, torch.Tensor]:
    return random_plan(groups, 0)


# ---------------------------------------------------------------- the properties


def heads_pruned(name: str) -> None:
    """Every attention module's heads form a group, and removing some of them leaves a model that runs."""
    model, x, groups, refused = discovered(name)
    heads = [group for group in groups if group.heads is not None]
    left_out = [r for r in refused if r.size == 0 or "heads" in r.reason]
    if left_out:
        raise Missing(f"{len(heads)} head groups; `{left_out[0].root}` refused: {left_out[0].reason}")
    if not heads:
        kinds = sorted({type(m).__name__ for m in model.modules() if "Attention" in type(m).__name__})
        raise Missing(f"no head layout for {', '.join(f'`{kind}`' for kind in kinds)} (`HEAD_LAYOUTS`)")
    pruned = copy.deepcopy(model)
    apply_plan(pruned, groups, {g.index: torch.arange(0, g.size, 2) for g in heads}, x)
    with torch.no_grad():
        assert call(pruned, x).shape == call(model, x).shape


def widths_pruned(name: str) -> None:
    """At least one group of layer widths (MLP widths, conv channels) besides the heads."""
    model, x, groups, refused = discovered(name)
    if not any(group.heads is None for group in groups):
        raise Missing(f"no width group; `{refused[0].root}` refused: {refused[0].reason}" if refused else "no width group")


def _randomly_pruned(name: str) -> tuple:
    """The model, its input, its groups, a random plan over every group and a copy pruned to that plan."""
    model, x, groups, _ = discovered(name)
    if not groups:
        raise Missing("no channel group")
    plan = _plan(groups)
    pruned = copy.deepcopy(model)
    apply_plan(pruned, groups, plan, x)
    return model, x, groups, plan, pruned


def predicted_equals_recount(name: str) -> None:
    """The exact predictor's FLOPs of a random plan over every group equal fvcore's recount of the pruned model."""
    model, x, groups, plan, pruned = _randomly_pruned(name)
    predicted, recount = FlopsPredictor(model, x, groups).predict(plan), count_flops(pruned, x).total
    assert predicted == recount, f"predicted {predicted} != recount {recount}"


def masked_equals_pruned(name: str) -> None:
    """A random plan over every group: the masked model computes what the physically pruned one computes."""
    model, x, groups, plan, pruned = _randomly_pruned(name)
    with torch.no_grad():
        torch.testing.assert_close(call(pruned, x), call(masked_copy(model, groups, plan), x), rtol=1e-4, atol=1e-5)


def record_round_trip(name: str) -> None:
    """A pruned model's saved ``state_dict`` (what a Lightning checkpoint holds) loads strictly into a fresh dense
    model reshaped by the structure record, which then computes the same."""
    model, x, groups, _ = discovered(name)
    if not groups:
        raise Missing("no channel group")
    pruned = copy.deepcopy(model)
    record = apply_plan(pruned, groups, _plan(groups), x)
    with tempfile.TemporaryDirectory() as directory:
        torch.save(pruned.state_dict(), Path(directory) / "model.pt")
        state = torch.load(Path(directory) / "model.pt")
    fresh = with_batchnorm_statistics(MODELS[name].build())
    restore_structure(fresh, record)
    fresh.load_state_dict(state)
    assert structure_record(fresh) == record
    with torch.no_grad():
        torch.testing.assert_close(call(fresh.eval(), x), call(pruned, x))


def from_pretrained_round_trip(name: str) -> None:
    """``save_pretrained`` of the pruned model, then ``from_pretrained`` of that directory, computes the same."""
    model, x, groups, _ = discovered(name)
    if not groups:
        raise Missing("no channel group")
    pruned = copy.deepcopy(model)
    apply_plan(pruned, groups, _plan(groups), x)
    with tempfile.TemporaryDirectory() as directory:
        pruned.save_pretrained(directory)
        try:
            loaded = type(model).from_pretrained(directory).eval()
        except (RuntimeError, ValueError) as error:
            if "mismatched_sizes" not in str(error):
                raise
            raise Missing("`from_pretrained` stops at a size mismatch: the config holds one width and one head count "
                          "for every layer (load through the structure record instead)") from error
    with torch.no_grad():
        torch.testing.assert_close(call(loaded, x), call(pruned, x))


class KeywordTask(pl.LightningModule):
    """The usual Hugging Face LightningModule, for any model: ``forward(**inputs)``, a dict example input (passed as
    keyword arguments); a Hugging Face model's own loss, else cross-entropy on the ``labels``."""

    def __init__(self, name: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.spec = MODELS[name]
        self.model = self.spec.build()
        self.example_input_array = self.spec.inputs(1)

    def forward(self, **inputs: torch.Tensor):  # noqa: ANN201 - a tensor or a ModelOutput
        return self.model(**inputs)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        if self.spec.huggingface:
            return self(**batch).loss
        inputs = {key: value for key, value in batch.items() if key != "labels"}
        return F.cross_entropy(self(**inputs), batch["labels"])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def loader(self, batches: int) -> DataLoader:
        torch.manual_seed(1)
        return DataLoader([self.spec.batch(4) for _ in range(batches)], batch_size=None)


def _callback_groups(callback: pl.Callback) -> list[ChannelGroup]:
    """The channel groups a callback's plan indexes (``callback.figures.groups`` for all three)."""
    return callback.figures.groups


class Units(pl.Callback):
    """Goes before the pruning callback: at the end of fit, the groups it prunes (before it lets go of them)."""

    def __init__(self, pruning: pl.Callback) -> None:
        self.pruning, self.groups = pruning, []

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.groups = _callback_groups(self.pruning)


def fit_check(make: Callable[[KeywordTask], pl.Callback], epochs: int) -> Callable[[str], None]:
    """A short fit of ``make(module)``'s callback on a keyword-forward module: it removes structure, its last reported
    FLOPs ratio equals fvcore's recount of the pruned model, the model still runs, and where the model's heads are
    groups, the callback prunes heads with the widths."""

    def check(name: str) -> None:
        module, logger = KeywordTask(name), ListLogger()
        dense, example = copy.deepcopy(module.model), module.example_input_array
        callback = make(module)
        units = Units(callback)
        with tempfile.TemporaryDirectory() as directory:
            make_trainer(Path(directory), [units, callback], max_epochs=epochs, logger=logger).fit(module, module.loader(3))
        recount = count_flops(module.model, example).total / count_flops(dense, example).total
        reported = logger.values("prune/flops_ratio")
        assert reported, "no FLOPs ratio reported"
        assert reported[-1] == pytest.approx(recount, rel=1e-9) and recount < 1, (reported[-1], recount)
        module.eval()
        with torch.no_grad():
            assert torch.isfinite(call(module.model, example)).all()
        try:
            heads_pruned(name)
        except Missing:
            return  # the model's heads are no groups: widths are all any callback can prune
        if not any(group.heads is not None for group in units.groups):
            raise Missing("prunes widths only: no head among its units")

    return check


PROPERTIES: dict[str, tuple[str, Callable[[str], None]]] = {
    "heads": ("heads pruned", heads_pruned),
    "widths": ("widths pruned", widths_pruned),
    "flops": ("predicted FLOPs == recount", predicted_equals_recount),
    "masked": ("masked ≡ pruned", masked_equals_pruned),
    "magnitude": ("`IterativeMagnitude` channel fit", fit_check(
        lambda module: IterativeMagnitude(sparsity=0.5, schedule="one_shot", granularity="channel", physical=True,
                                          monitor=None, verbose=False), epochs=1)),
    "gates": ("`GatePruningFromScratch` fit", fit_check(
        lambda module: GatePruningFromScratch(flops_ratio=0.8, gate_epochs=1, select="last", verbose=False), epochs=2)),
    "autoprune": ("`AutoPruneCallback` channel fit", fit_check(
        lambda module: AutoPruneCallback(granularity="channel", target_sparsity=0.5, physical=True,
                                         aux_dataloader=module.loader(1), verbose=False), epochs=1)),
    "record": ("save/load (structure record)", record_round_trip),
    "from_pretrained": ("`save_pretrained` → `from_pretrained`", from_pretrained_round_trip),
}


def applies(name: str, prop: str) -> Optional[str]:
    """Why ``prop`` does not apply to model ``name`` (the table shows it), or ``None``."""
    if prop == "heads" and not MODELS[name].attention:
        return "no attention"
    if prop == "from_pretrained" and not MODELS[name].huggingface:
        return "not a Hugging Face model"
    return None


def outcome(name: str, prop: str) -> str:
    """The cell: ✓ where the property holds, else the reason (the check's explanation, or its error's first line)."""
    try:
        PROPERTIES[prop][1](name)
    except Missing as missing:
        return _one_line(str(missing))
    except Exception as error:  # noqa: BLE001 - an error is the cell's reason
        return _one_line(f"{type(error).__name__}: {str(error).strip() or 'no message'}")
    return CHECK


def _one_line(text: str, limit: int = 400) -> str:
    """The first line, without the traced op numbers that differ from run to run, pipes escaped."""
    line = " ".join(text.strip().splitlines()[0].split()).replace("|", "\\|")
    line = re.sub(r"(_[A-Za-z]+Op)_\d+", r"\1", line)
    return line if len(line) <= limit else line[: limit - 1] + "…"


TABLE = runpy.run_path(str(ROOT / "docs" / "transformer_table.py"))
CELLS = [(name, prop) for name in MODELS for prop in PROPERTIES if applies(name, prop) is None]


@pytest.fixture(scope="module")
def page() -> dict[tuple[str, str], str]:
    return TABLE["read_page"]({title: prop for prop, (title, _) in PROPERTIES.items()})


@pytest.mark.parametrize("name, prop", CELLS, ids=[f"{name}-{prop}" for name, prop in CELLS])
def test_cell(name: str, prop: str, page) -> None:
    recorded = page.get((name, prop))
    assert recorded is not None, f"docs/transformer_table.md has no cell {name}/{prop}: {TABLE['COMMAND']}"
    if recorded == CHECK:
        PROPERTIES[prop][1](name)  # asserts the property: its own error shows
        return
    found = outcome(name, prop)
    assert found != CHECK, f"{name}/{prop} now holds, the page explains it ({recorded!r}): {TABLE['COMMAND']}"
    assert found == recorded, f"{name}/{prop} fails for another reason than the page's: {found!r}: {TABLE['COMMAND']}"
    pytest.xfail(recorded)
