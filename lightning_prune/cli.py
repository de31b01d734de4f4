"""The ``lightning-prune`` command: LightningCLI over any LightningModule, DataModule and callbacks."""

from __future__ import annotations

import re
import sys
from importlib import import_module
from pathlib import Path
from typing import Any, Literal, Optional

import pytorch_lightning as pl
from pytorch_lightning.cli import ArgsType, LightningCLI
from pytorch_lightning.loggers import Logger

from lightning_prune.sensitivity import DEFAULT_LEVELS, SensitivityTable, sensitivity_analysis


ENTRY_POINTS = {
    "pytorch_lightning": "the `lightning-prune` command (or `python -m lightning_prune.cli`)",
    "lightning.pytorch": "`python -m lightning_prune.lightning` (callbacks: `lightning_prune.lightning.IterativeMagnitude`, ...)",
}


def _class_paths(args: ArgsType) -> list[str]:
    """Every ``class_path`` named on the command line or in a ``--config`` file given there."""
    items = [str(item) for item in (sys.argv[1:] if args is None else args if isinstance(args, (list, tuple)) else [])]
    texts = list(items)
    for flag, value in zip(items, items[1:]):
        if flag in ("--config", "-c") and Path(value).is_file():
            texts.append(Path(value).read_text())
    return re.findall(r"class_path[:=]\s*['\"]?([A-Za-z_][\w.]*)", "\n".join(texts))


def other_namespace_hint(args: ArgsType, namespace: Any) -> Optional[str]:
    """A message naming the right entry point when ``args`` choose a class of the other Lightning namespace."""
    other = "lightning.pytorch" if namespace.__name__ == "pytorch_lightning" else "pytorch_lightning"
    try:
        other_module = import_module(other)
    except ImportError:
        return None
    bases = tuple(getattr(other_module, name) for name in ("Callback", "LightningModule", "LightningDataModule"))
    for path in _class_paths(args):
        module_name, _, name = path.rpartition(".")
        try:
            cls = getattr(import_module(module_name), name)
        except (ImportError, AttributeError, ValueError):
            continue
        if isinstance(cls, type) and issubclass(cls, bases) and not issubclass(cls, (namespace.Callback, namespace.LightningModule, namespace.LightningDataModule)):
            return (
                f"`{path}` is a `{other}` class, and this is the `{namespace.__name__}` CLI: run {ENTRY_POINTS[other]}, "
                f"or choose the `{namespace.__name__}` classes for {ENTRY_POINTS[namespace.__name__]}."
            )
    return None


def build_cli(args: ArgsType = None, run: bool = True, namespace: Any = pl) -> LightningCLI:
    """LightningCLI where the model, the data and every callback are chosen by ``class_path`` in YAML.

    ``namespace`` is ``pytorch_lightning`` or the unified package's ``lightning.pytorch``: its own
    LightningCLI, LightningModule and LightningDataModule are used. A class of the other namespace
    is refused with a message naming the entry point that takes it.
    """
    cli_class = import_module(f"{namespace.__name__}.cli").LightningCLI
    try:
        return _build(cli_class, namespace, args, run)
    except SystemExit as error:
        hint = other_namespace_hint(args, namespace) if error.code else None
        if hint is not None:
            print(f"lightning_prune: {hint}", file=sys.stderr)
        raise


def _build(cli_class: Any, namespace: Any, args: ArgsType, run: bool) -> LightningCLI:
    return cli_class(
        namespace.LightningModule,
        namespace.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
    )


def main(args: Optional[list[str]] = None) -> None:
    """Entry point of the ``lightning-prune`` console script (``fit``, ``validate``, ``test``, ``predict``)."""
    build_cli(args)


def sensitivity_command(
    model: pl.LightningModule,
    data: pl.LightningDataModule,
    ckpt_path: Optional[str] = None,
    levels: list[float] = list(DEFAULT_LEVELS),
    max_drop: Optional[float] = None,
    split: Literal["val", "test", "train"] = "val",
    parameters: Optional[list[str]] = None,
    exclude: Optional[list[str]] = None,
    limit_batches: Optional[int] = None,
    output_dir: str = "sensitivity",
    logger: Optional[Logger] = None,
    progress: bool = True,
) -> SensitivityTable:
    """Sensitivity analysis of a trained model: each Conv/Linear layer pruned alone to each level.

    Writes ``<output_dir>/sensitivity.csv`` and ``sensitivity.png``; with ``max_drop`` also
    ``proposal.yaml`` (per-layer ``sparsity`` and ``sensitivity`` for ``IterativeMagnitude``).
    With a ``logger``: scalars (baseline, proposals) to it; with a ``WandbLogger`` also the table
    (``sensitivity/table``), the curves (``sensitivity/curves``) and the CSV file.

    Args:
        model: the LightningModule (``class_path`` and ``init_args``, as in the training config).
        data: the LightningDataModule to evaluate on.
        ckpt_path: checkpoint whose weights (and, if physically pruned, structure) are loaded.
        levels: strictly increasing sparsities in (0, 1).
        max_drop: allowed drop of the metric for the per-layer proposal (e.g. 0.01 = one point).
        split: which of the data module's loaders to evaluate on.
        parameters: glob patterns of module names to analyse (default: every Conv/Linear).
        exclude: glob patterns of module names to skip.
        limit_batches: evaluate on the first batches only.
        output_dir: folder of the CSV, PNG and proposal.
        logger: a Lightning logger (e.g. ``pytorch_lightning.loggers.WandbLogger``).
        progress: show a progress bar.
    """
    import torch
    import yaml

    from lightning_prune.loggers import is_wandb_logger
    from lightning_prune.training_state import restore_structure_from_checkpoint

    if ckpt_path is not None:
        checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        restore_structure_from_checkpoint(model, checkpoint)
        model.load_state_dict(checkpoint["state_dict"])
    data.prepare_data()
    data.setup("test" if split == "test" else "fit")
    loader = getattr(data, f"{split}_dataloader")()
    table = sensitivity_analysis(model, loader, levels, None, parameters, exclude, limit_batches, progress)

    out = Path(output_dir)
    csv_path, png_path = table.to_csv(out / "sensitivity.csv"), table.plot(out / "sensitivity.png")
    print(f"dense {table.metric}: {table.baseline:.4f}; wrote {csv_path} and {png_path}")
    scalars = {f"sensitivity/baseline_{table.metric}": table.baseline}
    if max_drop is not None:
        proposal = {"sparsity": table.propose_sparsity(max_drop), "sensitivity": table.propose_sensitivity(max_drop)}
        (out / "proposal.yaml").write_text(yaml.safe_dump(proposal, sort_keys=False))
        print(f"per-layer proposal for a drop of at most {max_drop} ({out / 'proposal.yaml'}):\n{yaml.safe_dump(proposal, sort_keys=False)}")
        scalars.update({f"sensitivity/proposed_sparsity/{k}": v for k, v in proposal["sparsity"].items()})
    if logger is not None:
        logger.log_metrics(scalars, step=0)
        if is_wandb_logger(logger):
            import wandb

            columns = list(table.rows()[0])
            logger.experiment.log({
                "sensitivity/table": wandb.Table(columns=columns, data=[list(row.values()) for row in table.rows()]),
                "sensitivity/curves": wandb.Image(str(png_path)),
            })
            logger.experiment.save(str(csv_path), base_path=str(out), policy="now")
            logger.experiment.finish()
        else:
            logger.finalize("success")
    return table


def sensitivity_main(args: Optional[list[str]] = None) -> None:
    """Entry point of the ``lightning-prune-sensitivity`` console script (options: ``--help``)."""
    from jsonargparse import CLI

    CLI(sensitivity_command, args=args, as_positional=False)
