"""``PruningCallback``: what the three pruning callbacks share around their cores.

- one checkpoint ``state_key`` policy: the class name, plus ``name`` where a callback takes one (several
  instances in one Trainer); state saved under another key of the same class is adopted when it is the only one;
- the checks at ``setup``: the strategy and the module (:func:`prepare_module`) and no second callback under the
  same key; other stages only make the module reshape itself on load;
- ``state_dict`` = {``arguments``: the validated configuration, the core's state}, and one warning on resume
  when an argument changed;
- the structure record of a physically pruned model, kept in every later checkpoint.

A subclass gives ``_setup_fit`` (the ``fit`` set-up after the checks), ``_core_state``/``_load_core_state`` and
``_changed_consequence``; its figures are a :class:`~lightning_prune.callbacks._figures.Figures`.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import pytorch_lightning as pl
from pytorch_lightning.utilities import rank_zero_warn
from pytorch_lightning.utilities.exceptions import MisconfigurationException
from typing_extensions import override

from lightning_prune.callbacks._checks import class_names
from lightning_prune.structure import STRUCTURE_KEY, StructureRecord
from lightning_prune.training_state import reshape_on_load, reshapes_on_load

_NOT_SAVED = frozenset({"example_input_fn", "loss_fn", "aux_dataloader", "verbose", "name"})
"""Arguments that do not decide the result (``name`` is the key the state is saved under), or are functions and
data: not kept in checkpoints."""

SHARDED_STRATEGIES = frozenset({"FSDPStrategy", "DeepSpeedStrategy", "ModelParallelStrategy", "XLAFSDPStrategy"})
"""Strategy class names (of either Lightning namespace) that shard parameters across ranks."""


def plain(value: Any) -> Any:
    """Built-in types only (parse-time types such as ``NonNegativeInt`` are subclasses), so checkpoints load anywhere."""
    for kind in (bool, int, float, str):
        if isinstance(value, kind):
            return kind(value)
    if isinstance(value, Mapping):
        return {plain(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def prepare_module(trainer: pl.Trainer, pl_module: pl.LightningModule, callback: str, physical: bool) -> None:
    """Refuse set-ups the callback cannot serve, before any weight changes, then make ``pl_module``
    reshape itself to a pruned ``state_dict`` on load (:func:`~lightning_prune.training_state.reshape_on_load`).

    Refused with a ``MisconfigurationException``:

    - a sharded strategy (FSDP, DeepSpeed, model parallel): each rank holds a shard of every weight,
      while masks, scores and channel plans need whole tensors (as Lightning's own
      ``StochasticWeightAveraging`` refuses them);
    - a ``torch.compile``-d LightningModule or submodule: the callbacks trace the model and change
      its weights, parametrisations or shapes under the compiled graph; prune the uncompiled module
      and compile afterwards;
    - physical pruning (``callback`` removes channels) under a spawn/fork-based strategy
      (``ddp_spawn``, ``ddp_fork``, ``ddp_notebook``) when the user's module does not reshape itself on
      load: there the main process copies rank 0's pruned weights into its own dense module, which no
      callback hook reaches, and the whole run would be lost at that last step.

    Works with the Trainers of both ``pytorch_lightning`` and ``lightning.pytorch`` (class names are compared).
    """
    strategy = trainer.strategy
    if class_names(strategy) & SHARDED_STRATEGIES:
        raise MisconfigurationException(
            f"{callback} does not support sharded models: `strategy`={type(strategy).__name__} splits every weight "
            "across ranks, while pruning decides on whole tensors. Use `strategy='ddp'` (or a single device)."
        )
    compiled = getattr(pl_module, "_compiler_ctx", None) is not None or any(
        type(module).__name__ == "OptimizedModule" for module in pl_module.modules()
    )
    if compiled:
        raise MisconfigurationException(
            f"{callback} cannot prune a `torch.compile`d model ({type(pl_module).__name__} or one of its submodules "
            "is compiled): pass the uncompiled LightningModule and network to `trainer.fit`, and compile the pruned "
            "model after fit."
        )
    launcher = strategy.launcher
    spawned = launcher is not None and "_MultiProcessingLauncher" in class_names(launcher)
    if physical and spawned and not reshapes_on_load(pl_module):
        raise MisconfigurationException(
            f"{callback} removes channels physically, and under `strategy`={type(strategy).__name__} (processes "
            "started by spawn/fork) the main process then loads rank 0's pruned weights into its own dense "
            f"{type(pl_module).__name__}, which fails. Call `lightning_prune.reshape_on_load(model)` before "
            "`trainer.fit(model)`, or use `strategy='ddp'`."
        )
    reshape_on_load(pl_module)


class PruningCallback(pl.Callback):
    """The base of the pruning callbacks (module docstring). ``arguments``: the ``__init__`` arguments, checked."""

    physical: bool = False
    """Whether the callback removes channels (refused under spawn-based strategies without ``reshape_on_load``)."""
    name: Optional[str] = None
    """Tells several instances of one class apart (their checkpoint key); ``None``: the class name alone."""
    duplicate_hint: str = ""
    """What a second instance under the same key is told at ``setup``."""

    def __init__(self, arguments: Mapping[str, Any]) -> None:
        super().__init__()
        self.arguments = {key: value for key, value in arguments.items() if key not in ("self", "__class__")}
        self.__dict__.update(self.arguments)
        self.structure: Optional[StructureRecord] = None
        """The structure record of the physically pruned model (``None`` until channels are removed)."""

    @property
    def state_key(self) -> str:
        return self._generate_state_key(name=self.name) if self.name else type(self).__qualname__

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """``fit``: the checks, then the callback's own set-up (:meth:`_setup_fit`). Other stages: the module reshapes
        itself to a pruned checkpoint while it loads."""
        if stage != "fit":
            reshape_on_load(pl_module)
            return
        prepare_module(trainer, pl_module, type(self).__name__, physical=self.physical)
        same = [other for other in trainer.callbacks if other is not self and getattr(other, "state_key", None) == self.state_key]
        if same:  # Lightning checks this only for the callbacks given to `Trainer(...)`
            raise MisconfigurationException(
                f"The Trainer holds {len(same) + 1} {type(self).__name__} callbacks with the checkpoint key "
                f"{self.state_key!r}: {self.duplicate_hint}"
            )
        self._setup_fit(trainer, pl_module)

    def _setup_fit(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """The callback's set-up for ``fit``, after the checks."""

    @override
    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        if self.structure is not None:
            checkpoint[STRUCTURE_KEY] = self.structure

    @override
    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        """A resumed fit carries the checkpoint's structure record into its own checkpoints. State of this class saved
        under another key (an older version's, or another ``name``) is adopted when the checkpoint holds none under this
        callback's key and exactly one that no other instance claims; several are refused."""
        if trainer.state.fn == "fit":
            self.structure = checkpoint.get(STRUCTURE_KEY, self.structure)
        states, cls = checkpoint.get("callbacks", {}), type(self).__qualname__
        claimed = {callback.state_key for callback in trainer.callbacks if isinstance(callback, PruningCallback)}
        others = [key for key in states if isinstance(key, str) and key.startswith(cls) and key not in claimed]
        if self.state_key in states or not others:
            return
        if len(others) > 1:
            raise MisconfigurationException(
                f"The checkpoint holds {cls} state under {others}, none under this callback's key {self.state_key!r}: "
                "pass the `name` it was saved with."
            )
        rank_zero_warn(f"{cls}: resuming the state saved under {others[0]!r}.")
        self.load_state_dict(states[others[0]])

    @override
    def state_dict(self) -> dict[str, Any]:
        arguments = {key: plain(value) for key, value in self.arguments.items() if key not in _NOT_SAVED}
        return {"arguments": arguments, **self._core_state()}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """The core's state, then one warning naming the arguments that differ from the checkpoint's."""
        self._load_core_state(state_dict)
        saved = state_dict.get("arguments", {})
        changed = {key: value for key, value in saved.items() if key in self.arguments and plain(self.arguments[key]) != value}
        consequence = self._changed_consequence()
        if changed and consequence:
            saved_values = ", ".join(f"{key}={value!r}" for key, value in sorted(changed.items()))
            now = ", ".join(f"{key}={plain(self.arguments[key])!r}" for key in sorted(changed))
            rank_zero_warn(f"{type(self).__qualname__}: resumed with changed arguments: the checkpoint's {saved_values}, now "
                           f"{now}; {consequence}.")

    def _core_state(self) -> dict[str, Any]:
        """What the core and the callback's progress need to resume."""
        return {}

    def _load_core_state(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`_core_state`."""

    def _changed_consequence(self) -> Optional[str]:
        """What a changed argument means for the resumed run (``None``: nothing to warn about)."""
        return "the checkpoint's state is kept and the new values apply from here on"
