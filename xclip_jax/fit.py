"""The fit loop: one trial, or a bundle of same-shape trials trained in one program.

``fit`` trains one state with early stopping on validation R@1, keeping one :class:`FitState` (the
next epoch, the best epoch and its params, the history) that it returns and that a resumed run
hands back; what happens after each epoch is a list of small hooks. ``fit_bundle`` runs the same
loop over K members stacked on a leading axis (``batch_trials``), each with its own hooks, patience
and best. The training CLI (``train``) and every tuning trial (``runner``) run this loop.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Callable

import jax
import numpy as np

from xclip_jax.programs import Programs
from xclip_jax.step import NotFinite, TrainState, run_bundle_eval, run_eval

# A hook runs after each epoch: hook(record, fit_state, train_state) -> a reason to stop, or None.
# `record` is the epoch's entry of the history (a hook may add to it); `fit_state` already counts it.
Hook = Callable[[dict, "FitState", TrainState], "str | None"]


@dataclasses.dataclass
class FitState:
    """Where a fit stands, as one unit: what ``fit`` returns and what a resumed run passes back.

    Attributes:
      epoch: the next epoch to train. history: one record per trained epoch.
      best_epoch, best_r1, best_params: the best validation R@1 so far, its epoch and its params
        (a device copy, safe from donation; None before the first epoch).
      stopped: why the fit ended ("completed", "early_stopping", or what a hook said).
      compile_seconds: getting the fit's compiled programs (compiling them, unless kept or compiled
        ahead), this run.
    """

    epoch: int = 0
    history: list = dataclasses.field(default_factory=list)
    best_epoch: int = -1
    best_r1: float = -math.inf
    best_params: Any = None
    stopped: str | None = None
    compile_seconds: float = 0.0

    def improved_at(self, epoch: int) -> bool:
        return self.best_epoch == epoch

    def to_json(self) -> dict:
        """The JSON-able part (everything but the params), for a resumable save."""
        return {"epoch": self.epoch, "history": self.history, "best_epoch": self.best_epoch,
                "best_r1": self.best_r1}

    @classmethod
    def from_json(cls, saved: dict, best_params) -> FitState:
        # Saves from before the config was recorded counted the last finished epoch, not the next.
        epoch = saved["epoch"] + (0 if "config" in saved else 1)
        return cls(epoch=epoch, history=saved["history"], best_epoch=saved["best_epoch"], best_r1=saved["best_r1"],
                   best_params=best_params)

    def train_seconds(self) -> float:
        return sum(h["train_time"] for h in self.history)

    def eval_seconds(self) -> float:
        return sum(h.get("eval_time", 0.0) for h in self.history)


class _Single:
    """One trial: its state and its three programs (epoch, evaluation, params copy)."""

    def __init__(self, state: TrainState, train_data, val_data, programs: Programs):
        self.state, self.train_data, self.val_data = state, train_data, val_data
        self.epoch_fn = programs.epoch_fn(state, train_data)
        self.eval_fn = programs.eval_fn(state.spec, state.params, val_data)
        self.copy_fn = programs.copy_fn(state.params)
        self.best = None

    def run_epoch(self, active: list[bool]) -> list[dict]:
        self.state, metrics = self.epoch_fn(self.state, self.train_data)
        return [jax.device_get(metrics)]

    def evaluate(self, ks) -> list[dict | None]:
        try:
            return [run_eval(self.eval_fn, self.state.params, self.val_data, ks)]
        except NotFinite:  # diverged params; any other error is the trial's own and goes up as itself
            return [None]

    def keep_best(self, improved: list[bool]) -> None:
        if improved[0]:
            self.best = self.copy_fn(self.state.params)

    def best_params(self, member: int):
        return self.best

    def member_state(self, member: int):
        return self.state


class _Bundle:
    """K same-shape trials on a leading member axis: one epoch program, one evaluation, one best-keeper."""

    def __init__(self, states: TrainState, train_data, val_data, programs: Programs):
        self.state, self.train_data, self.val_data = states, train_data, val_data
        self.epoch_fn = programs.bundle_epoch_fn(states, train_data)
        self.eval_fn = programs.bundle_eval_fn(states.spec, states.params, val_data)
        self.keep_fn = programs.keep_best_fn(states.params)
        self.best = None

    def run_epoch(self, active: list[bool]) -> list[dict]:
        self.state, metrics = self.epoch_fn(self.state, self.train_data, np.asarray(active))
        metrics = jax.device_get(metrics)
        return [{k: v[i] for k, v in metrics.items()} for i in range(len(active))]

    def evaluate(self, ks) -> list[dict | None]:
        return run_bundle_eval(self.eval_fn, self.state.params, self.val_data, ks)

    def keep_best(self, improved: list[bool]) -> None:
        if any(improved):
            self.best = self.keep_fn(self.state.params if self.best is None else self.best, self.state.params,
                                     np.asarray(improved))

    def best_params(self, member: int):
        return jax.tree.map(lambda x: np.asarray(x[member]), self.best)

    def member_state(self, member: int):
        return None  # a member's hooks get its record and fit state, not a slice of the stacked state


def _fit_members(trainer, states: list[FitState], hooks: list[tuple], *, num_epochs: int, patience: int, ks,
                 progress: bool) -> None:
    """The fit loop over the members of a trainer (one trial, or a bundle): every epoch trains all of
    them in one program, evaluates all of them in one, then each active member keeps its record and
    best, runs its hooks and may stop (pruned, patience, diverged); stopped members change no more."""
    from tqdm.auto import tqdm

    active = [fs.stopped is None for fs in states]
    first = min(fs.epoch for fs in states)
    bar = tqdm(range(first, num_epochs), desc="epochs", disable=not progress, unit="epoch", initial=first,
               total=num_epochs)
    for epoch in bar:
        if not any(active):
            break
        t0 = time.perf_counter()
        epoch_metrics = trainer.run_epoch(active)
        train_time = time.perf_counter() - t0
        t1 = time.perf_counter()
        evals = trainer.evaluate(ks)
        eval_time = time.perf_counter() - t1
        n_active = sum(active)
        improved, records = [False] * len(states), {}
        for i, fs in enumerate(states):
            if not active[i]:
                continue
            m, val = epoch_metrics[i], evals[i]
            if not m["finite"] or val is None:
                fs.stopped, active[i] = f"diverged at epoch {epoch}", False
                continue
            records[i] = {"epoch": epoch, "train_loss": float(m["loss"]), "val_loss": None, "val_r1": val["r1"],
                          "val_metrics": val, "grad_norm": float(m["grad_norm"]), "temperature": float(m["temperature"]),
                          # a bundle's epoch is shared: each active member gets its share of the time
                          "epoch_time": (train_time + eval_time) / n_active, "train_time": train_time / n_active,
                          "eval_time": eval_time / n_active}
            fs.history.append(records[i])
            fs.epoch = epoch + 1
            if val["r1"] > fs.best_r1:
                fs.best_r1, fs.best_epoch, improved[i] = val["r1"], epoch, True
        trainer.keep_best(improved)
        for i, record in records.items():
            fs = states[i]
            reason = next((r for r in (hook(record, fs, trainer.member_state(i)) for hook in hooks[i]) if r), None)
            if reason or epoch - fs.best_epoch >= patience:
                fs.stopped, active[i] = reason or "early_stopping", False
        if len(states) == 1 and records:
            r = records[0]
            bar.set_postfix(loss=f"{r['train_loss']:.4f}", val_r1=f"{r['val_r1']:.4f}", best=f"{states[0].best_r1:.4f}")
    bar.close()
    for i, fs in enumerate(states):
        fs.stopped = fs.stopped or "completed"
        if fs.best_epoch >= 0:
            fs.best_params = trainer.best_params(i)


def fit(state: TrainState, train_data, val_data, fit_state: FitState | None = None, *, num_epochs: int,
        patience: int, hooks=(), ks=(1, 5, 10, 50), progress: bool = True,
        programs: Programs | None = None) -> tuple[TrainState, FitState]:
    """Train until ``num_epochs``, ``patience`` epochs without a better validation R@1 (the mean of
    i2t and t2i R@1), or a hook's reason to stop.

    Args:
      state: the initial (or resumed) train state; it is donated.
      train_data, val_data: ``DeviceData`` sets.
      num_epochs, patience: the length of the fit, and the epochs without a better R@1 that stop it.
      fit_state: where a resumed run left off (default: a fresh start).
      hooks: called after every epoch, in order (see ``Hook``).
      ks: the Recall@K cut-offs of the validation metrics.
      programs: where the compiled programs are kept (a warm runner's); default: a new one.

    Returns:
      ``(state, fit_state)``: the final train state and the fit state; a loss or outputs that went NaN
      or infinite end the fit with ``stopped`` = "diverged at epoch N" (its best epoch, if any, kept).
    """
    fs = fit_state if fit_state is not None else FitState()
    fs.stopped = None
    best_before = fs.best_params
    t0 = time.perf_counter()
    # Every program up front (one for all epochs, one evaluation, one params copy): compile time is
    # measured apart from training, and kept programs cost nothing.
    trainer = _Single(state, train_data, val_data, programs if programs is not None else Programs())
    fs.compile_seconds += time.perf_counter() - t0
    trainer.best = best_before
    _fit_members(trainer, [fs], [tuple(hooks)], num_epochs=num_epochs, patience=patience, ks=ks, progress=progress)
    return trainer.state, fs


def fit_bundle(states: TrainState, train_data, val_data, *, num_epochs: int, patience: int, hooks: list[tuple],
               ks=(1, 5, 10, 50), programs: Programs | None = None) -> tuple[TrainState, list[FitState]]:
    """``fit`` for K same-shape trials at once (a stacked state from ``step.create_bundle_state``):
    one epoch program and one evaluation for all of them, each member with its own hooks, patience,
    best epoch and params. A member whose loss goes NaN stops with ``stopped`` = "diverged at epoch
    N" while the others go on; a stopped member's state changes no more.

    Returns:
      ``(states, fit_states)``: the final stacked states and each member's FitState.
    """
    size = len(hooks)
    t0 = time.perf_counter()
    trainer = _Bundle(states, train_data, val_data, programs if programs is not None else Programs())
    compile_seconds = time.perf_counter() - t0
    fit_states = [FitState(compile_seconds=compile_seconds / size) for _ in range(size)]
    _fit_members(trainer, fit_states, hooks, num_epochs=num_epochs, patience=patience, ks=ks, progress=False)
    return trainer.state, fit_states
