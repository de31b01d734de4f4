"""The hidden (residual-stream) width as an opt-in channel group (``find_channel_groups(..., hidden=True)``):
one group from the embeddings (patch conv, class token, position embedding, token embeddings) through every
LayerNorm/RMSNorm and every block's input and output projections to the head, on timm and Hugging Face ViT,
BERT, GPT-2 (tied lm_head) and Llama (RMSNorm). Removal is checked against the masks (with the norms over the
kept channels), the models' own width attributes, fvcore's recount and a structure record. Tiny configs,
random weights, nothing downloaded."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lightning_prune.flops import FlopsPredictor, count_flops
from lightning_prune.structure import (
    apply_plan, channel_masks, find_channel_groups, norm_masks, refused_channel_groups, restore_structure,
    structure_from_state_dict, structure_record,
)

transformers = pytest.importorskip("transformers")

VOCAB, SEQ, LAYERS, WIDTH = 100, 8, 2, 32


def tokens() -> dict[str, torch.Tensor]:
    mask = torch.ones(2, SEQ, dtype=torch.long)
    mask[0, -2:] = 0
    return {"input_ids": torch.randint(0, VOCAB, (2, SEQ)), "attention_mask": mask}


def bert() -> nn.Module:
    return transformers.BertForSequenceClassification(transformers.BertConfig(
        hidden_size=WIDTH, num_hidden_layers=LAYERS, num_attention_heads=4, intermediate_size=64, vocab_size=VOCAB))


def hf_vit() -> nn.Module:
    return transformers.ViTForImageClassification(transformers.ViTConfig(
        hidden_size=WIDTH, num_hidden_layers=LAYERS, num_attention_heads=4, intermediate_size=64, image_size=16,
        patch_size=8, num_labels=3))


def gpt2() -> nn.Module:
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_embd=WIDTH, n_layer=LAYERS, n_head=4, vocab_size=VOCAB, n_positions=32, bos_token_id=0, eos_token_id=0))


def llama(tied: bool = False) -> nn.Module:
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=WIDTH, num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=64, vocab_size=VOCAB, tie_word_embeddings=tied))


def timm_vit() -> nn.Module:
    timm = pytest.importorskip("timm")
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=LAYERS, num_classes=5)


def pixels(side: int):
    return lambda: {"pixel_values": torch.randn(2, 3, side, side)}


# name -> (builder, example input, members the hidden group must hold: (module, kind, parameter))
MODELS = {
    "bert": (bert, tokens, [
        ("bert.embeddings.word_embeddings", "out", None), ("bert.embeddings.position_embeddings", "out", None),
        ("bert.embeddings.token_type_embeddings", "out", None), ("bert.embeddings.LayerNorm", "channel", None),
        *[(f"bert.encoder.layer.{i}.{path}", kind, None) for i in range(LAYERS) for path, kind in (
            ("attention.self.query", "in"), ("attention.self.key", "in"), ("attention.self.value", "in"),
            ("attention.output.dense", "out"), ("attention.output.LayerNorm", "channel"),
            ("intermediate.dense", "in"), ("output.dense", "out"), ("output.LayerNorm", "channel"))],
        ("bert.pooler.dense", "in", None)]),
    "hf_vit": (hf_vit, pixels(16), [
        ("vit.embeddings.patch_embeddings.projection", "out", None), ("vit.embeddings", "parameter", "cls_token"),
        ("vit.embeddings", "parameter", "position_embeddings"),
        *[(f"vit.layers.{i}.{path}", kind, None) for i in range(LAYERS) for path, kind in (
            ("layernorm_before", "channel"), ("attention.q_proj", "in"), ("attention.o_proj", "out"),
            ("layernorm_after", "channel"), ("mlp.fc1", "in"), ("mlp.fc2", "out"))],
        ("vit.layernorm", "channel", None), ("classifier", "in", None)]),
    "gpt2": (gpt2, tokens, [
        ("transformer.wte", "out", None), ("transformer.wpe", "out", None),
        *[(f"transformer.h.{i}.{path}", kind, None) for i in range(LAYERS) for path, kind in (
            ("ln_1", "channel"), ("attn.c_attn", "in"), ("attn.c_proj", "out"), ("ln_2", "channel"),
            ("mlp.c_fc", "in"), ("mlp.c_proj", "out"))],
        ("transformer.ln_f", "channel", None), ("lm_head", "in", None)]),
    "llama": (llama, tokens, [
        ("model.embed_tokens", "out", None),
        *[(f"model.layers.{i}.{path}", kind, None) for i in range(LAYERS) for path, kind in (
            ("input_layernorm", "channel"), ("self_attn.q_proj", "in"), ("self_attn.k_proj", "in"),
            ("self_attn.o_proj", "out"), ("post_attention_layernorm", "channel"), ("mlp.gate_proj", "in"),
            ("mlp.up_proj", "in"), ("mlp.down_proj", "out"))],
        ("model.norm", "channel", None), ("lm_head", "in", None)]),
    "timm_vit": (timm_vit, lambda: torch.randn(2, 3, 32, 32), [
        ("patch_embed.proj", "out", None), ("", "parameter", "cls_token"), ("", "parameter", "pos_embed"),
        *[(f"blocks.{i}.{path}", kind, None) for i in range(LAYERS) for path, kind in (
            ("norm1", "channel"), ("attn.qkv", "in"), ("attn.proj", "out"), ("norm2", "channel"),
            ("mlp.fc1", "in"), ("mlp.fc2", "out"))],
        ("norm", "channel", None), ("head", "in", None)]),
}
PARAMS = [pytest.param(name, marks=pytest.mark.zoo) if name == "timm_vit" else name for name in sorted(MODELS)]


def call(model: nn.Module, x) -> torch.Tensor:
    output = model(**x) if isinstance(x, dict) else model(x)
    return output if isinstance(output, torch.Tensor) else output.logits


def masked(model: nn.Module, groups, plan) -> tuple[nn.Module, list]:
    """A copy of ``model`` with ``plan``'s channels masked and its hidden norms over the kept channels."""
    copied = copy.deepcopy(model)
    masks = channel_masks(copied, groups, plan)
    with torch.no_grad():
        for name, parameter in copied.named_parameters():
            if name in masks:
                parameter.mul_(masks[name])
    return copied, norm_masks(copied, groups, plan)


def hidden_width_attributes(model: nn.Module) -> dict[str, int]:
    """Every attribute of the model that states the hidden width."""
    found = {name: getattr(model, name) for name in ("embed_dim", "num_features", "head_hidden_size") if hasattr(model, name)}
    if hasattr(model, "config"):
        found["config.hidden_size"] = model.config.hidden_size
    return found


@pytest.fixture(scope="module", params=PARAMS)
def discovered(request):
    build, example, expected = MODELS[request.param]
    torch.manual_seed(0)
    model, x = build().eval(), example()
    return request.param, build, model, x, find_channel_groups(model, x, heads=True, hidden=True), expected


def test_one_hidden_group_spans_the_residual_stream(discovered) -> None:
    name, _, model, x, groups, expected = discovered
    hidden = [group for group in groups if group.hidden]
    assert len(hidden) == 1
    group = hidden[0]
    assert group.size == (192 if name == "timm_vit" else WIDTH) and group.heads is None
    members = {(member.module, member.kind, member.parameter) for member in group.members}
    assert set(expected) <= members
    # every LayerNorm/RMSNorm of the model is in it; no attention's output width (head_dim) is
    norms = {n for n, m in model.named_modules() if isinstance(m, nn.LayerNorm) or type(m).__name__.endswith("RMSNorm")}
    assert norms <= {member.module for member in group.members}
    assert not any(member.kind == "out" and member.module.endswith(("q_proj", "query", "qkv", "c_attn")) for member in group.members)


def test_masked_equals_physically_pruned_and_the_models_widths_follow(discovered) -> None:
    name, build, model, x, groups, _ = discovered
    generator = torch.Generator().manual_seed(1)
    plan = {g.index: torch.randperm(g.size, generator=generator)[: max(1, g.size * 5 // 8)].sort().values for g in groups}
    group = next(g for g in groups if g.hidden)
    kept = len(plan[group.index])
    copied, handles = masked(model, groups, plan)
    predicted = FlopsPredictor(model, x, groups).predict(plan)
    pruned = copy.deepcopy(model)
    record = apply_plan(pruned, groups, plan, x)
    with torch.no_grad():
        torch.testing.assert_close(call(pruned, x), call(copied, x), rtol=1e-4, atol=1e-5)
    for handle in handles:
        handle.remove()
    assert predicted == count_flops(pruned, x).total < count_flops(model, x).total
    # the model's own attributes agree with its weights
    assert set(hidden_width_attributes(pruned).values()) == {kept}
    for module_name, module in pruned.named_modules():
        if isinstance(module, nn.LayerNorm):
            assert module.normalized_shape == (kept,) == tuple(module.weight.shape), module_name
        if isinstance(module, nn.Embedding):
            assert module.embedding_dim == kept == module.weight.shape[1], module_name
    for member in group.members:
        if member.kind == "parameter":
            assert getattr(pruned.get_submodule(member.module), member.parameter).shape[-1] == kept
    if name in ("gpt2",):
        assert pruned.lm_head.weight is pruned.transformer.wte.weight  # tied weights stay tied
    # a structure record (from the model or from its state_dict) restores the pruned model on a dense one
    for found in (record, structure_from_state_dict(build(), pruned.state_dict())):
        fresh = build().eval()
        restore_structure(fresh, found)
        fresh.load_state_dict(pruned.state_dict())
        assert hidden_width_attributes(fresh) == hidden_width_attributes(pruned)
        assert structure_record(fresh) == structure_record(pruned)
        with torch.no_grad():
            torch.testing.assert_close(call(fresh, x), call(pruned, x))
        if name == "gpt2":
            assert fresh.lm_head.weight is fresh.transformer.wte.weight


def test_a_tied_llama_keeps_its_embedding_and_lm_head_tied() -> None:
    torch.manual_seed(0)
    model, x = llama(tied=True).eval(), tokens()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    groups = find_channel_groups(model, x, hidden=True)
    group = next(g for g in groups if g.hidden)
    plan = {group.index: torch.arange(0, WIDTH, 2)}
    copied, _ = masked(model, groups, plan)
    pruned = copy.deepcopy(model)
    apply_plan(pruned, groups, plan, x)
    assert pruned.lm_head.weight is pruned.model.embed_tokens.weight and pruned.lm_head.weight.shape == (VOCAB, WIDTH // 2)
    assert pruned.config.hidden_size == WIDTH // 2
    with torch.no_grad():
        torch.testing.assert_close(call(pruned, x), call(copied, x), rtol=1e-4, atol=1e-5)


def test_without_hidden_the_residual_stream_is_refused_with_the_reason() -> None:
    torch.manual_seed(0)
    model, x = bert().eval(), tokens()
    assert not any(group.hidden for group in find_channel_groups(model, x))
    reasons = [r.reason for r in refused_channel_groups(model, x) if r.size == WIDTH and "LayerNorm" in r.reason]
    assert reasons and "hidden=True" in reasons[0]


def test_a_functional_norm_is_refused_with_the_reason() -> None:
    """A layer norm called as a function (no norm module to normalise over the kept channels when masked)
    computes otherwise once pruned: the group is refused with the reason, instead of found silently wrong."""

    class Stream(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed, self.head = nn.Linear(4, WIDTH), nn.Linear(WIDTH, 3)
            self.scale = nn.Parameter(torch.rand(WIDTH) + 0.5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.embed(x)
            return self.head(nn.functional.layer_norm(h, (h.shape[-1],)) * self.scale)

    torch.manual_seed(0)
    model, x = Stream().eval(), torch.randn(2, 5, 4)
    assert not find_channel_groups(model, x, hidden=True)
    refused = [r for r in refused_channel_groups(model, x, hidden=True) if r.root == "embed"]
    assert len(refused) == 1 and "does not compute what masking them computes" in refused[0].reason


def test_hidden_must_be_a_bool() -> None:
    with pytest.raises(ValueError, match="`hidden` must be True or False, got 'yes'"):
        find_channel_groups(nn.Linear(2, 2), torch.randn(1, 2), hidden="yes")


@pytest.mark.zoo
def test_convnext_stage_widths_through_layernorms_are_hidden_groups() -> None:
    """ConvNeXt's LayerNorm-coupled widths (channels-first ``LayerNorm2d`` and channels-last ``LayerNorm``): one
    hidden group per stage, removed as masked, FLOPs predicted as recounted, ``num_features`` following."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model, x = timm.create_model("convnext_atto", pretrained=False, num_classes=5).eval(), torch.randn(1, 3, 64, 64)
    groups = find_channel_groups(model, x, hidden=True)
    hidden = [group for group in groups if group.hidden]
    assert [group.size for group in hidden] == [40, 80, 160, 320]
    plan = {g.index: torch.arange(0, g.size, 3) for g in groups}
    copied, _ = masked(model, groups, plan)
    predicted = FlopsPredictor(model, x, groups).predict(plan)
    pruned = copy.deepcopy(model)
    record = apply_plan(pruned, groups, plan, x)
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), copied(x), rtol=1e-4, atol=1e-5)
    assert predicted == count_flops(pruned, x).total
    assert pruned.num_features == len(plan[hidden[-1].index]) == pruned.head.norm.weight.shape[0]
    fresh = timm.create_model("convnext_atto", pretrained=False, num_classes=5).eval()
    restore_structure(fresh, record)
    fresh.load_state_dict(pruned.state_dict())
    assert fresh.num_features == pruned.num_features
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), pruned(x))


def test_a_norm_whose_channels_are_not_where_masking_looks_is_refused_with_the_reason() -> None:
    """A LayerNorm that permutes its channels-first input itself (not named ``...2d``): its masked form cannot
    find the channels, so the group is refused with the reason instead of masked along the wrong dimension."""

    class ChannelsFirstNorm(nn.LayerNorm):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    model = nn.Sequential(nn.Conv2d(3, WIDTH, 1), ChannelsFirstNorm(WIDTH), nn.Conv2d(WIDTH, 3, 1)).eval()
    x = torch.randn(1, 3, 5, 5)
    assert not find_channel_groups(model, x, hidden=True)
    refused = [r for r in refused_channel_groups(model, x, hidden=True) if r.root == "0"]
    assert len(refused) == 1 and "the masked model fails" in refused[0].reason


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_a_hidden_pruned_language_model_generates_and_llama_round_trips_through_from_pretrained(name, tmp_path) -> None:
    """``generate`` runs on the pruned model; Llama's config states ``head_dim`` itself, so with
    ``config.hidden_size`` following the weights, ``save_pretrained`` -> ``from_pretrained`` rebuilds it
    (BERT, ViT and GPT-2 derive the head width from ``hidden_size``: load those through the structure record)."""
    build, example, _ = MODELS[name]
    torch.manual_seed(0)
    model, x = build().eval(), example()
    groups = find_channel_groups(model, x, hidden=True)
    group = next(g for g in groups if g.hidden)
    apply_plan(model, groups, {group.index: torch.arange(0, WIDTH, 2)}, x)
    generated = model.generate(**x, max_new_tokens=2, do_sample=False, pad_token_id=0)
    assert generated.shape == (2, SEQ + 2)
    if name == "llama":
        model.save_pretrained(tmp_path)
        loaded = type(model).from_pretrained(tmp_path).eval()
        assert loaded.config.hidden_size == WIDTH // 2
        with torch.no_grad():
            torch.testing.assert_close(call(loaded, x), call(model, x))


def test_a_loose_parameter_with_channels_outside_its_last_dimension_is_refused_with_the_reason() -> None:
    class Stream(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed, self.head = nn.Linear(4, WIDTH), nn.Linear(WIDTH, 3)
            self.scale = nn.Parameter(torch.rand(WIDTH, 1) + 0.5)  # channels along dim 0

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.embed(x) * self.scale.T)

    model, x = Stream().eval(), torch.randn(2, 4)
    assert not find_channel_groups(model, x, hidden=True)
    refused = [r for r in refused_channel_groups(model, x, hidden=True) if r.root == "embed"]
    assert len(refused) == 1 and "'scale' carries channels outside its last dimension" in refused[0].reason
