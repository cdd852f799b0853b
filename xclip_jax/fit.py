"""The fit loop: a bundle of members trained in one program (a single trial is a bundle of one).

``fit_bundle`` trains K members stacked on a leading axis with early stopping on validation R@1,
each with its own :class:`FitState` (the next epoch, the best epoch and its params, the history),
hooks and patience; what happens after each epoch is a list of small hooks. ``fit`` is that loop
for one trial's state (no member axis): it hands back one FitState, which a resumed run passes in
again. The training CLI (``train``) and every tuning trial (``runner``) run this loop.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Callable

import jax
import numpy as np

from xclip_jax.encode import member_metrics
from xclip_jax.model import count, member, real_key, unpad
from xclip_jax.programs import Programs
from xclip_jax.step import TrainState

# A hook runs after each epoch: hook(record, fit_state, train_state) -> a reason to stop, or None.
# `record` is the epoch's entry of the history (a hook may add to it); `fit_state` already counts it.
Hook = Callable[[dict, "FitState", TrainState], "str | None"]


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
    """A bundle's members (a single trial is one) and their three programs: one epoch, one validation,
    and the best params of each kept on the host, unpadded (what its checkpoint stores).

    Members that stop cost nothing for long: once at most half of the program's members are live,
    the live ones move into a program of the next power of two members (``slot``: each member's place
    in it, None once dropped); measured against masking them: benchmarks/RESULTS.md."""

    def __init__(self, states: TrainState, train_data, val_data, programs: Programs):
        self.state, self.train_data, self.val_data, self.programs = states, train_data, val_data, programs
        hp = jax.device_get(states.hp)
        self.real = [real_key(states.key, member(hp, i)) for i in range(count(hp))]
        self.slot: list[int | None] = list(range(len(self.real)))
        self._compile()

    def _compile(self) -> None:
        self.epoch_fn = self.programs.epoch_fn(self.state, self.train_data)
        self.eval_fn = self.programs.eval_fn(self.state.key, count(self.state.hp), self.val_data)

    def _per_member(self, per_slot: list) -> list:
        return [None if s is None else per_slot[s] for s in self.slot]

    def run_epoch(self, active: list[bool]) -> list[dict | None]:
        live = np.zeros(count(self.state.hp), bool)
        live[[s for s, a in zip(self.slot, active) if a and s is not None]] = True
        self.state, metrics = self.epoch_fn(self.state, self.train_data, live)
        metrics = jax.device_get(metrics)
        return self._per_member([{k: v[s] for k, v in metrics.items()} for s in range(len(live))])

    def evaluate(self, ks) -> list[dict | None]:
        return self._per_member(member_metrics(self.eval_fn, self.state.params, self.state.hp, self.val_data, ks))

    def best_params(self, i: int) -> dict:
        """Member ``i``'s params now, on the host and at its real widths."""
        params = member(jax.device_get(self.state.params), self.slot[i])  # indexed on the host: no program per shape
        return {**unpad(params, self.real[i]), "loss": params["loss"]}

    def member_state(self, i: int) -> TrainState:
        return member(self.state, self.slot[i])

    def compact(self, active: list[bool]) -> None:
        """Move the live members into a program of the next power of two members, once at most half
        of the current program's are live (a stopped member fills a spare place, masked)."""
        size, live = count(self.state.hp), [i for i, a in enumerate(active) if a]
        if not live or size == 1 or len(live) > size // 2:
            return
        spare = [i for i, s in enumerate(self.slot) if s is not None and not active[i]]
        keep = live + spare[:(1 << (len(live) - 1).bit_length()) - len(live)]
        take = np.asarray([self.slot[i] for i in keep])
        self.state = jax.tree.map(lambda x: x[take], self.state)
        self.slot = [keep.index(i) if i in keep else None for i in range(len(self.slot))]
        self._compile()


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
                fs.best_r1, fs.best_epoch, fs.best_params = val["r1"], epoch, trainer.best_params(i)
        for i, record in records.items():
            fs = states[i]
            reason = next((r for r in (hook(record, fs, trainer.member_state(i)) for hook in hooks[i]) if r), None)
            if reason or epoch - fs.best_epoch >= patience:
                fs.stopped, active[i] = reason or "early_stopping", False
        t_compact = time.perf_counter()
        trainer.compact(active)
        for i in (i for i, a in enumerate(active) if a):  # the live members pay its compile
            states[i].compile_seconds += (time.perf_counter() - t_compact) / max(sum(active), 1)
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
      ``(states, fit_states)``: the final stacked states (of the last program: once at most half of the
      members were live, the live ones moved into a smaller one) and each member's FitState.
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
