"""The memory plan of a study, made before its first trial: for every program its search space can
produce, what one runner needs of the card (``memory.runner_bytes``), the card shared among the
study's ``n_jobs`` runners, and per program the largest member count (at most ``batch_trials``) that
fits. The padding is the study's: the coarsest of its own and the finer ones (max, then pow2, then
exact) under which every program fits at one member. A choice that fits under none is refused in one
line before anything is stored. Plain Python (no jax): the driver plans, ``--plan`` prints it.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from xclip_jax.errors import UserError
from xclip_jax.memory import Rows, runner_bytes
from xclip_jax.padding import PADDINGS, expected_backend, for_backend, program_key, resolve, study_buckets
from xclip_jax.runtime import gpu_memory_bytes
from xclip_jax.space import study_keys
from xclip_jax.spec import ProgramKey, RunSpec
from xclip_jax.tune_config import trial_config

GIB = 2**30
KEY_LIMIT = 20_000  # programs a space may produce under exact widths before the plan gives up counting them


@dataclasses.dataclass(frozen=True)
class Entry:
    """One program of the study under the plan: its key, the members it trains at once and what one
    runner needs for it."""

    key: ProgramKey
    members: int
    bytes: int
    rows: int

    def group(self) -> tuple:
        return self.key.head, self.key.loss, self.key.batch_size, self.key.dtype

    def to_json(self, padding: str) -> dict:
        return {"head": self.key.head, "loss": self.key.loss, "batch_size": self.key.batch_size, "padding": padding,
                "members": self.members, "bytes": self.bytes, "rows": self.rows, "key": dataclasses.asdict(self.key)}


@dataclasses.dataclass(frozen=True)
class Plan:
    """A study's memory plan: the card (None: no limit known, as on a CPU without
    ``device_memory_gb``), its runners, the padding and one entry per program."""

    device_memory_bytes: int | None
    n_jobs: int
    sharing: int  # runners on one card: n_jobs, spread over the study's devices
    padding: str
    entries: tuple[Entry, ...]

    @property
    def runner_bytes(self) -> int | None:
        """What each runner may use: the card shared evenly among the runners on it."""
        return None if self.device_memory_bytes is None else self.device_memory_bytes // self.sharing

    def members(self, key: ProgramKey) -> int:
        """The members a bundle of ``key`` trains at once (1 for a key the plan does not hold)."""
        return next((e.members for e in self.entries if e.key == key), 1)

    def bundle_size(self, cfg, params: dict, dims: tuple[int, int]) -> int:
        """The members of the bundle a trial of these parameters leads."""
        spec = RunSpec.of(trial_config(cfg, params), *dims)
        return self.members(program_key(spec, study_buckets(dataclasses.replace(cfg, padding=self.padding))))

    def to_json(self) -> dict:
        return {"device_memory_bytes": self.device_memory_bytes, "n_jobs": self.n_jobs, "runners_per_card": self.sharing,
                "padding": self.padding,
                "runner_bytes": self.runner_bytes, "entries": [e.to_json(self.padding) for e in self.entries]}

    def write(self, folder: Path) -> Path:
        path = Path(folder) / "plan.json"
        path.write_text(json.dumps(self.to_json(), indent=2) + "\n")
        return path

    def table(self) -> str:
        """The plan as a short table: per head and loss its programs, the fewest members a bundle of
        them trains and the largest need (and its batch), against each runner's share of the card."""
        card = ("no device limit known (set device_memory_gb)" if self.device_memory_bytes is None else
                f"{gib(self.device_memory_bytes)} card / {self.sharing} runner{'s' * (self.sharing > 1)} = "
                f"{gib(self.runner_bytes)} each")
        lines = [f"memory plan: {card}; padding {self.padding}",
                 f"  {'head':<10}{'loss':<17}{'programs':>9}{'members':>8}{'largest need':>14}{'at batch':>9}"]
        groups: dict[tuple, list[Entry]] = {}
        for e in sorted(self.entries, key=lambda e: (e.key.head, e.key.loss)):
            groups.setdefault((e.key.head, e.key.loss), []).append(e)
        for (head, loss), entries in groups.items():
            top = max(entries, key=lambda e: e.bytes)
            lines.append(f"  {head:<10}{loss:<17}{len(entries):>9}{min(e.members for e in entries):>8}"
                         f"{gib(top.bytes):>14}{top.key.batch_size:>9}")
        return "\n".join(lines)


def gib(n: int) -> str:
    return f"{n / GIB:.2f} GiB" if n < 10 * GIB else f"{n / GIB:.1f} GiB"


def _keys(cfg, policy: str, dims: tuple[int, int], rows: int) -> list[ProgramKey]:
    keys = study_keys(dataclasses.replace(cfg, padding=policy), dims, rows, KEY_LIMIT)
    if keys is None:
        raise UserError(f"search_space: more than {KEY_LIMIT} programs under padding {policy}; "
                        "narrow the width choices or pad more (padding: max)")
    return keys


def _fit(keys, limit, most: int, train: Rows, val: Rows) -> list[Entry] | None:
    """Each key's entry at the most members (at most ``most``) that fit under ``limit``; None when a
    key does not fit even at one."""
    entries = []
    for key in keys:
        sizes = [(m, runner_bytes(key, m, train, val)) for m in range(most, 0, -1)]
        fits = [(m, need) for m, need in sizes if limit is None or need <= limit]
        if not fits:
            return None
        entries.append(Entry(key, *fits[0], train.rows))
    return entries


def _refusal(keys, limit: int, sharing: int, device: int, train: Rows, val: Rows) -> str:
    worst = max(keys, key=lambda k: runner_bytes(k, 1, train, val))
    need = runner_bytes(worst, 1, train, val)
    widths = ", ".join(f"{name} {value}" for name, value in (
        ("output_dim", worst.output_dim), ("hidden", worst.hidden if any(worst.hidden) else None),
        ("num_layers", worst.num_layers or None), ("queue_size", worst.queue_size or None)) if value)
    return (f"memory plan: head_type {worst.head} with loss_type {worst.loss}, batch_size {worst.batch_size} "
            f"({widths}) needs {gib(need)} per runner even at one member and exact widths; each of "
            f"{sharing} runners on it has {gib(limit)} of the {gib(device)} card; "
            "fix: fewer n_jobs, a smaller batch_size, or drop that choice from the search space")


def make_plan(cfg, dims: tuple[int, int], train: Rows, val: Rows, device_memory_bytes: int | None) -> Plan:
    """The study's plan on a card of ``device_memory_bytes`` (None: report only, refuse nothing).

    Raises:
      UserError: a choice fits no runner's share of the card even at one member and exact widths.
    """
    start = resolve(cfg.padding)
    policies = PADDINGS[:PADDINGS.index(start) + 1][::-1]  # the study's own, then each finer one
    sharing = -(-cfg.n_jobs // len(cfg.devices)) if cfg.devices else cfg.n_jobs
    limit = None if device_memory_bytes is None else device_memory_bytes // sharing
    most = cfg.batch_trials if isinstance(cfg.batch_trials, int) else 1
    for policy in policies:
        keys = _keys(cfg, policy, dims, train.rows)
        entries = _fit(keys, limit, most, train, val)
        if entries is not None:
            return Plan(device_memory_bytes, cfg.n_jobs, sharing, policy, tuple(entries))
    raise UserError(_refusal(keys, limit, sharing, device_memory_bytes, train, val))


def device_memory_bytes(cfg) -> int | None:
    """The card's memory a study plans with: ``device_memory_gb`` where the config sets it, else the
    GPU's (``nvidia-smi``, the smallest of the study's devices); None on a CPU."""
    if cfg.device_memory_gb is not None:
        return int(cfg.device_memory_gb * GIB)
    return gpu_memory_bytes(cfg.devices) if expected_backend() == "gpu" else None


def plan_sets(cfg, sets: dict) -> Plan:
    """The plan of a study on its loaded sets (``{"train": EmbeddingSet, "val": …}``)."""
    train, val = sets["train"], sets["val"]
    return make_plan(cfg, (train.image_dim, train.text_dim), Rows(train.rows, len(train.image)),
                     Rows(val.rows, len(val.image)), device_memory_bytes(cfg))


def stored(folder: Path) -> dict | None:
    """A study's stored plan (``plan.json`` in its output folder), or None."""
    path = Path(folder) / "plan.json"
    return json.loads(path.read_text()) if path.is_file() else None


def stored_members(folder: Path) -> dict[ProgramKey, int]:
    """The members per program of a study's stored plan (empty where there is none)."""
    entries = (stored(folder) or {}).get("entries", ())
    return {ProgramKey(**{**e["key"], "hidden": tuple(e["key"]["hidden"])}): e["members"] for e in entries}


def show(cfg) -> int:
    """``python -m xclip_jax.tune CONFIG --plan``: read the data, print the study's plan, write it to
    ``plan.json`` in the output folder and train nothing (a plan that refuses a choice raises)."""
    from xclip_jax import data

    cfg, _ = for_backend(cfg)
    plan = plan_sets(cfg, data.load_sets(cfg.data, cfg.base_data_dir, splits=("train", "val")))
    print(plan.table())
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    print(f"plan written to {plan.write(out)}; nothing was trained")
    return 0
