"""Attention heads as prunable units: one head group per attention module (Hugging Face BERT, ViT, Llama with
grouped-query attention, GPT-2; timm's ViT), whole heads removed with the modules' head counts following the
weights, attention FLOPs predicted exactly, and IterativeMagnitude ranking heads with the channels. Tiny models
built from configs (random weights, nothing downloaded)."""

from __future__ import annotations

import copy
import logging

import pytest
import pytorch_lightning as pl
import torch
from torch import nn

from lightning_prune import AutoPruneCallback, IterativeMagnitude, load_from_checkpoint
from lightning_prune.flops import FlopsPredictor, count_flops
from lightning_prune.structure import (
    apply_plan, find_channel_groups, refused_channel_groups, restore_structure, structure_record,
)

transformers = pytest.importorskip("transformers")
from test_huggingface import masked_copy  # noqa: E402

pytestmark = pytest.mark.zoo

VOCAB, SEQ, LAYERS = 100, 8, 2


def bert_head_counts_following_the_weights(model: nn.Module) -> list[int]:
    """Each BERT layer's head count, after checking that its q projection and output projection are that wide."""
    counts = [model.bert.encoder.layer[i].attention.self.num_attention_heads for i in range(LAYERS)]
    for i, count in enumerate(counts):
        attention = model.bert.encoder.layer[i].attention
        assert attention.self.query.out_features == attention.self.all_head_size == 8 * count
        assert attention.output.dense.in_features == 8 * count
    return counts


def tokens(batch: int = 2) -> dict[str, torch.Tensor]:
    mask = torch.ones(batch, SEQ, dtype=torch.long)
    mask[0, -2:] = 0  # padding: the attention mask matters
    return {"input_ids": torch.randint(0, VOCAB, (batch, SEQ)), "attention_mask": mask}


def bert(attention: str = "sdpa") -> nn.Module:
    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=LAYERS, num_attention_heads=4,
                                     intermediate_size=64, vocab_size=VOCAB, attn_implementation=attention)
    return transformers.BertForSequenceClassification(config)


def hf_vit(attention: str = "sdpa") -> nn.Module:
    config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=LAYERS, num_attention_heads=4, intermediate_size=64,
                                    image_size=16, patch_size=8, num_labels=3, attn_implementation=attention)
    return transformers.ViTForImageClassification(config)


def llama() -> nn.Module:
    config = transformers.LlamaConfig(hidden_size=32, num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2,
                                      intermediate_size=64, vocab_size=VOCAB)
    return transformers.LlamaForCausalLM(config)


def gpt2() -> nn.Module:
    config = transformers.GPT2Config(n_embd=32, n_layer=LAYERS, n_head=4, vocab_size=VOCAB, n_positions=32)
    return transformers.GPT2LMHeadModel(config)


def timm_vit() -> nn.Module:
    timm = pytest.importorskip("timm")
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=LAYERS, num_classes=5)


# name -> (builder, example input, attention module of layer i, its head groups' size: kv heads, query heads per kv head)
MODELS = {
    "bert": (bert, tokens, lambda m, i: m.bert.encoder.layer[i].attention, 4, 1),
    "hf_vit": (hf_vit, lambda: {"pixel_values": torch.randn(2, 3, 16, 16)}, lambda m, i: m.vit.layers[i].attention, 4, 1),
    "llama": (llama, tokens, lambda m, i: m.model.layers[i].self_attn, 2, 2),
    "gpt2": (gpt2, tokens, lambda m, i: m.transformer.h[i].attn, 4, 1),
    "timm_vit": (timm_vit, lambda: torch.randn(2, 3, 32, 32), lambda m, i: m.blocks[i].attn, 3, 1),
}


def call(model: nn.Module, x) -> torch.Tensor:
    output = model(**x) if isinstance(x, dict) else model(x)
    return output if isinstance(output, torch.Tensor) else output.logits


def head_counts(attention: nn.Module) -> dict[str, int]:
    """The head-count attributes an attention module of any covered type has."""
    holders = [attention, getattr(attention, "self", None)]
    names = ("num_attention_heads", "num_heads", "num_key_value_heads", "all_head_size", "split_size", "attn_dim")
    return {name: getattr(holder, name) for holder in holders if holder is not None for name in names if hasattr(holder, name)}


def random_plan(groups, seed: int):
    generator = torch.Generator().manual_seed(seed)
    return {g.index: torch.randperm(g.size, generator=generator)[: 1 + int(torch.randint(g.size, (1,), generator=generator))].sort().values
            for g in groups}


@pytest.fixture(scope="module", params=sorted(MODELS))
def discovered(request):
    build, example, attention, units, per_unit = MODELS[request.param]
    torch.manual_seed(0)
    model, x = build().eval(), example()
    return request.param, model, x, find_channel_groups(model, x, heads=True), attention, units, per_unit


def test_one_head_group_per_attention_layer_of_its_heads(discovered) -> None:
    name, model, x, groups, attention, units, per_unit = discovered
    heads = [group for group in groups if group.heads is not None]
    assert len(heads) == LAYERS and all(group.size == units for group in heads)
    for layer, group in enumerate(heads):
        site = attention(model, layer)
        assert model.get_submodule(group.heads) is site
        weights = [member for member in group.members if member.kind == "out"]
        head_dim = {"bert": 8, "hf_vit": 8, "llama": 8, "gpt2": 8, "timm_vit": 64}[name]
        # each head: head_dim rows of q, k and v (its kv group's query heads under grouped-query attention)
        assert sum(member.positions.numel() for member in weights) == units * head_dim * (per_unit + 2)
        (output,) = [member for member in group.members if member.kind == "in"]
        assert output.positions.numel() == units * per_unit * head_dim
    assert not any("attention" in refused.reason for refused in refused_channel_groups(model, x, heads=True))


def pruned_as_masked(model, groups, plan, x):  # noqa: ANN001, ANN201
    """A copy of ``model`` pruned physically to ``plan``, after checking it computes what the masked model does."""
    pruned = copy.deepcopy(model)
    apply_plan(pruned, groups, plan, x)
    with torch.no_grad():
        torch.testing.assert_close(call(pruned, x), call(masked_copy(model, groups, plan), x), rtol=1e-4, atol=1e-5)
    return pruned


def test_masked_equals_physically_pruned_and_head_counts_follow_the_weights(discovered) -> None:
    name, model, x, groups, attention, units, per_unit = discovered
    dense_counts = head_counts(attention(model, 0))
    for seed in range(2):
        plan = random_plan(groups, seed)
        pruned = pruned_as_masked(model, groups, plan, x)
        for group in (group for group in groups if group.heads is not None):
            kept = len(plan[group.index])
            counts = head_counts(pruned.get_submodule(group.heads))
            expected = {
                key: value * kept // units  # every count scales with the kept kv heads
                for key, value in dense_counts.items()
            }
            assert counts == expected and (counts or name == "llama")  # the module's attributes agree with its weights
            projection = next(m for m in group.members if m.kind == "out")
            assert pruned.get_submodule(projection.module).weight.numel() * units == model.get_submodule(projection.module).weight.numel() * kept


def test_an_autoprune_head_switch_turned_off_computes_the_head_removed(discovered) -> None:
    """AutoPrune's auxiliary parameters over the head groups (every layout: separate and packed q/k/v, Conv1D,
    grouped-query attention): with every other head's switch off, the gated model computes what the
    model with those heads removed does."""
    name, model, x, groups, attention, units, per_unit = discovered
    heads = [group for group in groups if group.heads is not None]
    plan = {group.index: torch.arange(layer % 2, units, 2) for layer, group in enumerate(heads)}  # every other head
    aux = assert_head_switches_compute_the_removal(model, x, groups, heads, plan)
    assert {index: keep.tolist() for index, keep in aux.plan().items()} == {index: keep.tolist() for index, keep in plan.items()}


def assert_head_switches_compute_the_removal(model, x, groups, heads, plan):  # noqa: ANN001, ANN201
    """AutoPrune's switches on ``heads``, on for the heads ``plan`` keeps and off for the rest, compute what the model
    with the other heads removed computes; the switches' ``AuxiliaryParameters``."""
    from lightning_prune.auxiliary import AuxiliaryParameters

    gated = copy.deepcopy(model)
    aux = AuxiliaryParameters(gated, granularity="channel", groups=heads)
    for group in heads:
        aux.values[group.root].fill_(-1.0)[plan[group.index]] = 1.0
    aux.prepare()
    pruned = copy.deepcopy(model)
    apply_plan(pruned, groups, plan, x)
    with torch.no_grad():
        torch.testing.assert_close(call(gated, x), call(pruned, x), rtol=1e-4, atol=1e-5)
    return aux


def test_grouped_query_attention_removes_a_kv_head_with_its_query_heads() -> None:
    torch.manual_seed(0)
    model, x = llama().eval(), tokens()
    groups = find_channel_groups(model, x, heads=True)
    group = next(group for group in groups if group.heads is not None)
    pruned = copy.deepcopy(model)
    apply_plan(pruned, groups, {group.index: torch.tensor([1])}, x)  # keep kv head 1 and query heads 2, 3
    dense, attention = model.model.layers[0].self_attn, pruned.model.layers[0].self_attn
    torch.testing.assert_close(attention.k_proj.weight, dense.k_proj.weight[8:16])
    torch.testing.assert_close(attention.q_proj.weight, dense.q_proj.weight[16:32])
    torch.testing.assert_close(attention.o_proj.weight, dense.o_proj.weight[:, 16:32])
    assert attention.num_key_value_groups == 2
    cached = pruned(**x, use_cache=True).past_key_values
    assert cached.layers[0].keys.shape[1] == 1 and cached.layers[1].keys.shape[1] == 2  # layer 1 keeps both
    generated = pruned.generate(**tokens(), max_new_tokens=2, do_sample=False, pad_token_id=0)
    assert generated.shape == (2, SEQ + 2)


@pytest.mark.parametrize("build", [gpt2, bert])
def test_a_pruned_model_saves_and_a_dense_one_restored_from_the_record_loads_it(build, tmp_path) -> None:
    torch.manual_seed(0)
    model, x = build().eval(), tokens()
    groups = find_channel_groups(model, x, heads=True)
    pruned = copy.deepcopy(model)
    record = apply_plan(pruned, groups, random_plan(groups, 0), x)
    pruned.save_pretrained(tmp_path)
    from safetensors.torch import load_file

    fresh = build().eval()
    restore_structure(fresh, record)  # the projections resized, the head counts following them
    missing, unexpected = fresh.load_state_dict(load_file(tmp_path / "model.safetensors"), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}  # GPT-2's head is tied to the embedding
    fresh.tie_weights()
    with torch.no_grad():
        torch.testing.assert_close(call(fresh, x), call(pruned, x))
    for (name, module), (_, restored) in zip(pruned.named_modules(), fresh.named_modules()):
        if name.endswith(("attention", "attn")):
            assert head_counts(restored) == head_counts(module)
    assert structure_record(fresh) == record
    if build is gpt2:
        assert fresh.generate(**tokens(), max_new_tokens=2, do_sample=False, pad_token_id=0).shape == (2, SEQ + 2)


def test_a_module_whose_heads_do_not_split_is_refused_with_the_reason() -> None:
    timm = pytest.importorskip("timm")
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=1, num_classes=5).eval()
    model.blocks[0].attn.norm = nn.LayerNorm(192)  # timm's scale_norm: one norm over all heads
    x = torch.randn(1, 3, 32, 32)
    assert not any(group.heads is not None for group in find_channel_groups(model, x, heads=True))
    reasons = {refused.root: refused.reason for refused in refused_channel_groups(model, x, heads=True)}
    assert "spans all heads" in reasons["blocks.0.attn"]


def test_ignored_q_projection_keeps_its_heads() -> None:
    torch.manual_seed(0)
    model, x = bert().eval(), tokens()
    groups = find_channel_groups(model, x, ignored_layers=["bert.encoder.layer.0.attention.self.query"], heads=True)
    assert [group.heads for group in groups if group.heads is not None] == ["bert.encoder.layer.1.attention"]


@pytest.mark.parametrize("build, attention", [(bert, "sdpa"), (bert, "eager"), (hf_vit, "sdpa"), (hf_vit, "eager"), (llama, None), (gpt2, None)])
def test_predicted_flops_of_head_removal_equal_the_recount(build, attention, caplog) -> None:
    """q·kᵀ and attn·v are counted (fvcore's matmul, or the sdpa handle) and scale with the kept heads; the
    predictor finds that factor from its probes (no recount per prediction), also for groups of two heads."""
    torch.manual_seed(0)
    model = (build(attention) if attention else build()).eval()
    x = {"pixel_values": torch.randn(1, 3, 16, 16)} if build is hf_vit else tokens(1)
    groups = find_channel_groups(model, x, heads=True)
    with caplog.at_level(logging.INFO, logger="lightning_prune.flops"):
        predictor = FlopsPredictor(model, x, groups)
    assert "recount" not in caplog.text
    for seed in range(3):
        plan = {index: keep for index, keep in random_plan(groups, seed).items() if groups[index].heads is not None or seed}
        pruned = copy.deepcopy(model)
        apply_plan(pruned, groups, plan, x)
        assert predictor.predict(plan) == count_flops(pruned, x).total <= predictor.dense


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_attention_products_are_counted_per_kept_head(attention) -> None:
    """One BERT attention module on one sequence of 8 tokens, hidden 32, heads of 8: q, k, v and the output
    projection cost 8 * 32 * (8 * heads) each, q·kᵀ and attn·v 8 * 8 * (8 + 8) per head, the LayerNorm after the
    output projection 5 per element (fvcore)."""
    torch.manual_seed(0)
    model, x = bert(attention).eval(), tokens(1)
    groups = find_channel_groups(model, x, heads=True)
    site = groups[0].heads
    assert count_flops(model, x).by_module[site] == 4 * 8 * 32 * 32 + 4 * 8 * 8 * 16 + 5 * 8 * 32
    pruned = copy.deepcopy(model)
    apply_plan(pruned, groups, {0: torch.tensor([2])}, x)
    assert count_flops(pruned, x).by_module[site] == 4 * 8 * 32 * 8 + 1 * 8 * 8 * 16 + 5 * 8 * 32


def test_iterative_magnitude_ranks_heads_with_channels_in_a_keyword_forward_fit(trainer_factory) -> None:
    from test_gate_pruning import ListLogger
    from test_huggingface import KeywordModule, loader

    torch.manual_seed(0)
    module, logger = KeywordModule(bert()), ListLogger()
    dense = copy.deepcopy(module.model)
    pruning = IterativeMagnitude(sparsity=0.6, schedule="one_shot", granularity="channel", physical=True, monitor=None,
                                 verbose=False)
    trainer_factory([pruning], max_epochs=1, logger=logger).fit(module, loader(classes=True))
    assert pruning.figures.predictor.sizes.tolist() == [4, 64, 4, 64, 32]  # heads, MLP width (per layer), pooler
    counts = bert_head_counts_following_the_weights(module.model)
    assert min(counts) < 4  # whole heads went
    (reported,) = logger.values("prune/flops_ratio")  # the one event's predicted ratio
    example = pruning.figures.example
    assert reported == count_flops(module.model, example).total / count_flops(dense, example).total < 1
    module.eval()
    assert torch.isfinite(module(**tokens(), labels=torch.tensor([0, 1])).loss)


class _Snapshot(pl.Callback):
    """Copies the model at the end of fit, before a later callback's ``on_fit_end`` removes channels."""

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.model = copy.deepcopy(pl_module.model)


def test_autoprune_switches_off_whole_heads_in_a_keyword_forward_fit(trainer_factory, tmp_path) -> None:
    """One switch per head gates the head's q/k/v rows (and biases): a closed switch zeroes its values, so its output
    before the output projection is 0, as if removed; ``physical=True`` removes it with the head counts following,
    and a checkpoint of the pruned model loads into a dense one (the structure record)."""
    from test_gate_pruning import ListLogger
    from test_huggingface import KeywordModule, loader

    torch.manual_seed(0)
    module, logger, snapshot = KeywordModule(bert()), ListLogger(), _Snapshot()
    dense = copy.deepcopy(module.model)
    pruning = AutoPruneCallback(granularity="channel", target_sparsity=0.5, physical=True,
                                aux_dataloader=loader(classes=True, n=2), verbose=False)
    trainer = trainer_factory([snapshot, pruning], max_epochs=2, logger=logger)
    trainer.fit(module, loader(classes=True))
    trainer.save_checkpoint(tmp_path / "pruned.ckpt")
    heads = [group for group in pruning.figures.groups if group.heads is not None]
    assert [group.size for group in heads] == [4] * LAYERS  # one switch per head, beside the MLP and pooler channels
    assert len(pruning.figures.groups) == 5  # heads and MLP width of each layer, the pooler
    counts = bert_head_counts_following_the_weights(module.model)
    assert min(counts) < 4  # whole heads went
    for i, count in enumerate(counts):
        off = (snapshot.model.bert.encoder.layer[i].attention.self.value.weight == 0).all(1).view(4, 8)
        assert off.all(1).sum() == 4 - count and (off.all(1) | ~off.any(1)).all()  # a head's 8 rows go together
    example = pruning.figures.example
    reported = logger.values("prune/flops_ratio")[-1]  # the end-of-fit event, predicted from the plan
    assert reported == count_flops(module.model, example).total / count_flops(dense, example).total < 1
    recount = count_flops(module.model, example.first_sample()).total  # per sample, as the summary's figure
    assert logger.values("prune/flops_macs")[-1] == recount
    module.eval()
    batch = tokens()
    with torch.no_grad():
        masked = snapshot.model.eval()(**batch).logits  # switches off, before removal
        torch.testing.assert_close(module.model(**batch).logits, masked, rtol=1e-5, atol=1e-6)
        loaded = load_from_checkpoint(KeywordModule, tmp_path / "pruned.ckpt", model=bert()).eval()
        torch.testing.assert_close(loaded.model(**batch).logits, module.model(**batch).logits)
    assert [layer.attention.self.num_attention_heads for layer in loaded.model.bert.encoder.layer] == counts


def test_channel_magnitude_counts_the_zeros_of_conv1d_heads_and_columns_exactly() -> None:
    """GPT-2's ``Conv1D`` holds output channels in weight columns: a removed head zeroes ``3 * head_dim`` columns
    of ``c_attn`` and ``head_dim`` rows of ``c_proj``; the global search reaches the target by counting those."""
    from lightning_prune.magnitude import ChannelMagnitude, MagnitudePruner

    torch.manual_seed(0)
    model, x = gpt2().eval(), tokens(1)
    layers = [name for name, module in model.named_modules() if name.startswith("transformer.h.") and hasattr(module, "nf")]
    channels = ChannelMagnitude.for_model(model, x, layers, "l1", 0.99)
    assert sum(group.heads is not None for group in channels.groups) == LAYERS
    pruner = MagnitudePruner(model, layers, 0.5, channels=channels)
    pruner.update(pruner.final)
    weights = [model.get_submodule(layer).weight for layer in layers]
    zeros = sum(int((weight == 0).sum()) for weight in weights) / sum(weight.numel() for weight in weights)
    largest = 3 * 8 * 32 + 8 * 32  # one head: its c_attn columns and c_proj rows
    assert 0.5 <= zeros < 0.5 + largest / sum(weight.numel() for weight in weights)
    assert any(len(pruner.plan[group.index]) < group.size for group in channels.groups if group.heads is not None)


def test_a_structure_record_restores_a_timm_vit_with_pruned_heads() -> None:
    """timm's ``Attention`` reshapes by ``num_heads``: a dense model reshaped by the record must update it."""
    torch.manual_seed(0)
    model, x = timm_vit().eval(), torch.randn(2, 3, 32, 32)
    groups = find_channel_groups(model, x, heads=True)
    pruned = copy.deepcopy(model)
    record = apply_plan(pruned, groups, random_plan(groups, 1), x)
    fresh = timm_vit().eval()
    restore_structure(fresh, record)
    fresh.load_state_dict(pruned.state_dict())
    assert [block.attn.num_heads for block in fresh.blocks] == [block.attn.num_heads for block in pruned.blocks] != [3, 3]
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), pruned(x))


def test_heads_must_be_a_bool() -> None:
    with pytest.raises(ValueError, match="`heads` must be True or False, got 'yes'"):
        find_channel_groups(bert().eval(), tokens(), heads="yes")
