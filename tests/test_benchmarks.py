"""The benchmark command's pieces: the papers' networks, the docs page generated from results.json,
the experiment contract, the random baseline and the "behind" detection."""

import importlib
import inspect
import json
import pathlib
import typing

import pytest
import pytorch_lightning as pl
import torch

from benchmarks import EXPERIMENTS
from benchmarks.__main__ import main
from benchmarks.report import (
    DOCS_BEGIN,
    DOCS_END,
    RESULTS_DIR,
    Behind,
    Section,
    load_results,
    merge_section,
    render_docs,
    render_results,
    replace_marked_section,
)
from benchmarks.magnitude_digits import model_pruning
from benchmarks.unstructured_quality import AUTOPRUNE, DENSE, RANDOM, RandomPruning, Setting, behind
from lightning_prune import DigitsDataModule, ImageClassifier, PruningSchedule, sparsity_report
from lightning_prune.demo.models import build_network

ROOT = pathlib.Path(__file__).resolve().parents[1]


def parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_caffe_lenet5_has_431080_parameters_on_28x28() -> None:
    model = build_network("lenet5_caffe", num_classes=10, in_channels=1, image_size=28)
    # conv1 20·1·25 + 20, conv2 50·20·25 + 50, fc1 (50·4·4)·500 + 500, fc2 500·10 + 10
    assert parameters(model) == 520 + 25_050 + 400_500 + 5_010 == 431_080
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    assert ImageClassifier("lenet5_caffe", image_size=28)(torch.zeros(1, 1, 28, 28)).shape == (1, 10)


def test_vgg_like_is_cifar_torch_vgg_bn_drop() -> None:
    model = build_network("vgg_like", num_classes=10, in_channels=3, image_size=32)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]
    assert [m.out_features for m in model.modules() if isinstance(m, torch.nn.Linear)] == [512, 10]
    assert parameters(model) == 14_991_946
    assert model.eval()(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


def test_caffe_lenet5_names_a_too_small_image() -> None:
    with pytest.raises(ValueError, match="`image_size`.*16.*8"):
        build_network("lenet5_caffe", image_size=8)


def test_docs_benchmarks_page_is_generated_from_the_committed_results() -> None:
    results = load_results(RESULTS_DIR / "results.json")
    page = (ROOT / "docs" / "benchmarks.md").read_text()
    section = page[page.index(DOCS_BEGIN): page.index(DOCS_END) + len(DOCS_END)]
    assert section == render_docs(results), "docs/benchmarks.md is stale: run python -m benchmarks docs"
    assert (RESULTS_DIR / "RESULTS.md").read_text() == render_results(results)
    for name in (figure for s in results["sections"] for figure in s["figures"]):
        assert (RESULTS_DIR / name).is_file() and f"benchmarks/results/{name}" in section


def test_docs_command_rewrites_only_the_marked_section(tmp_path, monkeypatch) -> None:
    results = load_results(RESULTS_DIR / "results.json")
    page = tmp_path / "benchmarks.md"
    page.write_text(f"# title\n\n{DOCS_BEGIN}\nold\n{DOCS_END}\n\n## after\n")
    monkeypatch.setattr("benchmarks.__main__.DOCS_PAGE", page)
    main(["docs", "--results", str(RESULTS_DIR / "results.json")])
    assert page.read_text() == f"# title\n\n{render_docs(results)}\n\n## after\n"
    with pytest.raises(ValueError, match="`page` must hold the markers"):
        replace_marked_section("no markers here", "x")


def test_every_behind_item_is_listed_with_an_anchor_and_its_reason() -> None:
    section = Section("t", "body", behind=[Behind("behind-x", "slower at 8x", "because of y")])
    results = {"suite": "quick", "seeds": [0], "seconds": 1.0, "sections": [json.loads(json.dumps(section.__dict__, default=vars))],
               "machine": {"cpu": "c", "cores": 2, "load_average_1min": 0.0, "python": "3", "torch": "2", "date": "d", "git_commit": "abc"}}
    text = render_docs(results)
    assert '<a id="behind-x"></a>**slower at 8x** — because of y' in text
    assert "None measured" not in text
    results["sections"][0]["behind"] = []
    assert "None measured in this run." in render_docs(results)


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_follows_the_contract(name: str) -> None:
    run = importlib.import_module(name).run
    hints = typing.get_type_hints(run)
    assert list(inspect.signature(run).parameters) == ["suite", "out_dir"]
    assert typing.get_args(hints["suite"]) == ("quick", "full") and hints["out_dir"] is pathlib.Path
    assert hints["return"] is Section


def test_run_names_an_unknown_experiment(tmp_path) -> None:
    with pytest.raises(ValueError, match="`--only`.*'nope'"):
        main(["run", "--suite", "quick", "--out", str(tmp_path), "--only", "nope"])
    assert not (tmp_path / "results.json").exists()


@pytest.mark.filterwarnings("ignore")
def test_random_pruning_zeroes_exactly_round_s_n_weights_and_keeps_them_zero() -> None:
    pl.seed_everything(0, verbose=False)
    model = ImageClassifier("lenet300100")
    total = sparsity_report(model).total.total
    pruning = RandomPruning(0.75, epoch=1, seed=0)
    trainer = pl.Trainer(max_epochs=3, limit_train_batches=3, limit_val_batches=0, callbacks=[pruning], logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    trainer.fit(model, DigitsDataModule())
    assert total - sparsity_report(model).total.nonzero == round(0.75 * total)
    per_layer = [1 - row.nonzero / row.total for row in sparsity_report(model).layers]
    assert all(0.7 < s < 0.8 for s in per_layer[:2])  # uniform at random: every large layer near 75%
    with pytest.raises(ValueError, match="`sparsity`"):
        RandomPruning(1.0, 0, 0)


def runs(accuracy: float) -> list[dict[str, float]]:
    return [{"accuracy": accuracy, "compression": 4.0}]


def test_behind_flags_a_clear_gap_to_a_baseline_and_not_noise() -> None:
    setting = Setting("lenet300100", 8, 1, 4, 1, 2, 1, (4.0,), ("AGP (global)", RANDOM), "LeNet")
    results = {DENSE: {0.0: runs(97.0)}, "AGP (global)": {4.0: runs(90.0)}, RANDOM: {4.0: runs(95.0)}}
    [item] = behind(setting, results, test_images=270)
    assert "AGP (global) 90.0% < random 95.0% at 4x" in item.claim and item.reason
    results[AUTOPRUNE] = {0.0: runs(96.0)}
    results[AUTOPRUNE][0.0][0]["compression"] = 1.5  # below every target
    assert "AutoPruneCallback reaches only 1.5x" in behind(setting, results, test_images=270)[-1].claim
    results[AUTOPRUNE] = {0.0: runs(96.0)}
    results["AGP (global)"] = {4.0: runs(95.0 - 200 / 270)}  # exactly two test images: noise
    assert behind(setting, results, test_images=270) == []


def test_model_pruning_reaches_the_absolute_targets_and_refuses_an_event_at_epoch_0() -> None:
    schedule = PruningSchedule("agp", 1, 3, 1)
    amount = model_pruning(schedule, 0.75).amount
    remaining, reached = 1.0, []
    for epoch in (0, 1, 2):
        remaining *= 1.0 - amount(epoch)  # ModelPruning prunes `amount` of the remaining weights at the end of `epoch`
        reached.append(1.0 - remaining)
    assert reached == pytest.approx([0.75 * schedule.fraction(target) for target in schedule.events])
    with pytest.raises(ValueError, match="`schedule` must start at epoch >= 1"):
        model_pruning(PruningSchedule("agp", 0, 2, 1), 0.75)



def test_run_writes_results_json_results_md_and_figures_of_every_experiment(tmp_path, monkeypatch) -> None:
    (tmp_path / "tiny_experiment.py").write_text(
        "import pathlib\n"
        "from benchmarks.report import Section\n"
        "def run(suite, out_dir: pathlib.Path) -> Section:\n"
        "    (out_dir / 'tiny.png').write_bytes(b'png')\n"
        "    return Section('Tiny', f'| a |\\n|---|\\n| {suite} |', ['tiny.png'], {'suite': suite})\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr("benchmarks.__main__.EXPERIMENTS", ["tiny_experiment"])
    out = tmp_path / "out"
    main(["run", "--suite", "full", "--out", str(out)])
    results = json.loads((out / "results.json").read_text())
    assert results["suite"] == "full" and results["seeds"] == [0, 1, 2]
    assert {"cpu", "cores", "torch", "date", "git_commit"} <= set(results["machine"])
    [section] = results["sections"]
    assert section["title"] == "Tiny" and section["data"] == {"suite": "full"} and section["figures"] == ["tiny.png"]
    assert (out / "RESULTS.md").read_text() == render_results(results)
    assert "## Tiny" in render_results(results) and "![tiny.png](tiny.png)" in render_results(results)


@pytest.mark.slow
def test_quick_suite_runs_every_experiment_end_to_end(tmp_path) -> None:
    """The command of the Benchmarks docs page, on the quick suite: every experiment runs and is reported."""
    main(["run", "--suite", "quick", "--out", str(tmp_path)])
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["suite"] == "quick" and len(results["sections"]) == len(EXPERIMENTS)
    assert (tmp_path / "RESULTS.md").read_text() == render_results(results)


def test_merge_section_adds_a_scripts_section_to_results_md_but_not_to_the_docs_page(tmp_path) -> None:
    """A script run on its own (``--results``) lands in RESULTS.md with its command; the docs page (the suite's
    output) stays as the last suite run wrote it; a second merge of the same title replaces the first."""
    suite = {**load_results(RESULTS_DIR / "results.json")}
    (tmp_path / "results.json").write_text(json.dumps(suite))
    merge_section(Section("Script", "| a |\n|---|\n| first merge |", command="python -m benchmarks.script"), tmp_path)
    merge_section(Section("Script", "| a |\n|---|\n| second merge |", command="python -m benchmarks.script"), tmp_path)
    results = json.loads((tmp_path / "results.json").read_text())
    assert [s["title"] for s in results["sections"]] == [s["title"] for s in suite["sections"]] + ["Script"]
    markdown = (tmp_path / "RESULTS.md").read_text()
    assert markdown == render_results(results) and "| second merge |" in markdown and "| first merge |" not in markdown
    assert "Reproduce: `python -m benchmarks.script`" in markdown
    assert render_docs(results) == render_docs(suite)
    with pytest.raises(ValueError, match="`section.command` must name the command"):
        merge_section(Section("No command", "x"), tmp_path)


@pytest.mark.zoo
@pytest.mark.filterwarnings("ignore")
def test_transformer_benchmark_reaches_the_target_by_bisection_and_torch_pruning_removes_whole_heads(tmp_path) -> None:
    """``benchmarks/transformers.py`` on a one-layer BERT: Torch-Pruning's head-and-width pruning removes whole heads
    and the head counts follow the weights; with IterativeMagnitude's bisected sparsity, fvcore's recount of the model
    its fit leaves meets the FLOPs target."""
    from benchmarks import transformers as bench

    spec, size = bench.SPECS["bert"], bench.Size(width=32, layers=1, batches=1, epochs=1, gate_epochs=1, steps=3, grid=3, repeats=1)
    torch.manual_seed(0)
    dense = spec.build(size.width, size.layers).eval()
    pruned = bench.torch_pruned(spec, dense, 0.5)
    attention = pruned.bert.encoder.layer[0].attention.self
    assert attention.query.out_features == 8 * attention.num_attention_heads < 32  # heads of 8 went whole
    assert pruned(**spec.inputs(2)).logits.shape == (2, bench.CLASSES)
    methods = {"IterativeMagnitude channel": bench.magnitude}
    [row] = bench.measure("bert", size, tmp_path, methods)
    assert row["flops_ratio"] <= bench.TARGET and row["note"].startswith("sparsity")
    assert row["loss"] > 0 and row["latency_ratio"] > 0
