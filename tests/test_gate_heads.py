"""One gate per attention head in ``GatePruningFromScratch``: the head's gate scales its slice of the attention's
context before the output projection (a key/value head with its query heads under grouped-query attention), the one
threshold ranks head gates with channel gates, and the pruned network removes whole heads and meets the FLOPs
target. Tiny models built from configs (random weights, nothing downloaded)."""

from __future__ import annotations

import copy

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from lightning_prune import GatePruningFromScratch
from lightning_prune.diagnostics import count_ops
from lightning_prune.flops import count_flops
from lightning_prune.gate_search import GatePruning
from lightning_prune.gates import GatePhaseResult, gate_sites
from lightning_prune.pruner import hook_optimizer
from lightning_prune.structure import apply_plan

transformers = pytest.importorskip("transformers")
from test_attention_heads import MODELS, bert, call, head_counts, llama, random_plan, timm_vit, tokens  # noqa: E402
from test_diagnostics import own_host_reads  # noqa: E402
from test_gate_pruning import ListLogger  # noqa: E402
from test_huggingface import KeywordModule, loader  # noqa: E402

pytestmark = pytest.mark.zoo


class ImageModule(pl.LightningModule):
    """A positional-forward classifier around a timm model."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.example_input_array = torch.randn(1, 3, 32, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch: tuple, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):  # noqa: ANN201
        return torch.optim.SGD(self.parameters(), lr=0.01)


def images(n: int = 4) -> DataLoader:
    return DataLoader([(torch.randn(4, 3, 32, 32), torch.randint(0, 5, (4,))) for _ in range(n)], batch_size=None)


def head_sizes(model: nn.Module, name: str) -> list[int]:
    """Each layer's query head count, after checking it agrees with the q projection's and output projection's widths."""
    if name == "bert":
        attentions = [(layer.attention.self.num_attention_heads, layer.attention.self.query, layer.attention.output.dense,
                       layer.attention.self.attention_head_size) for layer in model.bert.encoder.layer]
    else:
        attentions = [(block.attn.num_heads, block.attn.qkv, block.attn.proj, block.attn.head_dim) for block in model.blocks]
    for heads, query, output, head_dim in attentions:
        assert query.out_features == head_dim * heads * (3 if name == "timm_vit" else 1)
        assert output.in_features == head_dim * heads
    return [heads for heads, *_ in attentions]


@pytest.mark.parametrize("name", ["bert", "timm_vit"])
def test_default_gate_fit_removes_whole_heads_and_meets_the_flops_target(name, trainer_factory) -> None:
    """Default arguments (``gate_position="bn"`` on a model without BatchNorm: heads gated per head, MLP widths at the
    layer outputs), one short gate epoch: 0.35 of the dense FLOPs reached within 0.01, heads removed with the
    modules' head counts following the weights, the callback's figure equal to fvcore's recount of the pruned model."""
    torch.manual_seed(0)
    if name == "bert":
        module, data, x = KeywordModule(bert()), loader(classes=True), tokens(1)
    else:
        module, data, x = ImageModule(timm_vit()), images(), torch.randn(1, 3, 32, 32)
    dense, logger = copy.deepcopy(module.model), ListLogger()
    dense_heads = head_sizes(dense, name)
    pruning = GatePruningFromScratch(flops_ratio=0.35, gate_epochs=1, verbose=False)
    trainer_factory([pruning], max_epochs=2, logger=logger).fit(module, data)
    recount, dense_flops = count_flops(module.model, x).total, count_flops(dense, x).total
    assert 0.34 <= pruning.reached_flops_ratio <= 0.35
    assert pruning.reached_flops_ratio == recount / dense_flops
    assert logger.values("prune/flops_macs") == [recount]
    heads = head_sizes(module.model, name)
    assert all(kept < total for kept, total in zip(heads, dense_heads))  # whole heads went in every layer
    head_groups = [group for group in pruning.figures.groups if group.heads is not None]
    assert [len(pruning.plan[group.index]) for group in head_groups] == heads  # one gate per head decided them
    module.eval()
    with torch.no_grad():
        assert torch.isfinite(call(module.model, tokens() if name == "bert" else torch.randn(2, 3, 32, 32))).all()


@pytest.mark.parametrize("name", sorted(MODELS))
def test_masked_by_gates_equals_the_physically_pruned_network(name) -> None:
    """With every gate 0 or 1 (heads and channels), the gated network computes what the network with the 0-gated
    heads and channels removed computes: each head's gate scales exactly that head's slice of the context (for
    Llama, a key/value head's query heads), packed (timm, GPT-2's ``Conv1D``) or separate q/k/v alike."""
    build, example, _, units, _ = MODELS[name]
    torch.manual_seed(0)
    model, x = build().eval(), example()
    core = GatePruning(model, x, count_flops(model, x), flops_ratio=1.0)
    search = core.search()
    heads = [group for group in core.groups if group.heads is not None]
    assert len(heads) == 2 and [search.gates.sizes[group.index] for group in heads] == [units, units]
    for seed in range(2):
        plan = random_plan(core.groups, seed + 1)
        plan.update({group.index: torch.arange(1) if seed == 0 else torch.arange(1, units) for group in heads})  # the first head, or all others
        with torch.no_grad():
            for index, gate in search.gates.gates.items():
                gate.zero_()[plan[index]] = 1.0
        with torch.no_grad(), search.gates.inserted():
            masked = call(model, x)
        pruned = copy.deepcopy(model)
        apply_plan(pruned, core.groups, plan, x)
        with torch.no_grad():
            torch.testing.assert_close(masked, call(pruned, x), rtol=1e-4, atol=1e-5)


def test_grouped_query_attention_gates_kv_heads_with_their_query_heads() -> None:
    """Llama with 4 query heads on 2 key/value heads: one gate per key/value head; a closed gate zeroes the
    ``o_proj`` inputs of its two query heads (2 * head_dim positions), the other query heads pass."""
    torch.manual_seed(0)
    model, x = llama().eval(), tokens()
    core = GatePruning(model, x, count_flops(model, x), flops_ratio=1.0)
    search = core.search()
    attention = model.model.layers[0].self_attn
    (group,) = [g for g in core.groups if g.heads == "model.layers.0.self_attn"]
    assert search.gates.sizes[group.index] == attention.config.num_key_value_heads == 2
    seen = []
    with torch.no_grad(), search.gates.inserted():
        search.gates.gates[group.index][0] = 0.0
        handle = attention.o_proj.register_forward_pre_hook(lambda module, inputs: seen.append(inputs[0]))
        call(model, x)
        handle.remove()
    (context,) = seen
    assert context.shape[-1] == 4 * 8
    assert (context[..., :16] == 0).all() and (context[..., 16:] != 0).all()


def test_the_threshold_ranks_head_gates_with_channel_gates() -> None:
    """Gates as learned: the heads' gates lowest, the MLP and pooler channels' high; the one threshold removes
    heads first (down to one per layer) and keeps every channel the budget then allows."""
    torch.manual_seed(0)
    model, x = bert().eval(), tokens(1)
    dense = count_flops(model, x)
    one_head = GatePruning(model, x, dense).predictor.predict_counts([1, 64, 1, 64, 32]) / dense.total
    core = GatePruning(model, x, dense, flops_ratio=one_head + 0.01)  # a second head in a layer would not fit
    gates = {index: torch.ones(size) for index, size in core.search().gates.sizes.items()}
    for group in core.groups:
        if group.heads is not None:
            gates[group.index] = torch.tensor([0.9, 0.1, 0.2, 0.3])  # head 0 highest
    result = GatePhaseResult(gates, {g: v.clone() for g, v in gates.items()}, "last", 1, None, 1)
    pruned = core.prune(result, init="inherit")
    for group in core.groups:
        kept = pruned.plan[group.index].tolist()
        assert kept == ([0] if group.heads is not None else list(range(group.size)))
    assert pruned.flops_ratio == pytest.approx(one_head, abs=1e-12)


def test_default_position_gates_heads_and_mlp_widths_each_where_it_can() -> None:
    """``gate_position="bn"`` on BERT: heads on the output projection's input, the MLP and pooler widths on their
    layers' outputs (no BatchNorm), with the warning that says so; the authors' ``"inner"`` sites keep the heads
    (a head's output feeds only its branch's output projection)."""
    model, x = bert().eval(), tokens(1)
    core = GatePruning(model, x, count_flops(model, x), sites="inner")
    assert core.gated == core.groups and sum(group.heads is not None for group in core.gated) == 2
    sites = gate_sites(model, core.gated, core.position)
    assert core.position == "conv" and "no gated channel group has a BatchNorm" in core.warning
    assert {(site.module, site.input) for site in sites} == {
        *((f"bert.encoder.layer.{i}.attention.output.dense", True) for i in range(2)),
        *((f"bert.encoder.layer.{i}.intermediate.dense", False) for i in range(2)),
        ("bert.pooler.dense", False),
    }


def test_head_gates_add_no_host_synchronisation_to_a_gate_step() -> None:
    """The gated forward synchronises exactly as often as the plain one (the model's own attention-mask checks),
    and the step (backward, penalty, Adam, clamp, running sums) only where Adam reads its own host step counter."""
    torch.manual_seed(0)
    model, x = bert().eval(), tokens()
    search = GatePruning(model, x, count_flops(model, x)).search()
    labels = torch.tensor([0, 1])
    forward = lambda: model(**x, labels=labels).loss  # noqa: E731
    hook_optimizer(search.optimizer, search)

    def step(loss: torch.Tensor) -> None:  # backward, penalty, Adam, clamp, running sums, the non-finite flag
        search.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        search.optimizer.step()
        search.flag_nonfinite(loss.detach())

    with search.prepare():
        step(forward())  # warm-up: lazily built state
        _, plain = count_ops(lambda: search.gates.remove() or forward())
        search.gates.attach()
        loss, gated = count_ops(forward)
        _, stepped = count_ops(step, loss)
    assert gated.sync_ops == plain.sync_ops and gated.ops > plain.ops  # the gates ran, without a host read
    assert stepped.sync_ops == own_host_reads(search.optimizer, 1)


def test_the_fill_spends_what_the_thresholds_last_head_leaves_on_units_that_fit() -> None:
    """Random scores on BERT (4 heads of ~9k FLOPs beside MLP channels of 512): the threshold alone may stop a whole
    head short of the target; with ``fill`` the plan stays within it, keeps every unit the threshold kept, and no
    group could take one more channel (head) without passing the target."""
    from lightning_prune.channel_search import search_threshold

    torch.manual_seed(0)
    model, x = bert().eval(), tokens(1)
    predictor = GatePruning(model, x, count_flops(model, x)).predictor
    sizes, short = predictor.sizes.tolist(), []
    for seed in range(5):
        scores = [torch.rand(size, generator=torch.Generator().manual_seed(seed * 10 + i)) for i, size in enumerate(sizes)]
        plain = search_threshold(scores, 0.35, predictor)
        filled = search_threshold(scores, 0.35, predictor, fill=True)
        assert plain.flops <= filled.flops == predictor.predict(filled.plan) <= 0.35 * predictor.dense
        assert filled.ratio >= 0.349  # the last MLP channel that fits is 512 / 146752 FLOPs
        short.append(plain.ratio < 0.34)
        for index, keep in filled.plan.items():
            assert set(plain.plan[index].tolist()) <= set(keep.tolist())
            assert keep.tolist() == torch.argsort(scores[index], descending=True)[: len(keep)].sort().values.tolist()
            if len(keep) < sizes[index]:
                counts = [len(filled.plan[g]) + (g == index) for g in range(len(sizes))]
                assert predictor.predict_counts(counts) > 0.35 * predictor.dense
    assert any(short)  # the threshold alone stopped a head short of the target (0.336, 0.314)
