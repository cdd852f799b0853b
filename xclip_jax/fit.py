"""The fit loop: a bundle of members trained in one program (a single trial is a bundle of one).

``fit_bundle`` trains K members stacked on a leading axis with early stopping on validation R@1,
each with its own :class:`FitState` (the next epoch, the best epoch and its params, the history),
hooks and patience; what happens after each epoch is a list of small hooks. ``fit`` is that loop
for one trial's state (no member axis): it hands back one FitState, which a resumed run passes in
again. The training CLI (``train``) and every tuning trial (``runner``) run this loop.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from typing import Any, Callable

import jax
import numpy as np

from xclip_jax.encode import member_metrics
from xclip_jax.model import count, member, real_key, unpad
from xclip_jax.programs import Programs
from xclip_jax.step import TrainState

# A hook runs after each epoch: hook(record, fit_state, state) -> a reason to stop, or None. `record`
# is the epoch's entry of the history (a hook may add to it); `fit_state` already counts it; `state()`
# gives the member's train state (taken from the bundle's only when a hook calls it).
Hook = Callable[[dict, "FitState", Callable[[], TrainState]], "str | None"]


@dataclasses.dataclass
class FitState:
    """Where a fit stands, as one unit: what ``fit`` returns and what a resumed run passes back.

    Attributes:
      epoch: the next epoch to train. history: one record per trained epoch.
      best_epoch, best_r1, best_params: the best validation R@1 so far, its epoch and its params
        (on the host, at the trial's real widths; None before the first epoch).
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


class _Members:
    """A bundle's members (a single trial is one) and their two programs: one epoch, one validation.
    Their number is fixed for the bundle's life: a stopped member is masked (the epoch leaves its
    state as it was), never moved into a smaller program the warm-up did not compile.

    An epoch waits on the device once: the epoch and the validation are dispatched back to back and
    their results fetched together; the params of the members that improved come in one more fetch."""

    def __init__(self, states: TrainState, train_data, val_data, programs: Programs):
        self.state, self.train_data, self.val_data = states, train_data, val_data
        hp = jax.device_get(states.hp)
        self.real = [real_key(states.key, member(hp, i)) for i in range(count(hp))]
        self.epoch_fn = programs.epoch_fn(states, train_data)
        self.eval_fn = programs.eval_fn(states.key, len(self.real), val_data)

    def run_epoch(self, active: list[bool]) -> tuple[list[dict], tuple]:
        """Train every active member an epoch and validate it: each member's epoch metrics and the
        validation's ranks (``member_metrics`` reads them), in one fetch from the device."""
        self.state, metrics = self.epoch_fn(self.state, self.train_data, np.asarray(active))
        ranks = self.eval_fn(self.state.params, self.state.hp, self.val_data)  # dispatched: nothing waits yet
        metrics, ranks = jax.device_get((metrics, ranks))
        return [{k: v[i] for k, v in metrics.items()} for i in range(len(self.real))], ranks

    def best_params(self, members: list[int]) -> dict[int, dict]:
        """These members' params now, on the host at their real widths, in one fetch of their slices."""
        if not members:
            return {}
        taken = self.state.params if len(self.real) == 1 else _take(self.state.params, np.asarray(members, np.int32))
        params = jax.device_get(taken)
        return {i: {**unpad(member(params, j), self.real[i]), "loss": member(params, j)["loss"]}
                for j, i in enumerate(members)}

    def member_state(self, i: int) -> Callable[[], TrainState]:
        """Member ``i``'s state, taken from the bundle's when a hook asks for it (once)."""
        return functools.cache(lambda: member(self.state, i))


# The members' slices of the params (a program per number of members taken, at most the bundle's).
_take = jax.jit(lambda tree, idx: jax.tree.map(lambda x: x[idx], tree))


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
        epoch_metrics, ranks = trainer.run_epoch(active)
        train_time = time.perf_counter() - t0  # the device's epoch and validation, dispatched together
        t1 = time.perf_counter()
        evals = member_metrics(ranks, ks)
        eval_time = time.perf_counter() - t1  # the metrics, on the host
        n_active = sum(active)
        records = {}
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
                fs.best_r1, fs.best_epoch = val["r1"], epoch
        for i, params in trainer.best_params([i for i in records if states[i].best_epoch == epoch]).items():
            states[i].best_params = params
        for i, record in records.items():
            fs = states[i]
            state = trainer.member_state(i)
            reason = next((r for r in (hook(record, fs, state) for hook in hooks[i]) if r), None)
            if reason or epoch - fs.best_epoch >= patience:
                fs.stopped, active[i] = reason or "early_stopping", False
        if len(states) == 1 and records:
            r = records[0]
            bar.set_postfix(loss=f"{r['train_loss']:.4f}", val_r1=f"{r['val_r1']:.4f}", best=f"{states[0].best_r1:.4f}")
    bar.close()
    for fs in states:
        fs.stopped = fs.stopped or "completed"


def fit_bundle(states: TrainState, train_data, val_data, fit_states: list | None = None, *, num_epochs: int,
               patience: int, hooks: list[tuple], ks=(1, 5, 10, 50), progress: bool = False,
               programs: Programs | None = None) -> tuple[TrainState, list[FitState]]:
    """Train the members of a bundle (stacked states: ``step.fresh_states``) until ``num_epochs``,
    ``patience`` epochs without a better validation R@1 (the mean of i2t and t2i R@1), or a hook's
    reason to stop: one epoch program and one validation for all of them, each member with its own
    hooks, patience, best epoch and params. A member whose loss or outputs go NaN or infinite stops
    with ``stopped`` = "diverged at epoch N" (its best epoch, if any, kept) while the others go on; a
    stopped member's state changes no more.

    Args:
      states: the members' initial (or resumed) states, donated. train_data, val_data: ``DeviceData``.
      fit_states: where each member left off (default: a fresh start).
      num_epochs, patience: the length of the fit, and the epochs without a better R@1 that stop it.
      hooks: each member's, called after every epoch in order (see ``Hook``).
      ks: the Recall@K cut-offs of the validation metrics.
      programs: where the compiled programs are kept (a warm runner's); default: a new one.

    Returns:
      ``(states, fit_states)``: the final stacked states (every member, in order) and each member's
      FitState.
    """
    size = len(hooks)
    fit_states = fit_states or [FitState() for _ in range(size)]
    t0 = time.perf_counter()
    # Every program up front (one for all epochs, one validation): compile time is measured apart
    # from training, and kept programs cost nothing.
    trainer = _Members(states, train_data, val_data, programs if programs is not None else Programs())
    for fs in fit_states:
        fs.stopped = None
        fs.compile_seconds += (time.perf_counter() - t0) / size
    _fit_members(trainer, fit_states, hooks, num_epochs=num_epochs, patience=patience, ks=ks, progress=progress)
    return trainer.state, fit_states


def fit(state: TrainState, train_data, val_data, fit_state: FitState | None = None, *, num_epochs: int,
        patience: int, hooks=(), ks=(1, 5, 10, 50), progress: bool = True,
        programs: Programs | None = None) -> tuple[TrainState, FitState]:
    """``fit_bundle`` for one trial's state (``step.create_train_state``: no member axis), as a
    bundle of one: its hooks see its state, and it hands back ``(state, fit_state)``; a resumed run
    passes ``fit_state`` back in."""
    states, (fs,) = fit_bundle(jax.tree.map(lambda x: x[None], state), train_data, val_data, [fit_state or FitState()],
                               num_epochs=num_epochs, patience=patience, hooks=[tuple(hooks)], ks=ks,
                               progress=progress, programs=programs)
    return member(states, 0), fs
