"""More attention layouts: Hugging Face T5 (a relative position bias with one column per head; the heads of a
stack's layers shared, so one group per stack and attention kind), timm's Swin ``WindowAttention`` (a relative
position bias table per module), and the layouts whose heads cannot be removed (``nn.MultiheadAttention``,
torchvision's Swin), refused with the reason. Tiny models built from configs (random weights, nothing downloaded)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lightning_prune import IterativeMagnitude
from lightning_prune.flops import FlopsPredictor, count_flops
from lightning_prune.structure import (
    apply_plan, find_channel_groups, refused_channel_groups, restore_structure, structure_record,
)

transformers = pytest.importorskip("transformers")
from test_attention_heads import assert_head_switches_compute_the_removal, call, pruned_as_masked, random_plan  # noqa: E402
from test_huggingface import masked_copy  # noqa: E402

pytestmark = pytest.mark.zoo

HEADS, HEAD_DIM, BUCKETS = 4, 8, 8


def t5(attention: str = "sdpa") -> nn.Module:
    config = transformers.T5Config(vocab_size=100, d_model=32, d_kv=HEAD_DIM, d_ff=64, num_layers=2, num_heads=HEADS,
                                   relative_attention_num_buckets=BUCKETS, decoder_start_token_id=0, pad_token_id=0,
                                   attn_implementation=attention)
    return transformers.T5ForConditionalGeneration(config)


def t5_batch(batch: int = 2) -> dict[str, torch.Tensor]:
    mask = torch.ones(batch, 8, dtype=torch.long)
    mask[0, -2:] = 0  # padding: the attention mask matters
    return {"input_ids": torch.randint(1, 100, (batch, 8)), "attention_mask": mask,
            "decoder_input_ids": torch.randint(1, 100, (batch, 5))}


# the three T5 head groups: (first attention module, the attention module's path in a block)
T5_SITES = [("encoder", "layer.0.SelfAttention"), ("decoder", "layer.0.SelfAttention"), ("decoder", "layer.1.EncDecAttention")]


def t5_attentions(model: nn.Module, stack: str, path: str) -> list[nn.Module]:
    return [block.get_submodule(path) for block in getattr(model, stack).block]


@pytest.fixture(scope="module")
def t5_found():
    torch.manual_seed(0)
    model, x = t5().eval(), t5_batch()
    return model, x, find_channel_groups(model, x, heads=True)


def t5_head_groups(groups) -> list:
    return [group for group in groups if group.heads is not None]


def test_t5_heads_are_one_group_per_stack_and_attention_kind(t5_found) -> None:
    """Layer 0's position bias (the cross-attention's zero bias) of ``n_heads`` columns is added in every layer of
    its stack, so head ``c`` of a stack goes from all its layers: q/k/v rows and o columns of each layer, and the
    bias column ``c`` of the layer that holds it."""
    model, x, groups = t5_found
    heads = t5_head_groups(groups)
    assert [group.heads for group in heads] == [f"{stack}.block.0.{path}" for stack, path in T5_SITES]
    assert all(group.size == HEADS for group in heads)
    for group, (stack, path) in zip(heads, T5_SITES):
        sites = [f"{stack}.block.{layer}.{path}" for layer in range(2)]
        projections = {f"{site}.{name}" for site in sites for name in "qkv"}
        assert {m.module for m in group.members if m.kind == "out"} == projections
        assert {m.module for m in group.members if m.kind == "in"} == {f"{site}.o" for site in sites}
        tables = [(m.module, m.positions.tolist()) for m in group.members if m.kind == "table"]
        bias = [] if "EncDec" in path else [(f"{sites[0]}.relative_attention_bias", list(range(HEADS)))]
        assert tables == bias
    assert not any("heads" in refused.reason for refused in refused_channel_groups(model, x, heads=True))


def test_t5_masked_equals_physically_pruned_with_the_bias_columns_and_head_counts(t5_found) -> None:
    model, x, groups = t5_found
    heads = t5_head_groups(groups)
    for seed in range(2):
        plan = random_plan(groups, seed)
        pruned = pruned_as_masked(model, groups, plan, x)
        for group, (stack, path) in zip(heads, T5_SITES):
            kept = plan[group.index]
            for dense, attention in zip(t5_attentions(model, stack, path), t5_attentions(pruned, stack, path)):
                assert attention.n_heads == len(kept) and attention.inner_dim == len(kept) * HEAD_DIM
                assert attention.q.out_features == attention.o.in_features == attention.inner_dim
                if dense.has_relative_attention_bias:  # the kept heads' bias columns, the embedding's width with them
                    torch.testing.assert_close(attention.relative_attention_bias.weight, dense.relative_attention_bias.weight[:, kept])
                    assert attention.relative_attention_bias.embedding_dim == len(kept)
    generated = pruned.generate(input_ids=x["input_ids"], attention_mask=x["attention_mask"], max_new_tokens=3, do_sample=False)
    assert generated.shape[0] == 2  # the key/value caches of the kept heads


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_t5_predicted_flops_of_head_removal_equal_the_recount(attention) -> None:
    """q·kᵀ and attn·v of the self- and cross-attentions scale with the heads kept in the stack."""
    torch.manual_seed(0)
    model, one = t5(attention).eval(), t5_batch(1)
    groups = find_channel_groups(model, one, heads=True)
    site = "encoder.block.0.layer.0.SelfAttention"  # 8 tokens, d_model 32: q, k, v, o and q·kᵀ, attn·v per head
    assert count_flops(model, one).by_module[site] == 4 * 8 * 32 * 32 + HEADS * 8 * 8 * (8 + 8)
    predictor = FlopsPredictor(model, one, groups)
    for seed in range(3):
        plan = {index: keep for index, keep in random_plan(groups, seed).items() if groups[index].heads is not None or seed}
        pruned = copy.deepcopy(model)
        apply_plan(pruned, groups, plan, one)
        assert predictor.predict(plan) == count_flops(pruned, one).total < predictor.dense


def test_t5_structure_record_restores_the_pruned_model(t5_found) -> None:
    """A dense T5 reshaped by the record (the bias embeddings' widths included) loads the pruned weights strictly."""
    model, x, groups = t5_found
    pruned = copy.deepcopy(model)
    record = apply_plan(pruned, groups, random_plan(groups, 1), x)
    fresh = t5().eval()
    restore_structure(fresh, record)
    fresh.load_state_dict(pruned.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(call(fresh, x), call(pruned, x))
    attention = type(pruned.encoder.block[0].layer[0].SelfAttention)
    assert [a.n_heads for a in fresh.modules() if isinstance(a, attention)] == [
        a.n_heads for a in pruned.modules() if isinstance(a, attention)
    ]
    assert structure_record(fresh) == record


def test_an_autoprune_head_switch_turned_off_in_t5_computes_the_head_removed_from_its_stack(t5_found) -> None:
    model, x, groups = t5_found
    heads = t5_head_groups(groups)
    plan = {group.index: torch.arange(number % 2, HEADS, 2) for number, group in enumerate(heads)}
    assert_head_switches_compute_the_removal(model, x, groups, heads, plan)


# ---------------------------------------------------------------- Swin


def timm_swin() -> nn.Module:
    """Two stages (2 and 4 heads of 8), the first with a shifted-window block (its attention mask)."""
    timm = pytest.importorskip("timm")
    return timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=32, window_size=4, embed_dim=16,
                             depths=(2, 1), num_heads=(2, 4), num_classes=5)


@pytest.fixture(scope="module")
def swin_found():
    torch.manual_seed(0)
    model, x = timm_swin().eval(), torch.randn(2, 3, 32, 32)
    with torch.no_grad():  # the bias tables are initialised small; make them matter
        for block in (block for layer in model.layers for block in layer.blocks):
            block.attn.relative_position_bias_table.normal_()
    return model, x, find_channel_groups(model, x, heads=True)


def swin_blocks(model: nn.Module) -> list[nn.Module]:
    return [block for layer in model.layers for block in layer.blocks]


def test_timm_swin_has_one_head_group_per_window_attention_with_its_bias_table(swin_found) -> None:
    model, x, groups = swin_found
    heads = [group for group in groups if group.heads is not None]
    sites = ["layers.0.blocks.0.attn", "layers.0.blocks.1.attn", "layers.1.blocks.0.attn"]
    assert [(group.heads, group.size) for group in heads] == list(zip(sites, [2, 2, 4]))
    for group, site in zip(heads, sites):
        assert [(m.module, m.kind) for m in group.members] == [(f"{site}", "table"), (f"{site}.qkv", "out"), (f"{site}.proj", "in")]
    assert swin_blocks(model)[1].shift_size != (0, 0)  # the shifted block's masked attention is covered


def test_timm_swin_masked_equals_pruned_with_the_table_columns_and_num_heads(swin_found) -> None:
    model, x, groups = swin_found
    for seed in range(2):
        plan = random_plan(groups, seed)
        pruned = copy.deepcopy(model)
        apply_plan(pruned, groups, plan, x)
        with torch.no_grad():
            torch.testing.assert_close(pruned(x), masked_copy(model, groups, plan)(x), rtol=1e-4, atol=1e-5)
        for group in (group for group in groups if group.heads is not None):
            kept = plan[group.index]
            dense, attention = model.get_submodule(group.heads), pruned.get_submodule(group.heads)
            assert attention.num_heads == len(kept) and attention.qkv.out_features == 3 * 8 * len(kept)
            torch.testing.assert_close(attention.relative_position_bias_table, dense.relative_position_bias_table[:, kept])


def test_timm_swin_predicted_flops_equal_the_recount_and_a_record_restores_it(swin_found) -> None:
    model, x, groups = swin_found
    one = x[:1]
    predictor = FlopsPredictor(model, one, groups)
    for seed in range(2):
        plan = {index: keep for index, keep in random_plan(groups, seed).items() if groups[index].heads is not None or seed}
        pruned = copy.deepcopy(model)
        record = apply_plan(pruned, groups, plan, one)
        assert predictor.predict(plan) == count_flops(pruned, one).total < predictor.dense
    fresh = timm_swin().eval()
    restore_structure(fresh, record)  # the tables' widths follow the heads
    fresh.load_state_dict(pruned.state_dict())
    assert [block.attn.num_heads for block in swin_blocks(fresh)] == [block.attn.num_heads for block in swin_blocks(pruned)]
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), pruned(x))


# ---------------------------------------------------------------- layouts whose heads cannot be removed


def torchvision_swin() -> nn.Module:
    torchvision = pytest.importorskip("torchvision")
    return torchvision.models.SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[2], num_heads=[2],
                                              window_size=[4, 4], num_classes=5)


def torchvision_vit() -> nn.Module:
    torchvision = pytest.importorskip("torchvision")
    return torchvision.models.VisionTransformer(image_size=32, patch_size=16, num_layers=1, num_heads=2, hidden_dim=16,
                                                mlp_dim=32, num_classes=5)


def transformer_encoder() -> nn.Module:
    return nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, batch_first=True), 1)


@pytest.mark.parametrize("build, x, site, reason", [
    (transformer_encoder, lambda: torch.randn(2, 5, 16), "layers.0.self_attn", "embed_dim // num_heads"),
    (torchvision_vit, lambda: torch.randn(2, 3, 32, 32), "encoder.layers.encoder_layer_0.self_attention", "embed_dim // num_heads"),
    (torchvision_swin, lambda: torch.randn(2, 3, 32, 32), "features.1.0.attn", "C // num_heads"),
])
def test_heads_whose_width_follows_the_input_width_are_refused_with_the_reason(build, x, site, reason) -> None:
    """``nn.MultiheadAttention`` and torchvision's ``shifted_window_attention`` reshape q/k/v into heads of
    ``input width // num_heads``: fewer heads would change the head width, so they are refused, not pruned wrongly."""
    model, example = build().eval(), x()
    refused = {group.root: group for group in refused_channel_groups(model, example, heads=True)}
    assert refused[site].size == 0 and reason in refused[site].reason and "cannot be removed" in refused[site].reason


def test_iterative_magnitude_removes_t5_heads_from_a_whole_stack_in_a_keyword_forward_fit(trainer_factory) -> None:
    """``forward(**batch)`` with ``labels`` (the decoder inputs shifted from them): heads ranked with the MLP channels,
    removed from every layer of a stack alike, the reported FLOPs ratio the recount's."""
    from test_gate_pruning import ListLogger
    from test_huggingface import KeywordModule, loader

    torch.manual_seed(0)
    module, logger = KeywordModule(t5()), ListLogger()
    dense = copy.deepcopy(module.model)
    pruning = IterativeMagnitude(sparsity=0.6, schedule="one_shot", granularity="channel", physical=True, monitor=None,
                                 verbose=False)
    trainer_factory([pruning], max_epochs=1, logger=logger).fit(module, loader(classes=False))
    counts = [[attention.n_heads for attention in t5_attentions(module.model, stack, path)] for stack, path in T5_SITES]
    assert all(len(set(stack)) == 1 for stack in counts) and min(min(stack) for stack in counts) < HEADS
    (reported,) = logger.values("prune/flops_ratio")
    example = pruning.figures.example
    assert reported == count_flops(module.model, example).total / count_flops(dense, example).total < 1
    module.eval()
    with torch.no_grad():
        assert torch.isfinite(module(**t5_batch(), labels=torch.randint(1, 100, (2, 5))).loss)


def test_magnitude_masks_on_timm_swin_heads_compute_what_removing_them_does(swin_found) -> None:
    """IterativeMagnitude's channel masks zero a head's q/k/v rows, its projection columns and its bias-table column;
    removing the zeroed heads leaves the output unchanged and the tables as wide as the heads."""
    from lightning_prune.magnitude import ChannelMagnitude, MagnitudePruner

    model, x, _ = swin_found
    model = copy.deepcopy(model)
    layers = [name for name, module in model.named_modules() if isinstance(module, nn.Linear) and name != "head.fc"]
    channels = ChannelMagnitude.for_model(model, x, layers, "l1", 0.99)
    pruner = MagnitudePruner(model, layers, 0.5, channels=channels)
    pruner.update(1.0)
    with torch.no_grad():
        masked = model(x)
        pruner.finalize(x)
        torch.testing.assert_close(model(x), masked, rtol=1e-4, atol=1e-5)
    heads = [block.attn for block in swin_blocks(model)]
    assert any(attention.num_heads < dense for attention, dense in zip(heads, (2, 2, 4)))
    assert all(attention.relative_position_bias_table.shape[1] == attention.num_heads for attention in heads)


def test_autoprune_switches_off_t5_heads_of_a_whole_stack_in_a_keyword_forward_fit(trainer_factory, tmp_path) -> None:
    """One switch per head of a stack gates the head's q/k/v rows in every layer; ``physical=True`` removes the
    switched-off heads (their bias columns with them) and a checkpoint of the pruned T5 loads into a dense one."""
    from lightning_prune import AutoPruneCallback, load_from_checkpoint
    from test_huggingface import KeywordModule, loader

    torch.manual_seed(0)
    module = KeywordModule(t5())
    pruning = AutoPruneCallback(granularity="channel", target_sparsity=0.5, physical=True,
                                aux_dataloader=loader(classes=False, n=2), verbose=False)
    trainer = trainer_factory([pruning], max_epochs=2)
    trainer.fit(module, loader(classes=False))
    trainer.save_checkpoint(tmp_path / "pruned.ckpt")
    assert [group.size for group in pruning.figures.groups if group.heads is not None] == [HEADS] * 3
    counts = [[attention.n_heads for attention in t5_attentions(module.model, stack, path)] for stack, path in T5_SITES]
    assert all(len(set(stack)) == 1 for stack in counts) and min(min(stack) for stack in counts) < HEADS
    bias = module.model.encoder.block[0].layer[0].SelfAttention.relative_attention_bias
    assert bias.weight.shape == (BUCKETS, counts[0][0])
    module.eval()
    loaded = load_from_checkpoint(KeywordModule, tmp_path / "pruned.ckpt", model=t5()).eval()
    batch = t5_batch()
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(**batch).logits, module.model(**batch).logits)
