"""The study policy: everything that talks to Optuna, shared by the driver and the trial processes.

Storage, sampler and pruner from the typed config; the search space with its conditions, sampled
and checked against the data; the changed-space check; asking for trials, counting them toward
``n_trials``, failing and retrying them (stale and lost ones too). The few private Optuna calls
this needs are gathered at the end.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import os

import optuna
from optuna.trial import TrialState

from xclip_jax.errors import UserError, exception_line, mask_secrets
from xclip_jax.spec import fit_problems
from xclip_jax.storage import make_storage, quiet_optuna
from xclip_jax.tune_config import (
    PARAM_PATHS,
    SECTION_TYPES,
    ParamSpace,
    TuneConfig,
    condition,
    trial_config,
)

SPACE_ATTR = "xclip_search_space"
SKIPPED_ATTR = "xclip_skipped"  # a sampled combination that can't run: told PRUNED at once, not counted
log = logging.getLogger("xclip_jax.tune")


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


def ask_trial(study: optuna.Study, storage, cfg: TuneConfig, dims: tuple[int, int], rows: int):
    """The next trial to run, its parameters sampled, its heartbeat started; None when it is surplus
    (another driver asked at the same moment and the study's total is reached).

    A sampled combination that can't run on this data (``combination_problem``) is pruned from
    sampling: told PRUNED at once with the reason (so the sampler learns to avoid it), marked so that
    it counts toward nothing, and the next one is asked.
    """
    for _ in range(MAX_SKIPPED_IN_A_ROW):
        with quiet_optuna():
            trial = study.ask()
        tid = trial_id(trial)
        storage.record_heartbeat(tid)
        if is_surplus(study, trial.number, cfg.n_trials):
            storage.set_trial_system_attr(tid, "xclip_surplus", True)
            study.tell(trial.number, state=TrialState.FAIL)
            return None
        problem = combination_problem(sample(trial, cfg), cfg, dims, rows)
        if not problem:
            return trial
        storage.set_trial_system_attr(tid, SKIPPED_ATTR, problem)
        trial.set_user_attr("skipped", problem)
        study.tell(trial.number, state=TrialState.PRUNED)
    raise UserError(f"search_space: the last {MAX_SKIPPED_IN_A_ROW} sampled combinations could not run "
                    f"({problem}); remove the choices that cause it")


# ----------------------------------------------------------------------------- combinations vs the data

# The parameters that ``spec.fit_problems`` reads: their combinations (with the data) can make a
# trial impossible or pointless.
_CONSTRAINED = ("head_type", "num_heads", "loss_type", "queue_size", "batch_size")


def combination_problem(values: dict, cfg: TuneConfig, dims: tuple[int, int], rows: int) -> str | None:
    """Why one trial's parameters can't run (or shouldn't) on data of input ``dims`` and ``rows``, or
    None: the first error or warning of ``spec.fit_problems``, the rules the training CLI applies."""
    tc = trial_config(cfg, values)
    errors, warnings = fit_problems(tc.model, tc.loss, tc.training, image_dim=dims[0], text_dim=dims[1], rows=rows)
    return next(iter(errors + warnings), None)


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
    involved = [n for n in cfg.search_space if n in _CONSTRAINED]
    for name in list(involved):  # with the parameters their conditions read
        involved += [d for d in (condition(name, cfg.search_space[name]) or {})
                     if d in cfg.search_space and d not in involved]
    combos = {}
    for picked in itertools.product(*(_values(cfg.search_space[n]) for n in involved)):
        full = dict(zip(involved, picked))
        active = {n: v for n, v in _walk(cfg, lambda name, _: full.get(name)).items() if n in full}
        combos[tuple(sorted(active.items(), key=str))] = combination_problem(active, cfg, dims, rows)
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


def load_study(storage_url: str, study_name: str) -> optuna.Study:
    """Load `study_name` from `storage_url`; UserError (listing the studies there) if absent."""
    storage = make_storage(storage_url, must_exist=True)
    try:
        names = optuna.get_all_study_names(storage)
    except Exception as e:
        raise UserError(f"cannot read studies from storage {mask_secrets(storage_url)!r}: {exception_line(e)}") from e
    if study_name not in names:
        where = f"storage {mask_secrets(storage_url)!r}"
        if names:
            listed = ", ".join(sorted(names))
            raise UserError(f"study {study_name!r} not found in {where}; available studies: {listed}")
        raise UserError(f"study {study_name!r} not found: {where} holds no studies; run the tuner with this storage "
                        "first, or check the URL")
    return optuna.load_study(study_name=study_name, storage=storage)


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


# ----------------------------------------------------------------------------- failing trials


def fail_trial(study: optuna.Study, storage, tid: int, reason: str, retry: str = "once") -> bool:
    """Record a RUNNING trial FAIL with ``reason`` unless another driver got there first (the state
    change is one locked row update: exactly one wins); the winner queues its params again per
    ``retry``: "once" (unless the trial was itself a retry), "always" (the failure was not the
    parameters' fault) or "never". Returns whether this call failed it."""
    from optuna.exceptions import UpdateFinishedTrialError

    try:
        storage.set_trial_user_attr(tid, "fail_reason", reason)
        if not storage.set_trial_state_values(tid, state=TrialState.FAIL):
            return False
    except UpdateFinishedTrialError:
        return False
    if retry != "never":
        retry_once(study, storage.get_trial(tid), always=retry == "always")
    return True


def fail_lost_trials(study: optuna.Study, storage, cfg: TuneConfig, ours: set[int], host: str) -> None:
    """Fail (and retry once) the RUNNING trials of drivers that are gone: those whose heartbeat went
    stale (another machine), and those of a dead driver process on this host."""
    for tid in stale_trial_ids(study, storage):
        fail_trial(study, storage, tid, f"no heartbeat for {cfg.grace_period:g} s: the driver that ran it stopped "
                                        "(machine lost or driver killed); its parameters run again")
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        attrs = t.user_attrs
        if (trial_id(t) not in ours and attrs.get("driver_host") == host and "driver_pid" in attrs
                and not _pid_alive(attrs["driver_pid"])):
            fail_trial(study, storage, trial_id(t), "its driver died; its parameters run again")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ----------------------------------------------------------------------------- Optuna's private API
# Where Optuna offers no public route, in one place, so that an upgrade touches only this.


def trial_id(trial) -> int:
    """A trial's storage id (storage calls take ids; ``Study.tell`` takes numbers)."""
    return trial._trial_id


def stale_trial_ids(study: optuna.Study, storage) -> list[int]:
    """RUNNING trials whose heartbeat is older than the grace period. Optuna's public
    ``fail_stale_trials`` fails them itself, before we could attach a ``fail_reason`` (a finished
    trial's attributes are read-only), so the same query is made here."""
    return storage._get_stale_trial_ids(study._study_id)


def open_trial(study: optuna.Study, tid: int) -> optuna.Trial:
    """The running trial ``tid`` as a ``Trial`` to report to and suggest from (in a trial process,
    which did not ask for it)."""
    return optuna.trial.Trial(study, tid)
