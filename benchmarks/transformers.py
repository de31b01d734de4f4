"""Transformers at 0.35 of the FLOPs: lightning_prune's callbacks vs Torch-Pruning's head-and-width pruning.

On tiny Hugging Face BERT, ViT and T5 and a timm ViT (built from configs, random weights, nothing downloaded), each
method aims at a FLOPs ratio of ``TARGET`` = 0.35 (fvcore's count with attention's q·kᵀ and attn·v, one multiply-add
= one FLOP, per sample), then every pruned model gets the same short fine-tune on the same synthetic task:

- ``IterativeMagnitude(granularity="channel", schedule="one_shot", physical=True)``: heads and MLP widths ranked by
  their norm in one global ranking; it takes a weight ``sparsity``, so the sparsity is bisected until the FLOPs ratio
  the callback reports at its event is at most the target (each trial a fit of one batch);
- ``GatePruningFromScratch(flops_ratio=TARGET)``: gates trained at the random init, then the structure; where the
  target is below its smallest gated structure, the row gives that smallest ratio;
- Torch-Pruning's ``MetaPruner`` as in its ``examples/transformers`` scripts: ``num_heads`` of every q/k/v
  projection, ``prune_num_heads=True`` (whole heads), ``global_pruning=True`` (widths, the hidden width included,
  ranked globally by ``GroupMagnitudeImportance(p=2)``), the classifier ignored; one ``pruning_ratio`` (heads too,
  ``head_pruning_ratio``) from a grid, the one whose fvcore count comes closest to the target from below; head counts
  then set from the weights.

The synthetic task: inputs drawn at random, labels the dense model's own predictions (classes; for T5 the next
tokens it predicts), so every method fine-tunes towards the same function. Reported per model and method: the FLOPs
ratio reached (fvcore recount of the pruned model), the CPU latency ratio (fastest of repeated blocks of forwards of a batch of 32,
one thread, pruned over dense, measured alternately), and the held-out loss after ``epochs`` of fine-tuning
(AdamW, the same batches for every method; the dense model's own loss after the same fine-tune beside it).

    python -m benchmarks.transformers --suite quick|full [--out DIR] [--results benchmarks/results]
"""

from __future__ import annotations

import argparse
import copy
import logging
import pathlib
import statistics
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Optional

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch import nn
from torch.utils.data import DataLoader

from benchmarks.report import Section, Suite, machine, merge_section, one_thread, table
from lightning_prune import GatePruningFromScratch, IterativeMagnitude
from lightning_prune.flops import count_flops
from lightning_prune.structure import sync_head_counts

TARGET = 0.35
TOLERANCE = 0.01


@dataclass(frozen=True)
class Size:
    """One suite's sizes: model width and depth, batches, epochs, bisection steps, Torch-Pruning's grid of ratios
    (``1/grid, ..., (grid-1)/grid``), latency repeats."""

    width: int
    layers: int
    batches: int
    epochs: int
    gate_epochs: int
    steps: int
    grid: int
    repeats: int


SIZES: dict[str, Size] = {
    "quick": Size(width=32, layers=2, batches=2, epochs=1, gate_epochs=1, steps=5, grid=5, repeats=5),
    "full": Size(width=64, layers=4, batches=8, epochs=3, gate_epochs=2, steps=10, grid=20, repeats=20),
}
VOCAB, SEQ, IMAGE, CLASSES = 100, 16, 32, 4


@dataclass(frozen=True)
class Spec:
    """One model: how to build it at a width and depth, its keyword inputs, its q/k/v projections with their head
    counts (Torch-Pruning's ``num_heads``), the layers Torch-Pruning must keep and how its outputs become a loss."""

    label: str
    build: Callable[[int, int], nn.Module]
    inputs: Callable[[int], dict[str, torch.Tensor]]
    heads: Callable[[nn.Module], dict[nn.Module, int]]
    keep: Callable[[nn.Module], list[nn.Module]]
    seq2seq: bool = False


def _transformers() -> Any:
    import transformers

    return transformers


def _bert(width: int, layers: int) -> nn.Module:
    config = _transformers().BertConfig(hidden_size=width, num_hidden_layers=layers, num_attention_heads=4,
                                        intermediate_size=4 * width, vocab_size=VOCAB, max_position_embeddings=SEQ,
                                        num_labels=CLASSES)
    return _transformers().BertForSequenceClassification(config)


def _hf_vit(width: int, layers: int) -> nn.Module:
    config = _transformers().ViTConfig(hidden_size=width, num_hidden_layers=layers, num_attention_heads=4,
                                       intermediate_size=4 * width, image_size=IMAGE, patch_size=8, num_labels=CLASSES)
    return _transformers().ViTForImageClassification(config)


def _t5(width: int, layers: int) -> nn.Module:
    config = _transformers().T5Config(d_model=width, d_ff=4 * width, d_kv=width // 4, num_heads=4, num_layers=layers,
                                      num_decoder_layers=layers, vocab_size=VOCAB, decoder_start_token_id=0)
    return _transformers().T5ForConditionalGeneration(config)


def _timm_vit(width: int, layers: int) -> nn.Module:
    import timm

    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=IMAGE, patch_size=8, embed_dim=width,
                             depth=layers, num_heads=4, num_classes=CLASSES)


def _tokens(batch: int) -> dict[str, torch.Tensor]:
    return {"input_ids": torch.randint(0, VOCAB, (batch, SEQ)), "attention_mask": torch.ones(batch, SEQ, dtype=torch.long)}


def _per_projection(kind: str, projections: tuple[str, ...], count: str) -> Callable[[nn.Module], dict[nn.Module, int]]:
    def heads(model: nn.Module) -> dict[nn.Module, int]:
        return {
            module.get_submodule(path): getattr(module, count)
            for module in model.modules() if type(module).__name__ == kind for path in projections
        }

    return heads


SPECS: dict[str, Spec] = {
    "bert": Spec("HF BERT", _bert, _tokens, _per_projection("BertSelfAttention", ("query", "key", "value"), "num_attention_heads"),
                 lambda m: [m.classifier]),
    "hf_vit": Spec("HF ViT", _hf_vit, lambda batch: {"pixel_values": torch.randn(batch, 3, IMAGE, IMAGE)},
                   _per_projection("ViTAttention", ("q_proj", "k_proj", "v_proj"), "num_attention_heads"),
                   lambda m: [m.classifier]),
    "t5": Spec("HF T5", _t5, lambda batch: {**_tokens(batch), "decoder_input_ids": torch.randint(0, VOCAB, (batch, SEQ))},
               _per_projection("T5Attention", ("q", "k", "v"), "n_heads"), lambda m: [m.lm_head], seq2seq=True),
    "timm_vit": Spec("timm ViT", _timm_vit, lambda batch: {"x": torch.randn(batch, 3, IMAGE, IMAGE)},
                     _per_projection("Attention", ("qkv",), "num_heads"), lambda m: [m.head]),
}


def logits(output: Any) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else output.logits


class Task(pl.LightningModule):
    """A keyword-forward module (``forward(**inputs)``, a dict example input) trained with cross-entropy towards
    ``labels`` (classes, or one token per decoder position)."""

    def __init__(self, model: nn.Module, example: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.model, self.example_input_array = model, example

    def forward(self, **inputs: torch.Tensor) -> torch.Tensor:
        return logits(self.model(**inputs))

    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        inputs = {key: value for key, value in batch.items() if key != "labels"}
        return F.cross_entropy(self(**inputs).flatten(0, -2), batch["labels"].flatten())

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self.loss(batch)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


def synthetic_batches(spec: Spec, teacher: nn.Module, count: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """``count`` batches of 8: random inputs, labelled with the dense ``teacher``'s predictions."""
    torch.manual_seed(seed)
    batches = []
    with torch.no_grad():
        for _ in range(count):
            inputs = spec.inputs(8)
            batches.append({**inputs, "labels": logits(teacher.eval()(**inputs)).argmax(-1)})
    return batches


def _fit(module: Task, batches: list[dict[str, torch.Tensor]], callbacks: list[pl.Callback], epochs: int,
         out_dir: pathlib.Path, limit: Optional[int] = None) -> None:
    trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(out_dir),
                         callbacks=callbacks, limit_train_batches=limit)
    trainer.fit(module, DataLoader(batches, batch_size=None))


def held_out_loss(module: Task, batches: list[dict[str, torch.Tensor]]) -> float:
    module.eval()
    with torch.no_grad():
        return statistics.mean(float(module.loss(batch)) for batch in batches)


def flops_ratio(model: nn.Module, dense: nn.Module, example: dict[str, torch.Tensor]) -> float:
    """fvcore's count of ``model`` over that of ``dense`` (attention products included), per sample."""
    return count_flops(model.eval(), example).total / count_flops(dense.eval(), example).total


def latency_ratio(model: nn.Module, dense: nn.Module, inputs: dict[str, torch.Tensor], repeats: int) -> float:
    """The fastest of ``repeats`` blocks of 5 forwards of ``model`` over that of ``dense``, timed alternately (the
    minimum: the machine is shared, and other processes only ever add time)."""
    times: dict[int, list[float]] = {0: [], 1: []}
    with torch.no_grad():
        for _ in range(repeats):
            for index, net in enumerate((dense.eval(), model.eval())):
                began = time.perf_counter()
                for _ in range(5):
                    net(**inputs)
                times[index].append(time.perf_counter() - began)
    return min(times[1]) / min(times[0])


def magnitude_sparsity(spec: Spec, dense: nn.Module, batches: list, steps: int, out_dir: pathlib.Path) -> tuple[float, float]:
    """The smallest weight sparsity (bisection on [0, 0.95]) whose one-shot channel event leaves at most ``TARGET`` of
    the FLOPs, with the ratio it reaches; the sparsity that gets closest from below when none of the trials reach."""

    def reached(sparsity: float) -> float:
        module = Task(copy.deepcopy(dense), spec.inputs(1))
        pruning = IterativeMagnitude(sparsity=sparsity, schedule="one_shot", granularity="channel", monitor=None,
                                     make_permanent=False, verbose=False)
        _fit(module, batches, [pruning], 1, out_dir, limit=1)  # the event comes first, at the dense weights
        return pruning.figures.flops(pruning.pruner.plan) / pruning.figures.dense_flops.total

    low, high, best = 0.0, 0.95, (0.95, reached(0.95))
    for _ in range(steps):
        middle = (low + high) / 2
        ratio = reached(middle)
        if ratio <= TARGET:
            high, best = middle, (middle, ratio)
        else:
            low = middle
    return best


def magnitude(spec: Spec, dense: nn.Module, batches: list, held_out: list, size: Size, out_dir: pathlib.Path) -> dict[str, Any]:
    sparsity, predicted = magnitude_sparsity(spec, dense, batches, size.steps, out_dir)
    module = Task(copy.deepcopy(dense), spec.inputs(1))
    pruning = IterativeMagnitude(sparsity=sparsity, schedule="one_shot", granularity="channel", physical=True,
                                 monitor=None, verbose=False)
    _fit(module, batches, [pruning], size.epochs, out_dir)
    note = f"sparsity {sparsity:.3f} (bisected)"
    if predicted > TARGET:
        note = f"unreachable: {predicted:.3f} at sparsity {sparsity:.2f}, the largest tried"
    return {"model": module.model, "note": note, "loss": held_out_loss(module, held_out)}


def gates(spec: Spec, dense: nn.Module, batches: list, held_out: list, size: Size, out_dir: pathlib.Path) -> dict[str, Any]:
    module = Task(copy.deepcopy(dense), spec.inputs(1))
    pruning = GatePruningFromScratch(flops_ratio=TARGET, gate_epochs=size.gate_epochs, select="last", verbose=False)
    try:
        _fit(module, batches, [pruning], size.gate_epochs + size.epochs, out_dir)
    except ValueError as error:  # the target below its smallest gated structure: the message says how far it goes
        return {"model": None, "note": "unreachable: " + str(error).split(": ", 1)[-1], "loss": None}
    return {"model": module.model, "note": f"{size.gate_epochs} gate epochs", "loss": held_out_loss(module, held_out)}


def torch_pruned(spec: Spec, dense: nn.Module, ratio: float) -> nn.Module:
    """A copy of ``dense`` pruned by Torch-Pruning's ``MetaPruner`` at ``ratio`` (heads and widths, globally), with
    the attention modules' head counts following the pruned projections."""
    model = copy.deepcopy(dense).eval()
    example = spec.inputs(1)
    pruner = tp.pruner.MetaPruner(
        model, example, importance=tp.importance.GroupMagnitudeImportance(p=2), global_pruning=True,
        pruning_ratio=ratio, num_heads=spec.heads(model), prune_num_heads=True, prune_head_dims=False,
        head_pruning_ratio=ratio, ignored_layers=spec.keep(model), output_transform=lambda out: logits(out).sum(),
    )
    pruner.step()
    sync_head_counts(model)  # BERT, ViT, timm: head counts from the pruned projections
    for module in model.modules():
        if type(module).__name__ == "T5Attention":  # not a covered layout: its counts as Torch-Pruning's examples set them
            module.n_heads, module.inner_dim = module.q.out_features // module.key_value_proj_dim, module.q.out_features
    return model


def torch_pruning(spec: Spec, dense: nn.Module, batches: list, held_out: list, size: Size, out_dir: pathlib.Path) -> dict[str, Any]:
    """Torch-Pruning's FLOPs do not fall monotonically with its ``pruning_ratio`` under global pruning (measured: BERT
    0.36 at 0.5, 0.42 at 0.6), so the ratios of a grid are tried: the largest FLOPs ratio at most ``TARGET`` wins,
    else the smallest reached. A trial that fails (an error in pruning or in the pruned model's forward) is skipped."""
    reached, failures = {}, []
    for step in range(1, size.grid):
        ratio = step / size.grid
        try:
            model = torch_pruned(spec, dense, ratio)
            with torch.no_grad():
                model(**spec.inputs(8))
            reached[ratio] = flops_ratio(model, dense, spec.inputs(1))
        except RuntimeError as error:
            failures.append(f"{ratio:.2f}: {str(error).splitlines()[0][:90]}")
    if not reached:
        return {"model": None, "note": f"every pruning_ratio failed, e.g. {failures[0]}", "loss": None}
    meeting = [ratio for ratio, flops in reached.items() if flops <= TARGET]
    chosen = max(meeting, key=reached.get) if meeting else min(reached, key=reached.get)
    module = Task(torch_pruned(spec, dense, chosen), spec.inputs(1))
    _fit(module, batches, [], size.epochs, out_dir)
    note = f"pruning_ratio {chosen:.2f} of a grid of {size.grid - 1}" + ("" if meeting else " (none meets the target)")
    if failures:
        note += f"; {len(failures)} failed, e.g. {failures[0]}"
    return {"model": module.model, "note": note, "loss": held_out_loss(module, held_out)}


def dense_run(spec: Spec, dense: nn.Module, batches: list, held_out: list, size: Size, out_dir: pathlib.Path) -> dict[str, Any]:
    module = Task(copy.deepcopy(dense), spec.inputs(1))
    _fit(module, batches, [], size.epochs, out_dir)
    return {"model": module.model, "note": "", "loss": held_out_loss(module, held_out)}


METHODS: dict[str, Callable[..., dict[str, Any]]] = {
    "dense": dense_run,
    "IterativeMagnitude channel": magnitude,
    "GatePruningFromScratch": gates,
    "Torch-Pruning heads + widths": torch_pruning,
}


def measure(name: str, size: Size, out_dir: pathlib.Path, methods: dict[str, Callable[..., dict[str, Any]]] = METHODS) -> list[dict[str, Any]]:
    """Every method on model ``name``: one row each (FLOPs ratio, latency ratio, loss, note)."""
    spec = SPECS[name]
    torch.manual_seed(0)
    dense = spec.build(size.width, size.layers).eval()
    batches = synthetic_batches(spec, dense, size.batches, seed=1)
    held_out = synthetic_batches(spec, dense, 2, seed=2)
    rows = []
    for method, run_method in methods.items():
        torch.manual_seed(0)
        began = time.perf_counter()
        result = run_method(spec, dense, batches, held_out, size, out_dir)
        model = result["model"]
        rows.append({
            "model": spec.label, "method": method, "note": result["note"], "loss": result["loss"],
            "flops_ratio": None if model is None else flops_ratio(model, dense, spec.inputs(1)),
            "latency_ratio": None if model is None else latency_ratio(model, dense, spec.inputs(32), size.repeats),
            "seconds": time.perf_counter() - began,
        })
    return rows


def _cell(value: Optional[float], digits: int = 3) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


@one_thread()
def run(suite: Suite, out_dir: pathlib.Path) -> Section:
    """Every model and method of ``suite`` in one run."""
    size = SIZES[suite]
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = [row for name in SPECS for row in measure(name, size, out_dir)]
    body = table(
        ["model", "method", "FLOPs ratio (fvcore)", "CPU latency ratio", "loss after fine-tune", "note"],
        [[r["model"], r["method"], _cell(r["flops_ratio"]), _cell(r["latency_ratio"], 2), _cell(r["loss"]),
          r["note"] or ""] for r in rows],
    )
    missed = [r for r in rows if r["method"] != "dense" and (r["flops_ratio"] is None or r["flops_ratio"] > TARGET + 1e-9)]
    notes = [f"Target {TARGET} of the dense FLOPs; a row above it (or without a model) did not reach it: "
             + (", ".join(f"{r['model']} / {r['method']}" for r in missed) or "none") + ".",
             f"Sizes: width {size.width}, {size.layers} layers, {size.batches} batches of 8, {size.epochs} fine-tune epochs.",
             "The dense row's latency ratio (its fine-tuned copy against the dense model, the same shapes) shows the "
             "timing noise of the machine.",
             "Machine: {cpu}, {cores} cores, 1-min load average {load_average_1min} at the end; torch {torch}; commit "
             "{git_commit}; {date}.".format(**machine())]
    return Section(f"Transformers at {TARGET} of the FLOPs: heads and widths vs Torch-Pruning", body,
                   data={"target": TARGET, "size": size.__dict__, "rows": rows}, notes=notes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--suite", choices=sorted(SIZES), default="quick")
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("outputs/transformers"))
    parser.add_argument("--results", type=pathlib.Path, default=None,
                        help="also put the section into this directory's results.json and RESULTS.md")
    args = parser.parse_args()
    for logger in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric", "lightning_prune"):
        logging.getLogger(logger).setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        section = run(args.suite, args.out)
    print(f"# {section.title}\n\n{section.markdown}\n\n" + "\n".join(f"- {note}" for note in section.notes))
    if args.results is not None:
        section.command = f"python -m benchmarks.transformers --suite {args.suite} --results {args.results}"
        merge_section(section, args.results)


if __name__ == "__main__":
    main()
