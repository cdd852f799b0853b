"""The Optuna side of tuning, shared by the driver and the trial processes.

Storage, sampler and pruner from the typed config, the search space with its conditions, the
changed-space check, the trial counts toward ``n_trials``, and the data cache that lets every
trial process start from memory-mapped arrays instead of re-reading and re-validating the data.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import warnings
from pathlib import Path

import numpy as np
import optuna
from optuna.trial import TrialState

from xclip_jax.config import PARAM_PATHS, ParamSpace, TrainConfig, TuneConfig, condition
from xclip_jax.errors import UserError

SPACE_ATTR = "xclip_search_space"
log = logging.getLogger("xclip_jax.tune")


# ----------------------------------------------------------------------------- storage


def make_storage(url: str, cfg: TuneConfig | None = None, *, heartbeat: bool = False):
    """An Optuna storage for ``url``; unreachable or malformed URLs raise a one-line UserError.

    SQLite gets a long busy timeout so that many trial processes can report at once; PostgreSQL
    (and other servers) a pre-pinged, small connection pool. With ``heartbeat`` the driver's
    storage records heartbeats, so that drivers can tell the trials of a dead driver (stale ones).
    """
    from optuna.storages import RDBStorage

    if url.startswith("sqlite:///"):
        db = Path(url[len("sqlite:///"):])
        if db.parent and not db.parent.exists():
            raise UserError(f"storage {url}: folder {db.parent} does not exist; create it or change storage")
        engine_kwargs = {"connect_args": {"timeout": 120}}
    else:
        engine_kwargs = {"pool_pre_ping": True, "pool_size": 2, "max_overflow": 2}
    kwargs = {}
    if heartbeat and cfg is not None:
        kwargs = dict(heartbeat_interval=cfg.heartbeat_interval, grace_period=cfg.grace_period)
    try:
        with quiet_optuna():
            return RDBStorage(url, engine_kwargs=engine_kwargs, **kwargs)
    except ModuleNotFoundError as e:
        raise UserError(f"storage {url}: driver module {e.name!r} is missing; "
                        "pip install 'xclip_jax[postgres]' for PostgreSQL") from None
    except Exception as e:  # sqlalchemy raises many kinds; all mean the same to the user
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"storage {url} is unreachable ({first}); check the URL and that the server runs") from None


@contextlib.contextmanager
def quiet_optuna():
    """Silence Optuna's experimental/deprecation notes about the heartbeat API we rely on."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        warnings.simplefilter("ignore", FutureWarning)
        warnings.filterwarnings("ignore", message="Heartbeat of storage")
        yield


def retry_once(study: optuna.Study, trial: optuna.trial.FrozenTrial, always: bool = False) -> None:
    """Queue a failed trial's parameters again, unless it already was a retry (``always`` queues
    them anyway: for failures that were not the parameters' fault, such as a full disk).

    The copy is WAITING (``study.ask`` takes it first) and carries ``failed_trial`` = the failed
    trial's number; unlike Optuna's retry callback it does not inherit the failed trial's user
    attributes (its pid or fail reason would be wrong for the new run).
    """
    if "failed_trial" in trial.system_attrs and not always:
        return
    study.add_trial(optuna.trial.create_trial(state=TrialState.WAITING, params=trial.params,
                                              distributions=trial.distributions,
                                              system_attrs={"failed_trial": trial.number}))


def make_sampler(cfg: TuneConfig):
    s = cfg.sampler
    if s.type == "random":
        return optuna.samplers.RandomSampler(seed=s.seed)
    with quiet_optuna():
        return optuna.samplers.TPESampler(seed=s.seed, multivariate=s.multivariate, group=s.multivariate,
                                          constant_liar=s.constant_liar, n_startup_trials=s.n_startup_trials)


def make_pruner(cfg: TuneConfig):
    p = cfg.pruner
    if p.type == "SuccessiveHalvingPruner":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=p.min_resource, reduction_factor=p.reduction_factor,
                                                      min_early_stopping_rate=p.min_early_stopping_rate)
    if p.type == "HyperbandPruner":
        return optuna.pruners.HyperbandPruner(min_resource=p.min_resource, max_resource=cfg.max_epochs,
                                              reduction_factor=p.reduction_factor)
    if p.type == "MedianPruner":
        return optuna.pruners.MedianPruner(n_startup_trials=p.n_startup_trials, n_warmup_steps=p.n_warmup_steps)
    return optuna.pruners.NopPruner()


def pruning_warning(cfg: TuneConfig) -> str | None:
    """A warning when successive halving can never prune within ``max_epochs`` (SPEC §5)."""
    p = cfg.pruner
    if p.type != "SuccessiveHalvingPruner":
        return None
    rung = p.first_rung()
    if rung <= cfg.max_epochs - 1:
        return None
    return (f"pruner will never prune: SuccessiveHalvingPruner's first rung is at step "
            f"min_resource × reduction_factor^min_early_stopping_rate = {p.min_resource} × "
            f"{p.reduction_factor}^{p.min_early_stopping_rate} = {rung}, but max_epochs: {cfg.max_epochs} reports "
            f"steps 0–{cfg.max_epochs - 1}; lower min_resource or min_early_stopping_rate")


# ----------------------------------------------------------------------------- search space


def suggest(trial: optuna.Trial, name: str, space: ParamSpace):
    """Ask the trial for one parameter of the search space."""
    if space.type == "categorical":
        return trial.suggest_categorical(name, list(space.choices))
    if space.type == "int":
        return trial.suggest_int(name, int(space.low), int(space.high), step=int(space.step or 1), log=space.log)
    return trial.suggest_float(name, space.low, space.high, step=space.step, log=space.log)


def _value_of(name: str, params: dict, cfg: TuneConfig):
    if name in params:
        return params[name]
    if name in cfg.fixed:
        return cfg.fixed[name]
    section, key = PARAM_PATHS[name]
    return getattr(getattr(TrainConfig(), section), key)


def sample(trial: optuna.Trial, cfg: TuneConfig) -> dict:
    """Suggest every active parameter: one whose condition holds given those sampled before it."""
    params: dict = {}
    pending = dict(cfg.search_space)
    while pending:
        progressed = False
        for name, space in list(pending.items()):
            cond = condition(name, space) or {}
            if any(dep in pending for dep in cond):
                continue  # its condition depends on a parameter not sampled yet
            del pending[name]
            progressed = True
            if all(_value_of(dep, params, cfg) in allowed for dep, allowed in cond.items()):
                params[name] = suggest(trial, name, space)
        if not progressed:
            raise UserError(f"search_space: circular `when` conditions among {', '.join(pending)}; break the cycle")
    return params


def space_record(cfg: TuneConfig) -> dict:
    return {name: dataclasses.asdict(space) for name, space in cfg.search_space.items()}


def _jsonable(x):
    return json.loads(json.dumps(x, default=list))


def check_space(study: optuna.Study, cfg: TuneConfig) -> None:
    """Store the search space with a new study; refuse a changed one under the same name.

    A categorical parameter whose choices changed, or a parameter whose type changed, cannot
    continue (Optuna can't compare its trials); a changed numeric range is allowed with a warning.
    """
    new = _jsonable(space_record(cfg))
    old = study.user_attrs.get(SPACE_ATTR)
    if old is None:
        study.set_user_attr(SPACE_ATTR, new)
        return
    for name in sorted(set(old) & set(new)):
        a, b = old[name], new[name]
        fix = f"use a new study_name or revert search_space.{name}"
        if a["type"] != b["type"]:
            raise UserError(f"search space changed for study {study.study_name!r}: {name} was {a['type']}, "
                            f"config says {b['type']}; {fix}")
        if a["type"] == "categorical" and a["choices"] != b["choices"]:
            raise UserError(f"search space changed for study {study.study_name!r}: {name} choices were "
                            f"{a['choices']}, config has {b['choices']}; {fix}")
        if a != b:
            log.warning("search space of %s changed (%s → %s); continuing the study", name, a, b)


# ----------------------------------------------------------------------------- counting


def retried_numbers(trials) -> set[int]:
    """Numbers of failed trials whose parameters were queued again (stale or interrupted)."""
    return {t.system_attrs["failed_trial"] for t in trials if "failed_trial" in t.system_attrs}


def counts(study: optuna.Study) -> dict:
    """Trial counts toward ``n_trials``: finished (complete/pruned/failed-not-retried), running."""
    trials = study.get_trials(deepcopy=False)
    retried = retried_numbers(trials)
    c = {"complete": 0, "pruned": 0, "fail": 0, "running": 0, "waiting": 0, "retried": 0, "surplus": 0}
    for t in trials:
        if t.system_attrs.get("xclip_surplus"):
            c["surplus"] += 1
        elif t.state == TrialState.COMPLETE:
            c["complete"] += 1
        elif t.state == TrialState.PRUNED:
            c["pruned"] += 1
        elif t.state == TrialState.FAIL:
            c["retried" if t.number in retried else "fail"] += 1
        elif t.state == TrialState.RUNNING:
            c["running"] += 1
        elif t.state == TrialState.WAITING:
            c["waiting"] += 1
    c["finished"] = c["complete"] + c["pruned"] + c["fail"]
    return c


def is_surplus(study: optuna.Study, number: int, n_trials: int) -> bool:
    """Whether trial ``number`` is beyond ``n_trials`` (two drivers asked at the same moment)."""
    trials = study.get_trials(deepcopy=False)
    retried = retried_numbers(trials)
    counted = [t for t in trials if t.number <= number and not t.system_attrs.get("xclip_surplus")
               and t.state != TrialState.WAITING
               and not (t.state == TrialState.FAIL and t.number in retried)]
    return len(counted) > n_trials


# ----------------------------------------------------------------------------- data cache


def data_cache_dir(cfg: TuneConfig, root: Path) -> Path:
    """A folder keyed by the data config (and the files' sizes and times), shared by trials."""
    desc = json.dumps({"data": dataclasses.asdict(cfg.data), "base": str(Path(cfg.base_data_dir).absolute())},
                      sort_keys=True, default=str)
    for split in ("train", "val"):
        paths = cfg.data.paths(split, cfg.base_data_dir)
        for p in paths or ():
            if p.exists():
                st = p.stat()
                desc += f"|{p}:{st.st_size}:{st.st_mtime_ns}"
    return root / hashlib.sha256(desc.encode()).hexdigest()[:16]


def write_cache(sets: dict, directory: Path) -> None:
    """Write validated, de-duplicated sets as .npy files (atomically: a folder renamed when done)."""
    if (directory / "done").exists():
        return
    tmp = directory.with_name(directory.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    for split, s in sets.items():
        np.save(tmp / f"{split}_image.npy", s.image)
        np.save(tmp / f"{split}_text.npy", s.text)
        np.save(tmp / f"{split}_row_image.npy", s.row_image)
        np.save(tmp / f"{split}_image_ids.npy", np.asarray([str(i) for i in s.image_ids]))
    (tmp / "done").write_text("ok")
    try:
        tmp.rename(directory)
    except OSError:  # another driver on this machine finished first
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)


def read_cache(directory: Path, splits=("train", "val")) -> dict:
    """Memory-map the cached sets back as EmbeddingSets (no copy, no re-validation)."""
    from xclip_jax.data import EmbeddingSet

    out = {}
    for split in splits:
        out[split] = EmbeddingSet(
            name=split,
            image=np.load(directory / f"{split}_image.npy", mmap_mode="r"),
            text=np.load(directory / f"{split}_text.npy", mmap_mode="r"),
            row_image=np.load(directory / f"{split}_row_image.npy"),
            image_ids=np.load(directory / f"{split}_image_ids.npy"),
        )
    return out
