"""The study policy: everything that talks to Optuna, shared by the driver and the trial processes.

Storage, sampler and pruner from the typed config; the search space with its conditions, sampled
and checked against the data; the changed-space check; asking for trials, counting them toward
``n_trials``, failing and retrying them (stale and lost ones too). The few private Optuna calls
this needs are gathered at the end.
"""

from __future__ import annotations

import logging
import os

import optuna
from optuna.trial import TrialState

from xclip_jax import space
from xclip_jax.errors import UserError, exception_line, mask_secrets
from xclip_jax.runtime import rows_per_second
from xclip_jax.spec import key_seed
from xclip_jax.storage import make_storage, quiet_optuna, retry_races
from xclip_jax.tune_config import (
    TuneConfig,
)

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


def trial_seed(seed: int, number: int) -> int:
    """The sampler's seed for trial ``number`` of a study seeded ``seed``."""
    import numpy as np

    return int(np.random.SeedSequence([key_seed(seed), number]).generate_state(1)[0])


class TrialSeededSampler(optuna.samplers.BaseSampler):
    """A sampler whose draws for each trial come from the configured seed and the trial's number.

    Trial numbers are handed out by the storage, so drivers that share one (a resume, a second
    machine, two started at the same moment) never make the same random draws, while one driver of
    a fresh study draws exactly what it drew before (reproducible). A sampler seeded once per
    process would repeat its start-up draws in every driver. ``build(seed)`` makes the sampler
    (public API only); it is rebuilt per trial, which keeps nothing but its random state: every
    sampler here reads what it learns from the storage.
    """

    def __init__(self, build, seed: int):
        self._build, self._seed = build, seed
        self._base = build(key_seed(seed))

    def before_trial(self, study, trial) -> None:
        self._base = self._build(trial_seed(self._seed, trial.number))
        self._base.before_trial(study, trial)

    def infer_relative_search_space(self, study, trial):
        return self._base.infer_relative_search_space(study, trial)

    def sample_relative(self, study, trial, search_space):
        return self._base.sample_relative(study, trial, search_space)

    def sample_independent(self, study, trial, param_name, param_distribution):
        return self._base.sample_independent(study, trial, param_name, param_distribution)

    def after_trial(self, study, trial, state, values) -> None:
        self._base.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self._base.reseed_rng()


def make_sampler(cfg: TuneConfig):
    """The config's sampler by name, its draws seeded per trial (``TrialSeededSampler``). With
    ``batch_trials: K`` the start-up trials count bundles: a bundle's companions share its lead's
    structure, so K x ``n_startup_trials`` trials explore as many structures as K = 1 would."""
    s = cfg.sampler
    startup = s.n_startup_trials * cfg.batch_trials

    def build(seed: int):
        with quiet_optuna():
            if s.type == "random":
                return optuna.samplers.RandomSampler(seed=seed)
            if s.type == "qmc":  # the sequence's scramble is the seed: the same for every trial
                return optuna.samplers.QMCSampler(seed=key_seed(s.seed), warn_independent_sampling=False)
            if s.type == "gp":
                return optuna.samplers.GPSampler(seed=seed, n_startup_trials=startup)
            if s.type == "cmaes":
                return optuna.samplers.CmaEsSampler(seed=seed, n_startup_trials=startup,
                                                    warn_independent_sampling=False)
            group = s.multivariate if s.group is None else s.group
            return optuna.samplers.TPESampler(seed=seed, multivariate=s.multivariate, group=group,
                                              constant_liar=s.constant_liar, n_startup_trials=startup)

    return TrialSeededSampler(build, s.seed)


def make_pruner(cfg: TuneConfig):
    """The config's pruner; with an initial design, successive halving and the median pruner compare
    a trial only with trials of its own ``init`` (``initial.ByInit``; Hyperband keeps its brackets)."""
    from xclip_jax.initial import ByInit, uses_design

    p = cfg.pruner
    if p.type == "HyperbandPruner":
        return optuna.pruners.HyperbandPruner(min_resource=p.min_resource, max_resource=cfg.max_epochs,
                                              reduction_factor=p.reduction_factor)
    if p.type == "SuccessiveHalvingPruner":
        pruner = optuna.pruners.SuccessiveHalvingPruner(min_resource=p.min_resource,
                                                        reduction_factor=p.reduction_factor,
                                                        min_early_stopping_rate=p.min_early_stopping_rate)
    elif p.type == "MedianPruner":
        pruner = optuna.pruners.MedianPruner(n_startup_trials=p.n_startup_trials, n_warmup_steps=p.n_warmup_steps)
    else:
        return optuna.pruners.NopPruner()
    return ByInit(pruner) if uses_design(cfg) else pruner


def pruning_warning(cfg: TuneConfig) -> str | None:
    """A warning when successive halving can never prune within ``max_epochs`` (the original's defaults never do)."""
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
        problem = space.combination_problem(space.sample(trial, cfg), cfg, dims, rows)
        if not problem:
            return trial
        storage.set_trial_system_attr(tid, space.SKIPPED_ATTR, problem)
        trial.set_user_attr("skipped", problem)
        study.tell(trial.number, state=TrialState.PRUNED)
    raise UserError(f"search_space: the last {MAX_SKIPPED_IN_A_ROW} sampled combinations could not run "
                    f"({problem}); remove the choices that cause it")


def open_study(storage, cfg: TuneConfig) -> optuna.Study:
    """Create the config's study, or load it when it exists, and store its search space (checked
    before, by ``space.check_space``). Safe to race: drivers started at the same moment on one
    storage each end with the one study (a lost race to create a row is retried)."""
    def create():
        with quiet_optuna():
            study = optuna.create_study(study_name=cfg.study_name, storage=storage, sampler=make_sampler(cfg),
                                        pruner=make_pruner(cfg), direction="maximize", load_if_exists=True)
        space.store_space(study, cfg)
        return study

    try:
        return retry_races(create)
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"storage {mask_secrets(cfg.storage)}: cannot open study {cfg.study_name!r} "
                        f"({mask_secrets(exception_line(e))}); check the storage URL") from None


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


def ask_companions(study: optuna.Study, storage, cfg: TuneConfig, lead, count: int, dims: tuple[int, int]) -> list:
    """Up to ``count`` trials with the lead's values of the parameters that decide its program
    (``space.key_params``: head and loss types, batch size, dtype, and the widths the study's padding
    does not bring to one bucket) and the rest drawn by the sampler, to train in one program with the
    lead (``batch_trials``). Each is its own Optuna trial.

    None is asked while retries are waiting (``study.ask`` would hand out a retry's own parameters,
    of another shape): those run alone, first.
    """
    if count < 1 or study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
        return []
    decides = space.key_params(cfg, dims)
    fixed = {name: value for name, value in lead.params.items() if name in decides}
    base = study.sampler
    with quiet_optuna():
        study.sampler = optuna.samplers.PartialFixedSampler(fixed, base)
    companions = []
    try:
        for _ in range(count):
            with quiet_optuna():
                trial = study.ask()
            storage.record_heartbeat(trial_id(trial))
            if is_surplus(study, trial.number, cfg.n_trials):
                storage.set_trial_system_attr(trial_id(trial), "xclip_surplus", True)
                study.tell(trial.number, state=TrialState.FAIL)
                break
            space.sample(trial, cfg)
            companions.append(trial)
    finally:
        study.sampler = base
    return companions


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
        elif space.SKIPPED_ATTR in t.system_attrs:
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
               and space.SKIPPED_ATTR not in t.system_attrs and t.state != TrialState.WAITING
               and not (t.state == TrialState.FAIL and t.number in retried)]
    return len(counted) > n_trials


# ----------------------------------------------------------------------------- throughput

RUNS_ATTR = "xclip_runs"  # one record per driver run: where its time went
BASELINES_ATTR = "xclip_baselines"  # the closed-form baselines of the study's data (baselines.compute_baselines)


def record_throughput(study: optuna.Study, trials, n_jobs: int, wall_seconds: float) -> dict:
    """Sum the trials' own timings (user attributes) over one driver run, compute its **useful
    fraction** = training seconds / (n_jobs x wall), and append the record to the study's
    ``xclip_runs`` user attribute (so ``study_summary.json`` and every later report keep it)."""
    sums = {key: sum(t.user_attrs.get(key, 0.0) or 0.0 for t in trials)
            for key in ("train_seconds", "startup_seconds", "compile_seconds", "eval_seconds")}
    record = {"trials": len(trials), "n_jobs": n_jobs, "wall_seconds": round(wall_seconds, 3),
              **{k: round(v, 3) for k, v in sums.items()},
              "programs_compiled": sum(t.user_attrs.get("programs_compiled", 0) for t in trials),
              "compile_cache_hits": sum(t.user_attrs.get("compile_cache_hits", 0) for t in trials),
              "useful_fraction": round(sums["train_seconds"] / (n_jobs * wall_seconds), 4) if wall_seconds else 0.0,
              "rows_per_second": rows_per_second(sum(t.user_attrs.get("rows_trained", 0) for t in trials),
                                                 sums["train_seconds"])}
    if trials:
        study.set_user_attr(RUNS_ATTR, list(study.user_attrs.get(RUNS_ATTR, [])) + [record])
    return record


def store_baselines(study: optuna.Study, path, process=None, wait: bool = True) -> list | None:
    """The closed-form baselines' results at ``path`` (after their process, waited for when ``wait``,
    else killed), stored with the study (``BASELINES_ATTR``); None when there are none."""
    import json
    import subprocess

    if process is not None:
        if not wait:
            process.kill()
        try:
            process.wait(timeout=900)
        except subprocess.TimeoutExpired:
            process.kill()
    if not path.exists():
        return None
    results = json.loads(path.read_text())
    if study.user_attrs.get(BASELINES_ATTR) != results:
        study.set_user_attr(BASELINES_ATTR, results)
    return results


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


def trial_params(study: optuna.Study, tid: int) -> dict:
    """A trial's parameters by its id, without taking it over as a ``Trial``."""
    return study._storage.get_trial_params(tid)
