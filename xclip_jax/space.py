"""The search space: sampling its active parameters (the original's conditions, or a config's
``when``), every choice checked against the data and the other choices before a study is stored,
and the space a study stored checked against the config's."""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import sys

import optuna

from xclip_jax.errors import UserError
from xclip_jax.padding import WIDTH_FIELDS, program_key, study_buckets
from xclip_jax.spec import STATIC_FIELDS, RunSpec, fit_problems
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


def active(cfg: TuneConfig, params: dict) -> dict:
    """The parameters of ``params`` that are active given the others (and the fixed values)."""
    walked = _walk(cfg, lambda name, space: params.get(name))
    return {name: value for name, value in params.items() if name in walked}


def key_params(cfg: TuneConfig, dims: tuple[int, int]) -> frozenset:
    """The searchable parameters that decide a trial's compiled program: the static ones (head and loss
    types, batch size, dtype) and the widths whose values pad to more than one bucket under the
    study's padding. Trials that agree on these train in one program (``batch_trials``)."""
    buckets = study_buckets(cfg)
    static = {name for name, (section, key) in PARAM_PATHS.items()
              if key in STATIC_FIELDS[SECTION_TYPES[section].__name__]}
    return frozenset(static | {field for field in WIDTH_FIELDS if buckets.spread(field, dims)})


def study_keys(cfg: TuneConfig, dims: tuple[int, int], rows: int, limit: int) -> list | None:
    """The program keys the study's trials can have (every runnable combination of the parameters that
    decide a program), in a fixed order; None when there are more than ``limit``."""
    names = sorted(key_params(cfg, dims) & set(cfg.search_space))
    combos = list(itertools.product(*(cfg.search_space[n].values() for n in names)))
    if len(combos) > 4 * limit:
        return None
    buckets, keys = study_buckets(cfg), {}
    # A width that decides no program (one bucket) is probed at its largest choice: a queue that holds
    # the batch makes the program runnable whatever the default says.
    largest = {n: max(v for v in cfg.search_space[n].values() if v is not None) for n in WIDTH_FIELDS
               if n in cfg.search_space and n not in names and any(v is not None for v in cfg.search_space[n].values())}
    for picked in combos:
        values = {**largest, **dict(zip(names, picked))}
        if combination_problem(values, cfg, dims, rows) is None:
            keys.setdefault(program_key(RunSpec.of(trial_config(cfg, values), *dims), buckets), None)
    return sorted(keys, key=str) if len(keys) <= limit else None


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
    for picked in itertools.product(*(cfg.search_space[n].values() for n in involved)):
        full = dict(zip(involved, picked))
        active = {n: v for n, v in _walk(cfg, lambda name, _: full.get(name)).items() if n in full}
        combos[tuple(sorted(active.items(), key=str))] = combination_problem(active, cfg, dims, rows)
    if all(combos.values()):
        example = next(iter(combos.values()))
        raise UserError(f"search_space: no combination of the choices can run on this data ({example}); "
                        "change the choices or fixed values")
    for name in involved:
        for choice in cfg.search_space[name].values():
            hits = [problem for combo, problem in combos.items() if (name, choice) in combo]
            if hits and all(hits):
                raise UserError(f"search_space.{name}: choice {choice!r} can never run here ({hits[0]}); "
                                "remove it")
    skipped = sorted({p for p in combos.values() if p})
    if not skipped:
        return None
    # One sentence: each reason once, with the choices it holds for ("X is smaller than Y: why").
    by_reason: dict[str, list[str]] = {}
    for problem in skipped:
        what, _, why = problem.partition(": ")
        by_reason.setdefault(why, []).append(what)
    reasons = "; ".join(f"{', '.join(whats)}: {why}" if why else ", ".join(whats) for why, whats in by_reason.items())
    return (f"search_space: {sum(map(bool, combos.values()))} of {len(combos)} combinations are skipped when "
            f"sampled ({reasons})")


def space_record(cfg: TuneConfig) -> dict:
    return {name: dataclasses.asdict(space) for name, space in cfg.search_space.items()}


def _jsonable(x):
    return json.loads(json.dumps(x, default=list))


EPOCHS_ATTR = "xclip_max_epochs"  # every max_epochs the study's trials were run with


def check_ours(study: optuna.Study) -> None:
    """Refuse a study this package did not write (none of its ``xclip_`` attributes, trials there):
    the original tool's, say, under the same default study_name and storage. Its trials' values are
    not ours to hand over as the study's answer, nor its checkpoints ours to point at. Reads only."""
    if any(key.startswith("xclip_") for key in study.user_attrs) or not study.get_trials(deepcopy=False):
        return
    n = len(study.get_trials(deepcopy=False))
    raise UserError(f"study {study.study_name!r} in this storage was not written by xclip_jax ({n} trial"
                    f"{'s' if n != 1 else ''} of another tool, e.g. the original PyTorch one): its values and "
                    "checkpoints are not this package's; give this study another study_name (--study-name NAME) "
                    "or another storage")


def _range(space: dict) -> str:
    if space["type"] == "categorical":
        return f"choices {space['choices']}"
    return f"{space['type']} {space['low']:g}..{space['high']:g}{' (log)' if space.get('log') else ''}"


def check_space(study: optuna.Study, cfg: TuneConfig) -> None:
    """Refuse a search space that changed under an existing study name (reads only), and a study
    this package did not write (:func:`check_ours`).

    A categorical parameter whose choices changed, or a parameter whose type changed, cannot
    continue (Optuna can't compare its trials); a changed numeric range is allowed with a warning,
    and so is a changed ``max_epochs`` (its trials and the earlier ones are compared as if alike).
    A study with no finished or running trial may change its space freely.
    """
    check_ours(study)
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
            print(f"warning: search space of {name} changed ({_range(a)} -> {_range(b)}); continuing study "
                  f"{study.study_name!r}, whose earlier trials were drawn from the old range", file=sys.stderr)
    epochs = [e for e in study.user_attrs.get(EPOCHS_ATTR) or () if e != cfg.max_epochs]
    if epochs:
        print(f"warning: study {study.study_name!r} has trials of max_epochs {', '.join(map(str, epochs))}; these "
              f"train {cfg.max_epochs}, and the sampler and pruner compare them all as alike; to keep them apart "
              "use a new study_name", file=sys.stderr)


def store_space(study: optuna.Study, cfg: TuneConfig) -> None:
    """Record the search space with the study (after ``check_space`` passed): a new study's, or the
    new space of a study that has no trials yet; and the ``max_epochs`` its trials run with."""
    if SPACE_ATTR not in study.user_attrs or not _has_trials(study):
        study.set_user_attr(SPACE_ATTR, _jsonable(space_record(cfg)))
    epochs = study.user_attrs.get(EPOCHS_ATTR) or [] if _has_trials(study) else []
    if cfg.max_epochs not in epochs:
        study.set_user_attr(EPOCHS_ATTR, sorted({*epochs, cfg.max_epochs}))


def _has_trials(study: optuna.Study) -> bool:
    """Whether the study has a trial that ran or runs (draws skipped as unrunnable do not count)."""
    from optuna.trial import TrialState

    states = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL, TrialState.RUNNING)
    return any(SKIPPED_ATTR not in t.system_attrs and not t.system_attrs.get("xclip_surplus")
               for t in study.get_trials(deepcopy=False, states=states))


