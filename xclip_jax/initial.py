"""The study's initial design: known-good trials enqueued before the sampler's own start-up.

A fresh study's first trials are TPE's random draws, so whether it ever trains the closed form's
warm-started head at a learning rate that moves it is luck (benchmarks/RESULTS.md: the default
study's worst sampler seed handed over what CCA gives in a second). ``initial_trials: recipes``
enqueues, before any draw, the trainable closed form — a head that starts from CCA, softmax loss,
τ 0.05, batch 256, learning rate 1e-3, weight decay 1e-4, no dropout, output 512 — with each value
moved to the nearest the study's space allows (the SMAC-style default configuration, Feurer et al.,
AAAI 2015). ``warm_start_from: STUDY`` enqueues the best configurations of an earlier study in the
same storage that fit this space. Enqueued trials count toward ``n_trials`` and carry
``INITIAL_ATTR`` (where they came from). Jax-free: the driver calls it.
"""

from __future__ import annotations

import dataclasses
import math

import optuna
from optuna.trial import TrialState

from xclip_jax import space as sp
from xclip_jax.errors import UserError
from xclip_jax.spec import CCA_HEADS, HeadSpec
from xclip_jax.tune_config import INIT_CHOICES, ParamSpace, TuneConfig

INITIAL_ATTR = "initial_design"  # a trial's user attribute: which recipe or earlier trial it came from
ENQUEUED_ATTR = "xclip_initial_design"  # the study's: the design was enqueued once (a resume adds none)

# The closed form made trainable: measured on codedocs (issue figures, benchmarks/RESULTS.md).
CLOSED_FORM = {"init": "cca", "loss_type": "softmax_infonce", "temperature": 0.05, "batch_size": 256,
               "learning_rate": 1e-3, "weight_decay": 1e-4, "dropout": 0.0, "output_dim": 512}
# One recipe per hidden-layer head where it was measured to help: the literature's defaults (softmax
# InfoNCE at τ 0.07, Adam's learning rate 1e-3), the quickstart's mlp at val R@1 0.87 in 10 epochs.
HEAD_RECIPES = {"mlp": {"loss_type": "softmax_infonce", "temperature": 0.07, "batch_size": 256, "learning_rate": 1e-3,
                        "weight_decay": 1e-4, "dropout": 0.1, "hidden_dim": 1024, "output_dim": 512}}
# A loss's nearest stand-ins when the space lacks it (a queue is softmax InfoNCE with more negatives).
NEAREST_LOSS = {"softmax_infonce": ("softmax_infonce", "queue_infonce", "sigmoid_infonce")}


def implicit_init(cfg: TuneConfig) -> tuple[TuneConfig, str | None]:
    """The config with ``init`` searched over [default, cca] when its space holds a head that can start
    from CCA (linear, siglip) and it names init nowhere (the warm start the search-quality benchmark
    chose: benchmarks/RESULTS.md), with the start-up line that says so; else the config, None."""
    if not cfg.search_init or "init" in cfg.search_space or "init" in cfg.fixed:
        return cfg, None
    head = cfg.search_space.get("head_type")
    heads = list(head.choices) if head is not None and head.type == "categorical" else [
        cfg.fixed.get("head_type", HeadSpec().type)]
    cca_heads = [h for h in heads if h in CCA_HEADS]
    if not cca_heads:
        return cfg, None
    space = ParamSpace(type="categorical", choices=tuple(INIT_CHOICES))
    line = (f"search_space: init searched over [default, cca] for the {' and '.join(cca_heads)} head "
            "(the CCA warm start); search_init: false (or fixed: {init: default}) turns it off")
    return dataclasses.replace(cfg, search_space={**cfg.search_space, "init": space}), line


def nearest(value, space: ParamSpace):
    """The value of ``space`` nearest ``value``: a numeric choice by ratio (log distance), a string
    choice only when present (else None), a range's value clipped to it and rounded to its step."""
    if space.type == "categorical":
        choices = list(space.choices)
        if value in choices:
            return value
        numeric = [c for c in choices if isinstance(c, (int, float)) and not isinstance(c, bool) and c > 0]
        if isinstance(value, (int, float)) and value > 0 and numeric:
            return min(numeric, key=lambda c: (abs(math.log(c / value)), c))
        return None
    low, high = space.low, space.high
    clipped = min(max(float(value), low), high)
    if space.step:
        clipped = low + round((clipped - low) / space.step) * space.step
        clipped = min(clipped, high)
    return int(round(clipped)) if space.type == "int" else clipped


def fit_to_space(wanted: dict, cfg: TuneConfig) -> dict | None:
    """``wanted`` moved into the study's space: each active searched parameter it names, at the
    nearest allowed value (parameters it does not name are drawn by the sampler); None when a value
    it must have (a head type, a loss, an ``init``) is not to be had."""
    params = {}
    for name, space in cfg.search_space.items():
        if name not in wanted:
            continue
        candidates = NEAREST_LOSS.get(wanted[name], (wanted[name],)) if name == "loss_type" else (wanted[name],)
        value = next((v for c in candidates if (v := nearest(c, space)) is not None), None)
        if value is None:
            return None
        params[name] = value
    return sp.active(cfg, params)


def closed_form(cfg: TuneConfig) -> dict | None:
    """The trainable closed form in this space: the first head that can start from CCA, from CCA."""
    head = cfg.search_space.get("head_type")
    heads = list(head.choices) if head is not None and head.type == "categorical" else [cfg.fixed.get("head_type")]
    for name in ("siglip", *CCA_HEADS):
        if name in heads:
            init = cfg.search_space.get("init")
            if (init is not None and "cca" not in init.values()) or (init is None and cfg.fixed.get("init") != "cca"):
                return None  # the space never starts a head from CCA
            return fit_to_space({"head_type": name, **CLOSED_FORM}, cfg)
    return None


def recipes(cfg: TuneConfig) -> list[tuple[dict, str]]:
    """The known-good trials of ``initial_trials``: (params, where it came from)."""
    if cfg.initial_trials == "none":
        return []
    if cfg.initial_trials == "recipes":
        params = closed_form(cfg)
        out = [(params, f"recipe: the closed form ({params.get('head_type', 'head')} from CCA)")] if params else []
        head = cfg.search_space.get("head_type")
        for name, recipe in HEAD_RECIPES.items():
            if head is not None and name in head.values() and (params := fit_to_space({"head_type": name, **recipe},
                                                                                      cfg)):
                out.append((params, f"recipe: {name}"))
        return out
    out = []
    for i, wanted in enumerate(cfg.initial_trials):
        params = fit_to_space(wanted, cfg)
        if params is None:
            raise UserError(f"initial_trials[{i}]: {wanted} does not fit the search space (a head type, loss or "
                            "init it names is not a choice); change it or remove it")
        out.append((params, f"initial_trials[{i}]"))
    return out


def _fits(params: dict, cfg: TuneConfig) -> bool:
    """Whether an earlier trial's parameters are all values of this space (those it lacks are drawn)."""
    for name, value in params.items():
        space = cfg.search_space.get(name)
        if space is None:
            if name in cfg.fixed and cfg.fixed[name] != value:
                return False
            continue
        if space.type == "categorical" and value not in space.choices:
            return False
        if space.type != "categorical" and not space.low <= value <= space.high:
            return False
    return True


def warm_start(storage, cfg: TuneConfig) -> list[tuple[dict, str]]:
    """The top ``warm_start_trials`` complete trials of study ``warm_start_from`` whose parameters fit
    this space, best first; a one-line error when the study is not there or none fits."""
    source = cfg.warm_start_from
    if source is None:
        return []
    if source == cfg.study_name:
        raise UserError(f"warm_start_from: {source!r} is this study; name an earlier study in the same storage")
    names = optuna.get_all_study_names(storage)
    if source not in names:
        listed = ", ".join(sorted(names)) or "none"
        raise UserError(f"warm_start_from: no study {source!r} in this storage (studies there: {listed}); name one "
                        "of them, or remove warm_start_from")
    study = optuna.load_study(study_name=source, storage=storage)
    trials = sorted(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)), key=lambda t: -t.value)
    picked = [t for t in trials if _fits(t.params, cfg)][:cfg.warm_start_trials]
    if not picked:
        raise UserError(f"warm_start_from: none of study {source!r}'s {len(trials)} complete trials fits this search "
                        "space (a head, loss or value outside it); widen the space or remove warm_start_from")
    return [({k: v for k, v in t.params.items() if k in cfg.search_space},
             f"warm start: study {source} trial {t.number} ({t.value:.4f})") for t in picked]


def design(storage, existing: optuna.Study | None, cfg: TuneConfig) -> list[tuple[dict, str]] | None:
    """The initial design a study gets (the warm start's trials first, then the recipes), checked before
    anything is created; None for a study that has one already or has started (a resume adds none).
    ``storage`` is None where it does not exist yet (a new SQLite file: no study to warm-start from)."""
    if existing is not None and (existing.user_attrs.get(ENQUEUED_ATTR) is not None
                                 or existing.get_trials(deepcopy=False)):
        return None
    if storage is None and cfg.warm_start_from is not None:
        raise UserError(f"warm_start_from: no study {cfg.warm_start_from!r}: the storage {cfg.storage} is new; "
                        "name a study of an existing storage, or remove warm_start_from")
    return (warm_start(storage, cfg) if storage is not None else []) + recipes(cfg)


def enqueue(study: optuna.Study, design: list[tuple[dict, str]] | None) -> str | None:
    """Enqueue ``design`` into a study that has not started; the start-up line that says what was
    enqueued (None when nothing was)."""
    if design is None or study.user_attrs.get(ENQUEUED_ATTR) is not None or study.get_trials(deepcopy=False):
        return None
    for params, source in design:
        study.enqueue_trial(params, user_attrs={INITIAL_ATTR: source}, skip_if_exists=True)
    study.set_user_attr(ENQUEUED_ATTR, [source for _, source in design])
    if not design:
        return None
    listed = "; ".join(source for _, source in design)
    return (f"initial design: {len(design)} trial{'s' if len(design) != 1 else ''} first ({listed}), then the "
            f"sampler (initial_trials: none turns the recipes off)")


def uses_design(cfg: TuneConfig) -> bool:
    """Whether the study starts from an initial design (its pruner then compares trials by ``init``)."""
    return cfg.initial_trials != "none" or cfg.warm_start_from is not None


class ByInit(optuna.pruners.BasePruner):
    """A pruner that compares a trial only with trials of the same ``init``: a warm-started trial's
    early epochs stand at the closed form's value, which a cold start's first epochs never reach, so
    one rung shared by both prunes every cold trial at its first rung and the search stops climbing."""

    def __init__(self, base: optuna.pruners.BasePruner):
        self._base = base

    def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        return self._base.prune(_SameInit(study, trial.params.get("init", "default")), trial)


class _SameInit:
    """The study as a pruner sees it: only the trials of one ``init``."""

    def __init__(self, study: optuna.Study, init):
        self._study, self._init = study, init

    def __getattr__(self, name):
        return getattr(self._study, name)

    def get_trials(self, deepcopy: bool = True, states=None):
        trials = self._study.get_trials(deepcopy=deepcopy, states=states)
        return [t for t in trials if t.params.get("init", "default") == self._init]
