"""The Optuna side of tuning, shared by the driver and the trial processes.

Storage, sampler and pruner from the typed config, the search space with its conditions, the
changed-space check, the trial counts toward ``n_trials``, and the data cache that lets every
trial process start from memory-mapped arrays instead of re-reading and re-validating the data.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import itertools
import json
import logging
import os
import re
import warnings
from pathlib import Path

import numpy as np
import optuna
from optuna.trial import TrialState

from xclip_jax.config import PARAM_PATHS, SECTION_TYPES, ParamSpace, TuneConfig, condition
from xclip_jax.data import source_line
from xclip_jax.errors import UserError, exception_line, mask_secrets

SPACE_ATTR = "xclip_search_space"
SKIPPED_ATTR = "xclip_skipped"  # a sampled combination that can't run: told PRUNED at once, not counted
log = logging.getLogger("xclip_jax.tune")


# ----------------------------------------------------------------------------- storage


_ENV_REF = re.compile(r"\$\{(\w+)\}")


def expand_url(url: str) -> str:
    """A storage URL with each ``${NAME}`` replaced by that environment variable, so that a config
    can say ``postgresql+psycopg://alice:${PGPASSWORD}@host/db`` and hold no secret itself (libpq's own
    PGPASSWORD and ~/.pgpass work too, with no password in the URL)."""

    def value(match):
        if match.group(1) not in os.environ:
            raise UserError(f"storage {mask_secrets(url)}: environment variable {match.group(1)} is not set; "
                            "export it or write the URL without it")
        return os.environ[match.group(1)]

    return _ENV_REF.sub(value, url)


def make_storage(url: str, cfg: TuneConfig | None = None, *, heartbeat: bool = False, must_exist: bool = False):
    """An Optuna storage for ``url`` (``${NAME}`` expanded); bad, unreachable or driverless URLs raise a
    one-line UserError that never shows the password.

    SQLite gets a long busy timeout so that many trial processes can report at once; PostgreSQL
    (and other servers) a pre-pinged, small connection pool. With ``heartbeat`` the driver's
    storage records heartbeats, so that drivers can tell the trials of a dead driver (stale ones).
    With ``must_exist`` a SQLite file that is not there is an error (SQLAlchemy would silently
    create an empty database at a mistyped path).
    """
    from optuna.storages import RDBStorage

    shown = mask_secrets(url)
    if "://" not in url:
        hint = f"; for a SQLite file use sqlite:///{url}" if Path(url).exists() else ""
        raise UserError(f"storage {shown!r} is not a database URL (e.g. sqlite:///optuna.db or "
                        f"postgresql+psycopg://user@host/db){hint}")
    full = expand_url(url)
    if full.startswith("sqlite:///"):
        db = Path(full[len("sqlite:///"):].split("?", 1)[0])
        if must_exist and str(db) not in ("", ":memory:") and not db.is_file():
            raise UserError(f"storage {shown!r}: SQLite file {str(db)!r} does not exist; pass the database the "
                            "tuner wrote (its --storage)")
        if db.parent and not db.parent.exists():
            raise UserError(f"storage {shown}: folder {db.parent} does not exist; create it or change storage")
        engine_kwargs = {"connect_args": {"timeout": 120}}
    else:
        engine_kwargs = {"pool_pre_ping": True, "pool_size": 2, "max_overflow": 2}
    kwargs = {}
    if heartbeat and cfg is not None:
        kwargs = dict(heartbeat_interval=cfg.heartbeat_interval, grace_period=cfg.grace_period)
    try:
        with quiet_optuna():
            return RDBStorage(full, engine_kwargs=engine_kwargs, **kwargs)
    except ImportError:  # Optuna's own check, or SQLAlchemy's import of the driver
        raise UserError(f"storage {shown}: its database driver is not installed; for PostgreSQL "
                        "pip install '.[postgres]' (psycopg 3) and use postgresql+psycopg://…") from None
    except Exception as e:  # sqlalchemy raises many kinds; all mean the same to the user
        raise UserError(f"storage {shown} is unreachable ({mask_secrets(exception_line(e))}); check the URL and "
                        "that the server runs") from None


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
    """A parameter's value in a trial: sampled, else fixed, else the training config's default."""
    if name in params:
        return params[name]
    if name in cfg.fixed:
        return cfg.fixed[name]
    section, key = PARAM_PATHS[name]
    return getattr(SECTION_TYPES[section](), key)


def _walk(cfg: TuneConfig, pick) -> dict:
    """Every active parameter (one whose condition holds given those picked before it), in an order
    where conditions come first, each value from ``pick(name, space)``."""
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
                params[name] = pick(name, space)
        if not progressed:
            raise UserError(f"search_space: circular `when` conditions among {', '.join(pending)}; break the cycle")
    return params


def sample(trial: optuna.Trial, cfg: TuneConfig) -> dict:
    """Suggest every active parameter: one whose condition holds given those sampled before it."""
    return _walk(cfg, lambda name, space: suggest(trial, name, space))


MAX_SKIPPED_IN_A_ROW = 200


def ask_trial(study: optuna.Study, storage, cfg: TuneConfig, dims: tuple[int, int]):
    """The next trial to run, its parameters sampled, its heartbeat started; None when it is surplus
    (another driver asked at the same moment and the study's total is reached).

    A sampled combination that can't run on this data (``combination_problem``) is pruned from
    sampling: told PRUNED at once with the reason (so the sampler learns to avoid it), marked so that
    it counts toward nothing, and the next one is asked.
    """
    for _ in range(MAX_SKIPPED_IN_A_ROW):
        with quiet_optuna():
            trial = study.ask()
        tid = trial._trial_id
        storage.record_heartbeat(tid)
        if is_surplus(study, trial.number, cfg.n_trials):
            storage.set_trial_system_attr(tid, "xclip_surplus", True)
            study.tell(trial.number, state=TrialState.FAIL)
            return None
        problem = combination_problem(sample(trial, cfg), cfg, dims)
        if not problem:
            return trial
        storage.set_trial_system_attr(tid, SKIPPED_ATTR, problem)
        trial.set_user_attr("skipped", problem)
        study.tell(trial.number, state=TrialState.PRUNED)
    raise UserError(f"search_space: the last {MAX_SKIPPED_IN_A_ROW} sampled combinations could not run "
                    f"({problem}); remove the choices that cause it")


# ----------------------------------------------------------------------------- combinations vs the data

# The parameters whose combinations (with the data's dims) can make a trial impossible or pointless.
_CONSTRAINED = ("head_type", "num_heads", "loss_type", "queue_size", "batch_size")


def combination_problem(values: dict, cfg: TuneConfig, dims: tuple[int, int]) -> str | None:
    """Why one trial's parameters can't run on data of input ``dims`` (image, text), or None."""
    value = functools.partial(_value_of, params=values, cfg=cfg)
    if value("head_type") == "attention" and any(d % value("num_heads") for d in dims):
        return (f"attention needs num_heads dividing the input dims (image {dims[0]}, text {dims[1]}), "
                f"got num_heads {value('num_heads')}")
    if value("loss_type") == "queue_infonce" and value("queue_size") < value("batch_size"):
        return (f"queue_size {value('queue_size')} is smaller than batch_size {value('batch_size')} "
                "(the queue must hold at least one batch)")
    return None


def _values(space: ParamSpace) -> list:
    if space.type == "categorical":
        return list(space.choices)
    if space.type == "int" and (space.high - space.low) / (space.step or 1) <= 256:
        return list(range(int(space.low), int(space.high) + 1, int(space.step or 1)))
    return [space.low, space.high]


def check_combinations(cfg: TuneConfig, rows: int, dims: tuple[int, int]) -> str | None:
    """Check every choice against the data and the other choices, before anything is stored.

    A choice that no combination can run with (a batch larger than the data, num_heads that
    divides no input dim) is an error naming it and the fix; combinations that only some draws hit
    (a queue smaller than the batch) are skipped when sampled, and the returned warning says which.
    """
    batch_space = cfg.search_space.get("batch_size")
    batches = _values(batch_space) if batch_space else [_value_of("batch_size", {}, cfg)]
    too_big = [b for b in batches if b > rows]
    if too_big:
        raise UserError(f"batch_size {too_big} larger than the training set ({rows} rows); "
                        "remove those choices or use a larger training set")
    involved = [n for n in cfg.search_space if n in _CONSTRAINED]
    for name in list(involved):  # with the parameters their conditions read
        involved += [d for d in (condition(name, cfg.search_space[name]) or {})
                     if d in cfg.search_space and d not in involved]
    combos = {}
    for picked in itertools.product(*(_values(cfg.search_space[n]) for n in involved)):
        full = dict(zip(involved, picked))
        active = {n: v for n, v in _walk(cfg, lambda name, _: full.get(name)).items() if n in full}
        combos[tuple(sorted(active.items(), key=str))] = combination_problem(active, cfg, dims)
    if all(combos.values()):
        example = next(iter(combos.values()))
        raise UserError(f"search_space: no combination of the choices can run on this data ({example}); "
                        "change the choices or fixed values")
    for name in involved:
        for choice in _values(cfg.search_space[name]):
            hits = [problem for combo, problem in combos.items() if (name, choice) in combo]
            if hits and all(hits):
                raise UserError(f"search_space.{name}: choice {choice!r} can never run here ({hits[0]}); "
                                "remove it")
    skipped = sorted({p for p in combos.values() if p})
    if not skipped:
        return None
    return (f"search_space: {sum(map(bool, combos.values()))} of {len(combos)} combinations are skipped when "
            f"sampled ({'; '.join(skipped[:3])}{' …' if len(skipped) > 3 else ''})")


def space_record(cfg: TuneConfig) -> dict:
    return {name: dataclasses.asdict(space) for name, space in cfg.search_space.items()}


def _jsonable(x):
    return json.loads(json.dumps(x, default=list))


def check_space(study: optuna.Study, cfg: TuneConfig) -> None:
    """Refuse a search space that changed under an existing study name (reads only).

    A categorical parameter whose choices changed, or a parameter whose type changed, cannot
    continue (Optuna can't compare its trials); a changed numeric range is allowed with a warning.
    A study with no finished or running trial may change its space freely.
    """
    old = study.user_attrs.get(SPACE_ATTR)
    if old is None or not _has_trials(study):
        return
    new = _jsonable(space_record(cfg))
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


def store_space(study: optuna.Study, cfg: TuneConfig) -> None:
    """Record the search space with the study (after ``check_space`` passed): a new study's, or the
    new space of a study that has no trials yet."""
    if SPACE_ATTR not in study.user_attrs or not _has_trials(study):
        study.set_user_attr(SPACE_ATTR, _jsonable(space_record(cfg)))


def _has_trials(study: optuna.Study) -> bool:
    c = counts(study)
    return bool(c["finished"] or c["running"] or c["retried"])


def find_study(storage, name: str) -> optuna.Study | None:
    """The study ``name`` in the storage, or None (creates nothing)."""
    if name not in optuna.get_all_study_names(storage):
        return None
    return optuna.load_study(study_name=name, storage=storage)


# ----------------------------------------------------------------------------- counting


def retried_numbers(trials) -> set[int]:
    """Numbers of failed trials whose parameters were queued again (stale or interrupted)."""
    return {t.system_attrs["failed_trial"] for t in trials if "failed_trial" in t.system_attrs}


def counts(study: optuna.Study) -> dict:
    """Trial counts toward ``n_trials``: finished (complete/pruned/failed-not-retried), running."""
    trials = study.get_trials(deepcopy=False)
    retried = retried_numbers(trials)
    c = {"complete": 0, "pruned": 0, "fail": 0, "running": 0, "waiting": 0, "retried": 0, "surplus": 0,
         "skipped": 0}
    for t in trials:
        if t.system_attrs.get("xclip_surplus"):
            c["surplus"] += 1
        elif SKIPPED_ATTR in t.system_attrs:
            c["skipped"] += 1
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
               and SKIPPED_ATTR not in t.system_attrs and t.state != TrialState.WAITING
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
    (tmp / "sources.txt").write_text("".join(source_line(s) + "\n" for s in sets.values()))
    (tmp / "done").write_text("ok")
    try:
        tmp.rename(directory)
    except OSError:  # another driver on this machine finished first
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)


def cached_sources(directory: Path) -> list[str]:
    """The lines saying where the cached sets were read from (as printed when they were loaded)."""
    path = directory / "sources.txt"
    return path.read_text().splitlines() if path.exists() else []


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
