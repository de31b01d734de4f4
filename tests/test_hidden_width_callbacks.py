"""The hidden (residual-stream) width in the callbacks: ``IterativeMagnitude(granularity="channel", hidden=True)``
ranks the hidden group with the heads and channels, keeps each norm normalising over the kept channels while the
model is masked (so the masked model computes the pruned one), removes the hidden width at the end of fit (the
model's ``config.hidden_size`` following), reports FLOPs equal to fvcore's recount, and resumes from a mid-run
checkpoint to the uninterrupted result. Tiny Hugging Face BERT/ViT configs in a keyword-forward LightningModule,
random weights, nothing downloaded."""

from __future__ import annotations

import copy

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader

from lightning_prune import IterativeMagnitude
from lightning_prune.flops import count_flops
from lightning_prune.magnitude import ChannelMagnitude
from lightning_prune.structure.groups import is_norm

transformers = pytest.importorskip("transformers")
from test_gate_pruning import ListLogger  # noqa: E402
from test_hidden_width import LAYERS, WIDTH, bert, gpt2, hf_vit, llama  # noqa: E402
from test_huggingface import KeywordModule, loader, tokens  # noqa: E402

pytestmark = pytest.mark.zoo


def pixel_loader(n: int = 4) -> DataLoader:
    """Dict batches of 4 images of 16x16 with labels of 3 classes (HF ViT's keyword forward)."""
    return DataLoader([{"pixel_values": torch.randn(4, 3, 16, 16), "labels": torch.randint(0, 3, (4,))} for _ in range(n)],
                      batch_size=None)


# name -> (builder, training batches, a batch for comparing outputs, the model's norms: two a layer and one more)
MODELS = {
    "bert": (bert, lambda: loader(classes=True), lambda: tokens(2)),
    "hf_vit": (hf_vit, pixel_loader, lambda: {"pixel_values": torch.randn(2, 3, 16, 16)}),
    "gpt2": (gpt2, lambda: loader(classes=False), lambda: tokens(2)),
    "llama": (llama, lambda: loader(classes=False), lambda: tokens(2)),
}
NORMS = 2 * LAYERS + 1


def norm_hooks(model: nn.Module) -> int:
    """How many forward hooks the model's LayerNorms and RMSNorms hold."""
    return sum(len(m._forward_hooks) for m in model.modules() if is_norm(m))


class _Snapshot(pl.Callback):
    """Copies the masked model (with its norm hooks) at the end of fit, before a later ``on_fit_end`` removes channels."""

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        (pruning,) = [callback for callback in trainer.callbacks if isinstance(callback, IterativeMagnitude)]
        self.groups = pruning.pruner.channels.groups
        self.hooks = norm_hooks(pl_module.model)
        self.model = copy.deepcopy(pl_module.model)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_a_short_fit_removes_hidden_channels_the_masked_model_computed(trainer_factory, name) -> None:
    """The hidden width goes with the heads and MLP widths (GPT-2's ``Conv1D`` and tied ``lm_head``, Llama's RMSNorms): ``config.hidden_size`` follows the embedding; the masked
    model of the last event (norms over the kept channels) gives the pruned model's outputs; the reported FLOPs ratio
    is fvcore's recount; no norm hook is left on the user's model."""
    build, batches, batch = MODELS[name]
    torch.manual_seed(0)
    module, logger, snapshot = KeywordModule(build()), ListLogger(), _Snapshot()
    dense = copy.deepcopy(module.model)
    pruning = IterativeMagnitude(sparsity=0.5, schedule="one_shot", granularity="channel", physical=True, hidden=True,
                                 monitor=None, verbose=False)
    trainer_factory([snapshot, pruning], max_epochs=1, logger=logger).fit(module, batches())
    hidden = [group for group in snapshot.groups if group.hidden]
    assert len(hidden) == 1 and hidden[0].size == WIDTH
    width = module.model.get_input_embeddings()
    width = width.embedding_dim if isinstance(width, nn.Embedding) else width.projection.out_channels
    assert module.model.config.hidden_size == width < WIDTH  # hidden channels went, the config follows
    assert snapshot.hooks == NORMS and norm_hooks(module.model) == 0  # every norm hooked while masked, none after
    example = pruning.figures.example
    (reported,) = logger.values("prune/flops_ratio")
    assert reported == count_flops(module.model, example).total / count_flops(dense, example).total < 1
    x = batch()
    with torch.no_grad():
        pruned = module.model.eval()(**x).logits
        torch.testing.assert_close(snapshot.model.eval()(**x).logits, pruned, rtol=1e-5, atol=1e-5)


def bert_without_dropout() -> nn.Module:
    """BERT whose training steps draw no random numbers (a resumed run does not continue the RNG's stream)."""
    return transformers.BertForSequenceClassification(transformers.BertConfig(
        hidden_size=WIDTH, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=100,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))


def fit_saving(directory, max_epochs: int = 5, ckpt_path=None) -> tuple[nn.Module, IterativeMagnitude]:
    """Events at epochs 1 and 3, a checkpoint at the end of every epoch; the same batches in every run."""
    pl.seed_everything(0)
    module, batches = KeywordModule(bert_without_dropout()), loader(classes=True)
    pruning = IterativeMagnitude(sparsity=0.5, schedule="iterative", start_epoch=1, end_epoch=3, frequency=2, granularity="channel",
                                 physical=True, hidden=True, monitor=None, verbose=False)
    checkpoint = ModelCheckpoint(dirpath=directory, save_top_k=-1, every_n_epochs=1, filename="{epoch}")
    from conftest import make_trainer

    make_trainer(directory, [pruning, checkpoint], max_epochs=max_epochs, enable_checkpointing=True).fit(
        module, batches, ckpt_path=ckpt_path)
    return module.model, pruning


def test_a_mid_run_checkpoint_resumes_to_the_uninterrupted_result(tmp_path) -> None:
    """The checkpoint after epoch 1 holds a masked model with a hidden plan: the resumed run restores the masks and the
    norm hooks before epoch 2 trains (no event there renews them; without them its steps would differ) and ends with the
    uninterrupted run's weights."""
    uninterrupted, _ = fit_saving(tmp_path / "a")
    resumed, pruning = fit_saving(tmp_path / "b", ckpt_path=tmp_path / "a" / "epoch=1.ckpt")
    assert resumed.config.hidden_size == uninterrupted.config.hidden_size < WIDTH
    assert pruning.last_event == 3
    state = resumed.state_dict()
    for key, value in uninterrupted.state_dict().items():
        torch.testing.assert_close(state[key], value, rtol=0, atol=0, msg=key)


class _FailAfterFirstEvent(pl.Callback):
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch == 1:
            self.hooks = norm_hooks(pl_module.model)
            raise RuntimeError("interrupted")


def test_an_exception_leaves_no_norm_hook_on_the_users_model(trainer_factory) -> None:
    torch.manual_seed(0)
    module, failing = KeywordModule(bert()), _FailAfterFirstEvent()
    pruning = IterativeMagnitude(sparsity=0.5, schedule="iterative", start_epoch=1, end_epoch=3, frequency=2,
                                 granularity="channel", physical=True, hidden=True, monitor=None, verbose=False)
    with pytest.raises(RuntimeError, match="interrupted"):
        trainer_factory([pruning, failing], max_epochs=5).fit(module, loader(classes=True))
    assert failing.hooks == NORMS and norm_hooks(module.model) == 0


def test_loose_parameters_count_in_the_hidden_channels_score() -> None:
    """A hidden channel is scored by all that writes it into the residual stream: the patch projection's rows and the
    class token and position embedding (loose parameters), relative to the group's mean like every group."""
    torch.manual_seed(0)
    model = hf_vit().eval()
    channels = ChannelMagnitude.for_model(model, {"pixel_values": torch.randn(1, 3, 16, 16)},
                                          [n for n, m in model.named_modules() if isinstance(m, nn.Linear | nn.Conv2d)],
                                          "l1", 0.99, hidden=True)
    (index,) = [group.index for group in channels.groups if group.hidden]
    before = channels.scores(model)
    with torch.no_grad():
        model.vit.embeddings.cls_token[..., 5] = 100.0
    after = channels.scores(model)
    assert all(score.mean().item() == pytest.approx(1.0) for score in after)  # every group on the same scale
    assert int(after[index].argmax()) == 5 and int(before[index].argmax()) != 5
    assert all(torch.equal(a, b) for g, (a, b) in enumerate(zip(before, after)) if g != index)


def test_hidden_without_a_residual_stream_is_refused_with_the_groups_left_out() -> None:
    """A layer norm called as a function leaves the stream out (masking could not compute the pruned model): asking
    for the hidden width there is an error that says why, not a silent channel-only run."""

    class Stream(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed, self.mid, self.head = nn.Linear(4, WIDTH), nn.Linear(WIDTH, WIDTH), nn.Linear(WIDTH, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.embed(x)
            h = h + self.mid(nn.functional.layer_norm(h, (WIDTH,)))
            return self.head(h)

    model = Stream().eval()
    with pytest.raises(ValueError, match=r"`hidden`=True found no hidden .* embed \(32 channels\): .*does not compute what masking"):
        ChannelMagnitude.for_model(model, torch.randn(2, 5, 4), ["embed", "mid", "head"], "l1", 0.99, hidden=True)


@pytest.mark.parametrize(("arguments", "message"), [
    (dict(hidden="yes"), "`hidden` must be True or False, got 'yes'"),
    (dict(hidden=True), "`hidden`=True removes the hidden width: it needs `physical`=True"),
])
def test_hidden_must_be_a_bool_and_needs_physical_removal(arguments, message) -> None:
    with pytest.raises(ValueError, match=message):
        IterativeMagnitude(granularity="channel", **arguments)


class _TensorModule(pl.LightningModule):
    """A timm image model behind a tensor forward, with ``example_input_array``."""

    def __init__(self, net: nn.Module, side: int) -> None:
        super().__init__()
        self.model, self.example_input_array = net, torch.randn(1, 3, side, side)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch: list, batch_idx: int) -> torch.Tensor:
        return nn.functional.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self):  # noqa: ANN201
        return torch.optim.SGD(self.parameters(), lr=0.01)


@pytest.mark.parametrize(("name", "options", "side"), [
    ("vit_tiny_patch16_224", dict(img_size=32, depth=2), 32),
    ("convnext_atto", {}, 64),  # one hidden group per stage, through LayerNorm2d and the blocks' layer scale (1-d)
])
def test_timm_models_lose_hidden_width_with_their_width_attributes_following(trainer_factory, name, options, side) -> None:
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    net = timm.create_model(name, pretrained=False, num_classes=5, **options)
    module, logger, snapshot = _TensorModule(net, side), ListLogger(), _Snapshot()
    dense = copy.deepcopy(net)
    data = DataLoader(torch.utils.data.TensorDataset(torch.randn(8, 3, side, side), torch.randint(0, 5, (8,))), batch_size=4)
    pruning = IterativeMagnitude(sparsity=0.5, schedule="one_shot", granularity="channel", physical=True, hidden=True,
                                 monitor=None, verbose=False)
    trainer_factory([snapshot, pruning], max_epochs=1, logger=logger).fit(module, data)
    assert any(group.hidden for group in snapshot.groups)
    assert net.num_features == net.get_classifier().in_features < dense.num_features
    x = torch.randn(2, 3, side, side)
    (reported,) = logger.values("prune/flops_ratio")
    assert reported == count_flops(net, x[:1]).total / count_flops(dense, x[:1]).total < 1
    with torch.no_grad():
        torch.testing.assert_close(snapshot.model.eval()(x), net.eval()(x), rtol=1e-5, atol=1e-5)
