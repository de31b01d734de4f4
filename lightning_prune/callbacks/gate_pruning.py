"""``GatePruningFromScratch``: learn channel gates on random weights, meet a FLOPs target and train the
pruned network from scratch, in one ``fit`` (Wang et al., "Pruning from Scratch", AAAI 2020)."""

from __future__ import annotations

import itertools
import math
import time
from typing import Any, Literal, Optional, Union

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from typing_extensions import override

from lightning_prune.callbacks._shared import check_choice, check_range, example_input
from lightning_prune.callbacks._strategy import prepare_module
from lightning_prune.flops import FlopsPredictor, count_flops, search_threshold
from lightning_prune.gates import (
    GATE_POSITIONS,
    ChannelGates,
    GatePhaseResult,
    GatePosition,
    NonFiniteGateLoss,
    gate_scores,
    gate_sites,
    learn_gates,
)
from lightning_prune.loggers import log_metrics, log_pruning_event
from lightning_prune.structure import (
    STRUCTURE_KEY,
    ChannelGroup,
    ChannelPlan,
    apply_plan,
    find_channel_groups,
    layer_channel_ratios,
    structure_record,
)
from lightning_prune.training_state import rebuild_training_state


class GatePruningFromScratch(pl.Callback):
    r"""Pruning from Scratch: find a channel structure on the random initialisation, then train it.

    At the start of training (``on_train_start``, inside the same ``fit``):

    1. **Gate phase.** One gate λ ∈ [0, 1] per prunable channel (one per channel of a coupled group:
       residual adds and concatenations share it), initialised to 1, multiplies the channel's output
       (``gate_position``). With every weight frozen at its random initialisation, only the gates
       learn, with Adam (``gate_lr``) for ``gate_epochs`` passes over the training data, on

       .. math:: L = \mathrm{CE}(f(x; W, Λ), y) + γ\,(\lVert Λ\rVert_1 / C - r)^2 + l_1 \lVert Λ\rVert_1,

       clamping the gates to [0, 1] after every step. The network runs in training mode (BatchNorm
       batch statistics, as in the authors' code); BatchNorm affine parameters do not train. The
       running statistics the phase accumulates are used by the snapshot validations and then
       restored, so the network that goes on to train carries nothing of the gate phase but its shape.
    2. **Selection.** ``select="best_val"``: the gates are evaluated on the validation data after
       each gate epoch (or every ``gate_val_every`` steps); the snapshot with the best accuracy among
       those whose fraction of non-zero gates is ``<= gate_ratio`` is kept, else the last gates.
    3. **Threshold.** A binary search of one global threshold over all gates
       (``flops.search_threshold``) picks the largest structure whose fvcore FLOPs are at most
       ``flops_ratio`` × the dense (unexpanded) model's. Equal gates (e.g. several clamped to 0) are
       ordered by their mean value over the phase, so the target is met to one channel.
    4. **Prune and re-initialise.** The structure is built physically (``structure.apply_plan``),
       re-initialised (``init``), and the optimizers and schedulers of the LightningModule's own
       ``configure_optimizers`` are re-created on the new parameters; the Trainer then trains the
       pruned network for its epochs (``budget_training``: ``round(max_epochs / flops_ratio)``).

    The gate phase logs ``gate/loss``, ``gate/ce``, ``gate/mean``, ``gate/nonzero_fraction``,
    ``gate/val_acc`` and ``gate/step`` (at global step 0, every ``log_every_n_steps`` gate steps);
    the chosen structure logs ``prune/flops_ratio``, ``prune/flops_macs``, ``prune/params_ratio``,
    ``prune/threshold``, the channel-ratio vector (a wandb table and line plot, or per-layer
    scalars) and a gate histogram, and prints a table of kept channels per layer.

    Checkpoints written afterwards hold the structure (``structure.STRUCTURE_KEY``):
    ``trainer.fit(ckpt_path=...)`` reshapes the model in ``setup`` and never re-runs the gate phase;
    ``ImageClassifier.load_from_checkpoint`` rebuilds the pruned network.

    Channel expansion: with ``expansion != 1`` the gates are learned on the network widened by that
    factor while the FLOPs target stays relative to the unwidened model. The LightningModule must
    define a ``width`` attribute and ``set_width(width: float)`` that rebuilds its network at that
    channel multiplier (``ImageClassifier`` does); otherwise ``setup`` raises.

    Args:
        flops_ratio: FLOPs of the pruned model / FLOPs of the dense (unexpanded) model, in (0, 1].
        gate_ratio: ``r``, the target mean gate ‖Λ‖₁/C, in (0, 1) (paper: 0.2 on CIFAR, 0.5 on ImageNet).
        gamma: ``γ``, weight of the ratio term (paper: 0.5 on CIFAR, 0.05 on ImageNet).
        l1: weight of an extra plain L1 term ``‖Λ‖₁`` (0: off).
        gate_epochs: passes over the training data in the gate phase (paper: 10 on CIFAR).
        gate_lr: Adam learning rate of the gates.
        gate_position: ``"bn"`` (after BatchNorm, before the activation: the authors'), ``"conv"``
            (on the Conv/Linear output; a BatchNorm right after normalises it away, so this suits
            layers without BatchNorm) or ``"bn_weight"`` (the BatchNorm scale is the gate, network
            slimming style; the shift is not gated).
        select: ``"best_val"`` (the authors' snapshot rule) or ``"last"``.
        gate_val_every: validate every this many gate steps instead of once per gate epoch.
        init: ``"random"`` (the paper's finding: modules whose shape changed get PyTorch's default
            initialisation via ``reset_parameters``; the others keep their untrained initialisation)
            or ``"inherit"`` (the surviving random weights the gates were learned on stay).
        budget_training: "Scratch-B": train for ``round(max_epochs / flops_ratio)`` epochs so the
            pruned network spends the dense model's training FLOPs; the new count is logged.
        expansion: channel expansion factor (>= 1) of the network the gates are learned on.
        verbose: print the table of kept channels.
    """

    def __init__(
        self,
        flops_ratio: float = 0.5,
        gate_ratio: float = 0.2,
        gamma: float = 0.5,
        l1: float = 0.0,
        gate_epochs: int = 10,
        gate_lr: float = 0.01,
        gate_position: GatePosition = "bn",
        select: Literal["best_val", "last"] = "best_val",
        gate_val_every: Optional[int] = None,
        init: Literal["random", "inherit"] = "random",
        budget_training: bool = False,
        expansion: float = 1.0,
        verbose: bool = True,
    ) -> None:
        super().__init__()
        check_range("flops_ratio", flops_ratio, 0.0, 1.0, low_open=True, high_open=False)
        check_range("gate_ratio", gate_ratio, 0.0, 1.0, low_open=True, high_open=True)
        check_range("gamma", gamma, 0.0, math.inf, low_open=False, high_open=True)
        check_range("l1", l1, 0.0, math.inf, low_open=False, high_open=True)
        check_range("gate_lr", gate_lr, 0.0, math.inf, low_open=True, high_open=True)
        check_range("expansion", expansion, 1.0, math.inf, low_open=False, high_open=True)
        if isinstance(gate_epochs, bool) or not isinstance(gate_epochs, int) or gate_epochs < 0:
            raise ValueError(f"`gate_epochs` must be a non-negative integer, got {gate_epochs!r}.")
        if gate_val_every is not None and (isinstance(gate_val_every, bool) or not isinstance(gate_val_every, int) or gate_val_every < 1):
            raise ValueError(f"`gate_val_every` must be None or a positive integer, got {gate_val_every!r}.")
        check_choice("gate_position", gate_position, GATE_POSITIONS)
        check_choice("select", select, ("best_val", "last"))
        check_choice("init", init, ("random", "inherit"))
        if not isinstance(budget_training, bool):
            raise ValueError(f"`budget_training` must be True or False, got {budget_training!r}.")
        self.flops_ratio = flops_ratio
        self.gate_ratio = gate_ratio
        self.gamma = gamma
        self.l1 = l1
        self.gate_epochs = gate_epochs
        self.gate_lr = gate_lr
        self.gate_position = gate_position
        self.select = select
        self.gate_val_every = gate_val_every
        self.init = init
        self.budget_training = budget_training
        self.expansion = expansion
        self.verbose = verbose

        # Set in setup, used by the gate phase.
        self._groups: list[ChannelGroup] = []
        self._predictor: Optional[FlopsPredictor] = None
        self._dense_flops = 0
        self._dense_params = 0
        self._original: Optional[tuple[float, dict[str, torch.Tensor]]] = None  # (width, state) before expansion
        # Survives checkpoints.
        self.pruned = False
        self.plan: ChannelPlan = {}
        self.gates: dict[int, torch.Tensor] = {}
        self.snapshot: dict[str, Any] = {}
        self.threshold: Optional[float] = None
        self.reached_flops_ratio: Optional[float] = None
        self.budget_epochs: Optional[int] = None
        self.gate_seconds: Optional[float] = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(flops_ratio=self.flops_ratio, gate_position=self.gate_position, expansion=self.expansion)

    # ------------------------------------------------------------------ setup
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit" or self.pruned:
            return
        prepare_module(trainer, pl_module, "GatePruningFromScratch", physical=True)
        if self.budget_training and (trainer.max_epochs is None or trainer.max_epochs < 1):
            raise ValueError(
                f"`budget_training=True` scales the Trainer's `max_epochs`, which must be a positive number, got {trainer.max_epochs!r}."
            )
        if self.expansion != 1 and not (callable(getattr(pl_module, "set_width", None)) and hasattr(pl_module, "width")):
            raise ValueError(
                f"`expansion`={self.expansion} needs a LightningModule that can rebuild itself wider: define a `width` "
                f"attribute and `set_width(width: float)` (as `ImageClassifier` does); {type(pl_module).__name__} has not."
            )
        x = example_input(trainer, pl_module)
        dense_count = count_flops(pl_module, x)
        self._dense_flops = dense_count.total
        self._dense_params = sum(p.numel() for p in pl_module.parameters())
        if self.expansion != 1:
            self._original = (pl_module.width, {k: v.detach().clone() for k, v in pl_module.state_dict().items()})
            pl_module.set_width(pl_module.width * self.expansion)
        try:
            self._groups = find_channel_groups(pl_module, x)
            if not gate_sites(pl_module, self._groups, self.gate_position):
                raise ValueError(
                    f"The model has no prunable channel to gate at `gate_position`={self.gate_position!r}"
                    + (" (no BatchNorm in a prunable channel group; try 'conv')." if self.gate_position != "conv" else ".")
                )
            self._predictor = FlopsPredictor(pl_module, x, self._groups, dense_count if self.expansion == 1 else None)
            smallest = self._predictor.min_flops() / self._dense_flops
            if smallest > self.flops_ratio:
                raise ValueError(
                    f"`flops_ratio`={self.flops_ratio} is unreachable: the smallest structure (one channel per group"
                    f"{f', expansion {self.expansion}' if self.expansion != 1 else ''}) has {smallest:.4f} of the dense FLOPs."
                )
        except ValueError:
            self._restore_width(pl_module)
            raise
        if self.gate_position == "conv":
            normalised = [
                group.root
                for group in self._groups
                if any(isinstance(pl_module.get_submodule(m.module), _BatchNorm) for m in group.members if m.kind == "channel")
            ]
            if normalised:
                rank_zero_warn(
                    f"`gate_position='conv'`: {len(normalised)} gated layers feed a BatchNorm, which normalises their gate "
                    "away; those gates learn from the ratio term only. 'bn' is the authors' position."
                )

    @override
    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        """Resuming (``fit(ckpt_path=...)``): the model was already reshaped while loading (the pre-hook
        :func:`~lightning_prune.training_state.reshape_on_load` installed in ``setup``); a checkpoint that
        holds a structure means it was chosen: no gate phase, no expansion to undo."""
        if STRUCTURE_KEY in checkpoint:
            self.pruned, self._original = True, None

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.pruned and self.budget_epochs is not None:  # resumed with budget training: its epoch count
            trainer.fit_loop.max_epochs = self.budget_epochs

    def _restore_width(self, pl_module: pl.LightningModule) -> None:
        """Undo the expansion: the user's model back at its width with its own weights."""
        if self._original is not None:
            width, state = self._original
            pl_module.set_width(width)
            pl_module.load_state_dict(state)
            self._original = None

    # ------------------------------------------------------------------ gate phase and pruning
    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.pruned:
            return
        x = example_input(trainer, pl_module)
        started = time.perf_counter()
        try:
            result = self._learn_gates(trainer, pl_module)
        except NonFiniteGateLoss:
            self._restore_width(pl_module)
            raise
        self.gate_seconds = time.perf_counter() - started
        scores = trainer.strategy.broadcast(gate_scores(result, self._groups), src=0)
        found = search_threshold(scores, min(1.0, self.flops_ratio * self._dense_flops / self._predictor.dense), self._predictor)
        apply_plan(pl_module, self._groups, found.plan, x)
        if self.init == "random":
            _reinitialise(pl_module, self._groups, found.plan)
        self._original = None
        self.pruned = True
        self.plan = {index: keep.cpu() for index, keep in found.plan.items()}
        self.gates = result.gates
        self.snapshot = {"selected": result.selected, "step": result.step, "steps": result.steps, "val_acc": result.val_acc}
        kept_gates = torch.cat([result.gates[g][found.plan[g]] for g in result.gates])
        self.threshold = float(kept_gates.min())
        self.reached_flops_ratio = found.flops / self._dense_flops
        if self.budget_training:
            self.budget_epochs = max(1, round(trainer.max_epochs / self.flops_ratio))
            trainer.fit_loop.max_epochs = self.budget_epochs
        # No optimizer step has run yet: configure_optimizers builds fresh optimizers and schedulers
        # (for the possibly longer budget) on the new parameters.
        rebuild_training_state(trainer, fresh=True)
        self._log_structure(trainer, pl_module, result)

    def _learn_gates(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> GatePhaseResult:
        train_loader = trainer.train_dataloader
        val_loader = trainer.val_dataloaders
        if isinstance(val_loader, (list, tuple)):
            val_loader = val_loader[0] if val_loader else None
        select = self.select
        if select == "best_val" and val_loader is None:
            rank_zero_warn("GatePruningFromScratch: no validation data, so `select='best_val'` keeps the last gates.")
            select = "last"
        gates = ChannelGates.for_groups(pl_module, self._groups, self.gate_position)
        train_batches = _OnDevice(train_loader, trainer, trainer.num_training_batches)
        val_batches = None if val_loader is None else _OnDevice(val_loader, trainer, (trainer.num_val_batches or [math.inf])[0])
        length = _length(train_loader)
        bar = _progress_bar(trainer, None if length is None else self.gate_epochs * min(length, trainer.num_training_batches))
        every = max(1, trainer.log_every_n_steps)

        def on_step(step: int, metrics: dict[str, float]) -> None:
            validation = "gate/val_acc" in metrics
            if bar is not None and not validation:
                bar.update(1)
                bar.set_postfix(loss=f"{metrics['gate/loss']:.3f}", mean_gate=f"{metrics['gate/mean']:.3f}", refresh=False)
            if validation or step % every == 0:
                log_metrics(trainer, {**metrics, "gate/step": step})

        def reduce(tensor: torch.Tensor, op: str) -> torch.Tensor:
            return trainer.strategy.reduce(tensor, reduce_op=op) if trainer.world_size > 1 else tensor

        try:
            return learn_gates(
                pl_module,
                gates,
                train_batches,
                epochs=self.gate_epochs,
                lr=self.gate_lr,
                gamma=self.gamma,
                gate_ratio=self.gate_ratio,
                l1=self.l1,
                val_batches=val_batches,
                val_every=self.gate_val_every,
                select=select,
                reduce=reduce,
                on_step=on_step,
            )
        finally:
            if bar is not None:
                bar.close()

    def _log_structure(self, trainer: pl.Trainer, pl_module: pl.LightningModule, result: GatePhaseResult) -> None:
        ratios = layer_channel_ratios(self._groups, self.plan)
        params = sum(p.numel() for p in pl_module.parameters())
        extra = {
            "flops_macs": self.reached_flops_ratio * self._dense_flops,
            "dense_flops_macs": float(self._dense_flops),
            "params_ratio": params / self._dense_params,
            "threshold": self.threshold,
            "gate_phase_seconds": self.gate_seconds,
            "gate_snapshot_step": float(result.step),
        }
        if self.budget_epochs is not None:
            extra["max_epochs"] = float(self.budget_epochs)
        log_pruning_event(
            trainer,
            flops_ratio=self.reached_flops_ratio,
            channel_ratios=ratios,
            histograms={"gates": torch.cat(list(result.gates.values()))},
            extra=extra,
        )
        if self.verbose and trainer.is_global_zero:
            rank_zero_info(_structure_table(self._groups, self.plan, self.reached_flops_ratio, params / self._dense_params, result, self.budget_epochs))

    # ------------------------------------------------------------------ checkpoints
    @override
    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        if self.pruned:
            checkpoint[STRUCTURE_KEY] = structure_record(pl_module)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "pruned": self.pruned,
            "plan": {index: keep.tolist() for index, keep in self.plan.items()},
            "gates": {index: gate.clone() for index, gate in self.gates.items()},
            "snapshot": dict(self.snapshot),
            "threshold": self.threshold,
            "reached_flops_ratio": self.reached_flops_ratio,
            "budget_epochs": self.budget_epochs,
            "gate_seconds": self.gate_seconds,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.pruned = state_dict["pruned"]
        self.plan = {int(index): torch.tensor(keep, dtype=torch.long) for index, keep in state_dict["plan"].items()}
        self.gates = {int(index): gate for index, gate in state_dict["gates"].items()}
        self.snapshot = dict(state_dict["snapshot"])
        self.threshold = state_dict["threshold"]
        self.reached_flops_ratio = state_dict["reached_flops_ratio"]
        self.budget_epochs = state_dict["budget_epochs"]
        self.gate_seconds = state_dict["gate_seconds"]


class _OnDevice:
    """Re-iterable view of the first ``limit`` batches of a DataLoader (the Trainer's
    ``limit_*_batches``), moved through the strategy's device transfer and the LightningModule's
    transfer hooks, as ``(inputs, targets)``."""

    def __init__(self, loader: Any, trainer: pl.Trainer, limit: Union[int, float]) -> None:
        self.loader = loader
        self.trainer = trainer
        self.limit = None if limit == math.inf else int(limit)

    def __iter__(self):  # noqa: ANN204 - a generator
        for batch in itertools.islice(self.loader, self.limit):
            batch = self.trainer.strategy.batch_to_device(batch)
            if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
                raise ValueError(
                    "The gate phase computes cross_entropy(model(x), y) and needs `(inputs, targets)` batches, got "
                    f"a {type(batch).__name__}."
                )
            yield batch[0], batch[1]


def _length(loader: Any) -> Optional[int]:
    try:
        return len(loader)
    except TypeError:
        return None


def _progress_bar(trainer: pl.Trainer, total: Optional[int]) -> Optional[Any]:
    if trainer.progress_bar_callback is None or not trainer.is_global_zero:
        return None
    from tqdm.auto import tqdm  # not Lightning's private Tqdm: the same under both Lightning namespaces

    return tqdm(total=total, desc="Gate phase (pruning from scratch)", leave=False, dynamic_ncols=True)


@torch.no_grad()
def _reinitialise(model: nn.Module, groups: list[ChannelGroup], plan: ChannelPlan) -> None:
    """PyTorch's default initialisation for every module whose shape the plan changed."""
    changed = {m.module for g in groups if len(plan.get(g.index, range(g.size))) < g.size for m in g.members}
    for name in sorted(changed):
        module = model.get_submodule(name)
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()


def _structure_table(
    groups: list[ChannelGroup],
    plan: ChannelPlan,
    flops_ratio: float,
    params_ratio: float,
    result: GatePhaseResult,
    budget_epochs: Optional[int],
) -> str:
    rows = []
    for group in groups:
        kept = len(plan.get(group.index, range(group.size)))
        rows += [(m.order, m.module, group.size, kept) for m in group.members if m.kind == "out"]
    rows.sort()
    width = max(len(name) for _, name, _, _ in rows)
    lines = [
        "GatePruningFromScratch structure",
        f"{'layer':<{width}}  {'channels':>8}  {'kept':>6}  {'ratio':>6}",
    ]
    lines += [f"{name:<{width}}  {size:>8}  {kept:>6}  {kept / size:>6.2f}" for _, name, size, kept in rows]
    lines.append(
        f"FLOPs (MACs) ratio {flops_ratio:.4f}, params ratio {params_ratio:.4f}; gate snapshot: {result.selected} "
        f"at gate step {result.step}/{result.steps}" + (f" (val acc {result.val_acc:.4f})" if result.val_acc is not None else "")
    )
    if budget_epochs is not None:
        lines.append(f"budget training: max_epochs -> {budget_epochs}")
    return "\n".join(lines)
