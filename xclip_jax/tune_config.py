"""The tuning config (the original's optuna YAML, typed): study settings, the search space and its
conditions, the pruner and sampler; each trial's complete training config.

Searchable parameters are the fields of the training config's ``model``, ``loss`` and ``training``
sections (the core's specs), derived from those fields, so no parameter is listed twice.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from xclip_jax.config import (
    CHOICES,
    NO_DATA,
    ConfigError,
    DataConfig,
    TrainConfig,
    _check,
    _nearest,
    build,
    choice_hint,
    read_yaml,
)
from xclip_jax.errors import install_hint
from xclip_jax.padding import PADDINGS
from xclip_jax.runtime import FOLDER_ROOTS
from xclip_jax.spec import CCA_HEADS, HeadSpec, LossSpec, TrainingSpec

# ----------------------------------------------------------------------------- the tuning config


PARAM_TYPES = ("categorical", "float", "int")
PRUNERS = ("SuccessiveHalvingPruner", "HyperbandPruner", "MedianPruner", "NopPruner")


@dataclasses.dataclass(frozen=True)
class ParamSpace:
    """One search-space entry (``search_space: {NAME: {…}}``).

    Attributes:
      type: ``categorical`` (with ``choices``), ``float`` or ``int`` (with ``low`` and ``high``).
      choices: the values a categorical parameter takes.
      low, high: a numeric parameter's range, both ends included.
      log: sample a numeric parameter on a log scale (``low`` must be > 0).
      step: a numeric parameter's step (``int``: 1 when null; ``float``: continuous when null).
      when: the condition under which it is sampled, ``{OTHER: [values]}`` (e.g.
        ``{head_type: [clip, mlp]}``); it replaces the parameter's default condition.
    """

    type: str = "categorical"
    choices: tuple | None = None
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    when: dict | None = None

    def __post_init__(self):
        _check(self.type in PARAM_TYPES, f"type must be categorical, float or int, got {self.type!r}")
        if self.type == "categorical":
            _check(bool(self.choices), "a categorical parameter needs a non-empty `choices` list")
        else:
            _check(self.low is not None and self.high is not None, f"a {self.type} parameter needs `low` and `high`")
            _check(self.low <= self.high, f"low ({self.low}) > high ({self.high}); swap them")
            _check(not self.log or self.low > 0, f"log scale needs low > 0, got {self.low}")
        if self.when is not None:
            _check(isinstance(self.when, dict) and all(isinstance(v, (list, tuple)) for v in self.when.values()),
                   "`when` maps a parameter name to a list of values, e.g. {head_type: [clip, mlp]}")

    def values(self) -> list:
        """The values it can take: its choices, an int range's every value (its ends when that is over
        256 values), a float range's ends."""
        if self.type == "categorical":
            return list(self.choices)
        if self.type == "int" and (self.high - self.low) / (self.step or 1) <= 256:
            return list(range(int(self.low), int(self.high) + 1, int(self.step or 1)))
        return [self.low, self.high]


@dataclasses.dataclass(frozen=True)
class PrunerConfig:
    """The pruner (``pruner:``), which stops trials that lag at a rung; a step is an epoch.

    Attributes:
      type: Optuna's pruner of that name.
      min_resource: successive halving and Hyperband: epochs before the first rung.
      reduction_factor: successive halving and Hyperband: rungs lie at ``min_resource ×
        reduction_factor^k``, and each keeps the top 1/reduction_factor.
      min_early_stopping_rate: successive halving: the first rung is at ``min_resource ×
        reduction_factor^min_early_stopping_rate``.
      n_startup_trials: median pruner: trials that finish before any is pruned.
      n_warmup_steps: median pruner: epochs of each trial before it can be pruned.
    """

    type: str = "SuccessiveHalvingPruner"
    min_resource: int = 1
    reduction_factor: int = 3
    min_early_stopping_rate: int = 0
    n_startup_trials: int = 5
    n_warmup_steps: int = 1

    def __post_init__(self):
        _check(self.type in PRUNERS, f"unknown pruner {self.type!r}; allowed: {', '.join(PRUNERS)}")
        _check(self.min_resource >= 1, "min_resource must be >= 1")
        _check(self.reduction_factor >= 2, "reduction_factor must be >= 2")
        _check(self.min_early_stopping_rate >= 0, "min_early_stopping_rate must be >= 0")

    def first_rung(self) -> int:
        """The step at which successive halving first compares trials."""
        return self.min_resource * self.reduction_factor ** self.min_early_stopping_rate


# Optuna's samplers by name, and what each needs beyond the package's own dependencies (the extra).
SAMPLER_NEEDS = {"tpe": (), "random": (), "qmc": (), "gp": ("torch", "scipy"), "cmaes": ("cmaes",)}


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
    """The sampler (``sampler:``). The defaults are the setting the search-quality benchmark chose:
    the best worst case and the smallest spread of the picked head's test R@1 over sampler seeds.

    Attributes:
      type: Optuna's ``tpe`` (TPESampler), ``gp`` (GPSampler), ``cmaes``, ``qmc`` or ``random``.
      seed: the sampler's seed; each trial's draws come from it and the trial's number, and so does
        its training seed.
      multivariate: TPE: model the parameters jointly.
      group: TPE: split the space by the parameters each trial used (needs multivariate; null:
        as multivariate).
      constant_liar: TPE: treat running trials as bad, so parallel trials spread out.
      n_startup_trials: TPE: random trials before the model is used (with ``batch_trials: K``, K
        times as many trials: start-up counts bundles).
    """

    type: str = "tpe"
    seed: int = 42
    multivariate: bool = False
    group: bool | None = None  # None: as multivariate (group needs multivariate)
    constant_liar: bool = False
    n_startup_trials: int = 10

    def __post_init__(self):
        _check(self.type in SAMPLER_NEEDS, f"unknown sampler {self.type!r}; allowed: {', '.join(SAMPLER_NEEDS)}")
        _check(self.n_startup_trials >= 0, "n_startup_trials must be >= 0")
        _check(not (self.group and not self.multivariate), "group: true needs multivariate: true")
        import importlib.util

        missing = [m for m in SAMPLER_NEEDS[self.type] if importlib.util.find_spec(m) is None]
        _check(not missing, f"sampler {self.type} needs {' and '.join(missing)}: {install_hint(self.type)}")


# A trial runner runs this many trials, then a fresh one replaces it (and earlier, when its resident
# memory is over RUNNER_MAX_MEMORY_GB after a trial); see benchmarks/RESULTS.md for the measurements.
RUNNER_MAX_TRIALS = 50
RUNNER_MAX_MEMORY_GB = 16.0


@dataclasses.dataclass(frozen=True)
class TuneConfig:
    """A tuning study (the original's optuna YAML, and keys of its own).

    Attributes:
      study_name: the study's name in the storage: rerunning a config resumes its study.
      n_trials: the study's total of finished trials; a rerun runs the rest (``--add-trials N`` adds N).
      n_jobs: trial processes at once on this machine.
      storage: an Optuna storage URL (``sqlite:///FILE``, ``postgresql+psycopg://…``); ``${NAME}`` is expanded.
      timeout: seconds after which no trial starts (null: no limit); n_trials still caps the study.
      budget_minutes: a time budget: trials start while one more fits (and the final pick's runs after
        them), whatever n_trials says (null: none).
      base_data_dir: the folder the data section's file names are relative to.
      data: the embedding sets, as in a training config.
      search_space: the searched parameters, ``{NAME: {type, choices or low/high/log/step, when}}``.
      pruner: the pruner; its rungs count epochs.
      sampler: the sampler.
      search_init: search ``init`` over [default, cca] where a head can start from CCA and no ``init`` is named.
      max_epochs: epochs per trial (a training config's ``num_epochs``).
      max_patience: a trial stops after this many epochs without a better validation R@1.
      output_dir: the study's outputs and logs; null: ``optuna_results/<study_name>`` (``runtime.with_study_folders``).
      checkpoint_dir: each trial's best epoch, in ``{trial:05d}/``; null: ``checkpoints/<study_name>``.
      fixed: training settings not searched, by their search-space names (``output_dim: 512``).
      devices: GPU indices to spread trial processes over, the least busy first; null: JAX's default.
      final_epochs, final_patience: ``num_epochs`` and ``patience`` of ``best_config.yaml``.
      final_pick: which trial the study hands over: ``best`` (the best validation R@1) or ``rerun`` (the
        top ``final_pick_trials`` trained again with ``final_pick_seeds`` fresh seeds each; the best mean).
      final_pick_trials, final_pick_seeds: the candidates of ``final_pick: rerun`` and their fresh runs each.
      heartbeat_interval: seconds between a running trial's heartbeats.
      grace_period: seconds without a heartbeat before another driver fails the trial and reruns it.
      trial_timeout: seconds after which a trial process is killed (null: never).
      trial_memory_limit_gb: a cap on each trial process's memory; a trial over it fails (null: none).
      runner_max_trials: trials a runner process runs before a fresh one replaces it (1: one per trial).
      runner_max_memory_gb: replace a runner whose resident memory is over this after a trial (null: never).
      compile_ahead: compile a runner's next trial while one trains (null: on a GPU, or n_jobs < CPUs).
      batch_trials: trials of one head, loss and batch size trained together in one program (1: each alone);
        ``auto``: 1 on a CPU and on a GPU (bundles lost search quality), said at start-up.
      padding: what widths pad to in a program: ``exact``, ``pow2``, ``max``; ``auto``: max on a GPU, else exact.
      baselines: fit the closed-form linear baselines and report the best trial against them.
      initial_trials: trials enqueued before the sampler's own: ``recipes`` (the closed form made trainable,
        a head started from CCA, moved into the space), ``none``, or a list of parameter dicts.
      warm_start_from: an earlier study in the same storage whose best trials that fit this space run first.
      warm_start_trials: how many of ``warm_start_from``'s best complete trials run first.
      device_memory_gb: the card's memory the study plans with, shared among its runners (null: the device's).
    """

    study_name: str = "xclip_tuning"
    n_trials: int = 100
    n_jobs: int = 1
    storage: str = "sqlite:///optuna_study.db"
    timeout: float | None = None
    budget_minutes: float | None = None
    base_data_dir: str = "data"
    data: DataConfig | None = None
    search_space: dict = dataclasses.field(default_factory=dict)
    pruner: PrunerConfig = dataclasses.field(default_factory=PrunerConfig)
    sampler: SamplerConfig = dataclasses.field(default_factory=SamplerConfig)
    search_init: bool = True
    max_epochs: int = 8
    max_patience: int = 2
    output_dir: str | None = None
    checkpoint_dir: str | None = None
    fixed: dict = dataclasses.field(default_factory=dict)
    devices: tuple[int, ...] | None = None
    final_epochs: int = 50
    final_patience: int = 5
    final_pick: str = "best"  # final_pick.py; the default is the one the search benchmark chose
    final_pick_trials: int = 3
    final_pick_seeds: int = 2
    heartbeat_interval: int = 10
    grace_period: int = 60
    trial_timeout: float | None = None
    trial_memory_limit_gb: float | None = None
    runner_max_trials: int = RUNNER_MAX_TRIALS
    runner_max_memory_gb: float | None = RUNNER_MAX_MEMORY_GB
    compile_ahead: bool | None = None
    batch_trials: int | str = 1  # or auto: padding.for_backend's choice
    padding: str = "auto"  # auto: padding.resolve's choice for the device (measured: benchmarks/RESULTS.md)
    baselines: bool = True
    initial_trials: str | tuple = "recipes"  # initial.py; the default is the one the search benchmark chose
    warm_start_from: str | None = None
    warm_start_trials: int = 3
    device_memory_gb: float | None = None  # plan.py

    def __post_init__(self):
        _check(self.data is not None, NO_DATA)
        _check(self.initial_trials in ("recipes", "none") or (
            isinstance(self.initial_trials, tuple) and all(isinstance(t, dict) for t in self.initial_trials)),
            "initial_trials must be recipes, none or a list of parameter dicts ({head_type: siglip, …})")
        _check(self.warm_start_trials >= 1, "warm_start_trials must be >= 1")
        _check(self.device_memory_gb is None or self.device_memory_gb > 0, "device_memory_gb must be > 0 or null")
        _check(self.runner_max_trials >= 1, "runner_max_trials must be >= 1 (1: a fresh process for every trial)")
        _check(self.batch_trials == "auto" or (isinstance(self.batch_trials, int) and self.batch_trials >= 1),
               "batch_trials must be >= 1 (1: each trial trained on its own) or auto")
        _check(self.padding in ("auto", *PADDINGS), f"padding must be auto, {', '.join(PADDINGS)}; got {self.padding!r}")
        _check(self.final_pick in ("best", "rerun"), f"final_pick must be best or rerun, got {self.final_pick!r}")
        _check(self.final_pick_trials >= 2, "final_pick_trials must be >= 2 (the trials the final pick chooses among)")
        _check(self.final_pick_seeds >= 1, "final_pick_seeds must be >= 1 (fresh runs of each)")
        _check(self.runner_max_memory_gb is None or self.runner_max_memory_gb > 0,
               "runner_max_memory_gb must be > 0 or null")
        _check(self.n_trials >= 1, "n_trials must be >= 1")
        _check(self.n_jobs >= 1, "n_jobs must be >= 1")
        _check(self.max_epochs >= 1, "max_epochs must be >= 1")
        _check(self.max_patience >= 1, "max_patience must be >= 1")
        _check(self.timeout is None or self.timeout > 0, "timeout must be > 0 seconds or null")
        _check(self.budget_minutes is None or self.budget_minutes > 0, "budget_minutes must be > 0 or null")
        _check(self.grace_period > self.heartbeat_interval, "grace_period must exceed heartbeat_interval")


CHOICES.update({ParamSpace: {"type": PARAM_TYPES}, PrunerConfig: {"type": PRUNERS},
                SamplerConfig: {"type": tuple(SAMPLER_NEEDS)}, TuneConfig: {"padding": ("auto", *PADDINGS)}})

# The sections of a TrainConfig whose fields are searchable, and their specs (the core's).
SECTION_TYPES = {"model": HeadSpec, "loss": LossSpec, "training": TrainingSpec}
# Searchable names that differ from the field's: each section's `type`. The fit loop's counters
# are set by the study (max_epochs, max_patience), not searched.
_RENAMED = {("model", "type"): "head_type", ("loss", "type"): "loss_type"}
_NOT_SEARCHED = {("training", "num_epochs"), ("training", "patience")}

# Where each searchable (flat) parameter lands in a TrainConfig, derived from the specs' fields.
PARAM_PATHS = {
    _RENAMED.get((section, f.name), f.name): (section, f.name)
    for section, spec in SECTION_TYPES.items() for f in dataclasses.fields(spec)
    if (section, f.name) not in _NOT_SEARCHED
}

# The original's implicit conditions: a parameter is only sampled when these hold.
DEFAULT_CONDITIONS = {
    # The original also samples it for attention, which does not use it: a dimension that changes
    # nothing, and the same program compiled twice. A config's `when:` may still ask for it.
    "hidden_dim": {"head_type": ["clip", "mlp"]},
    "num_heads": {"head_type": ["attention"]},
    "num_layers": {"head_type": ["attention"]},
    "queue_size": {"loss_type": ["queue_infonce"]},
    "learnable_temp": {"head_type": ["clip"]},
    "init": {"head_type": ["linear", "siglip"]},
}


def condition(name: str, space: ParamSpace) -> dict | None:
    """The condition under which ``name`` is sampled (its own ``when``, else the original's)."""
    return space.when if space.when is not None else DEFAULT_CONDITIONS.get(name)


PARAM_ALIASES = {"learnable_scale": "learnable_temp"}


def _canonical(mapping: dict, where: str) -> dict:
    out = {}
    for name, value in mapping.items():
        canonical = PARAM_ALIASES.get(name, name)
        if canonical in out:
            raise ConfigError(f"{where}.{name}: given twice (once under its alias)")
        out[canonical] = value
    return out


def validate_tune(cfg: TuneConfig) -> TuneConfig:
    """Checks that need more than one key: search-space names, conditions, fixed values."""
    cfg = dataclasses.replace(cfg, search_space=_canonical(cfg.search_space, "search_space"),
                              fixed=_canonical(cfg.fixed, "fixed"))
    spaces = {}
    for name, raw in cfg.search_space.items():
        if name not in PARAM_PATHS:
            raise ConfigError(f"search_space.{name}: unknown parameter{_nearest(name, PARAM_PATHS)}")
        space = raw if isinstance(raw, ParamSpace) else build(ParamSpace, raw, f"search_space.{name}")
        spaces[name] = space
    for name, space in spaces.items():
        cond = condition(name, space) or {}
        for other in cond:
            if other not in PARAM_PATHS:
                raise ConfigError(f"search_space.{name}.when: unknown parameter {other!r}{_nearest(other, PARAM_PATHS)}")
    for i, trial in enumerate(cfg.initial_trials if isinstance(cfg.initial_trials, tuple) else ()):
        for name in trial:
            if PARAM_ALIASES.get(name, name) not in PARAM_PATHS:
                raise ConfigError(f"initial_trials[{i}].{name}: unknown parameter{_nearest(name, PARAM_PATHS)}")
    if isinstance(cfg.initial_trials, tuple):
        cfg = dataclasses.replace(cfg, initial_trials=tuple(
            _canonical(t, f"initial_trials[{i}]") for i, t in enumerate(cfg.initial_trials)))
    for name in cfg.fixed:
        if name not in PARAM_PATHS:
            raise ConfigError(f"fixed.{name}: unknown parameter{_nearest(name, PARAM_PATHS)}")
        if name in spaces:
            raise ConfigError(f"fixed.{name}: also in search_space; keep it in one of the two")
    # A fixed value or a choice that makes no valid TrainConfig fails now, not in a trial.
    trial_config(cfg, {})
    for name, space in spaces.items():
        values = list(space.choices) if space.type == "categorical" else [space.low, space.high]
        section, key = PARAM_PATHS[name]
        allowed = CHOICES.get(SECTION_TYPES[section], {}).get(key)
        for value in values:
            try:
                trial_config(cfg, {name: int(value) if space.type == "int" else value})
            except ConfigError as e:
                why = f"allowed: {', '.join(allowed)}" if allowed else str(e).rsplit(": ", 1)[-1]
                hint = choice_hint(value, allowed) if allowed else ""
                raise ConfigError(f"search_space.{name}: {value!r} is not a valid value ({why})"
                                  f"{hint or '; remove it'}") from None
    return dataclasses.replace(cfg, search_space=spaces)


# A training config's keys that a tuning config names otherwise: a trial's epochs and patience.
TUNING_NAMES = {("training", "num_epochs"): "max_epochs", ("training", "patience"): "max_patience"}


def _training_sections(raw: dict) -> None:
    """A training config's section in a tuning config (``training: {num_epochs: 1}``) is refused with
    the tuning config's names for its keys, not the nearest top-level key's."""
    for section in SECTION_TYPES:
        if section not in raw:
            continue
        keys = raw[section] if isinstance(raw[section], dict) else {}
        renamed = {TUNING_NAMES[section, k]: v for k, v in keys.items() if (section, k) in TUNING_NAMES}
        fixed = {_RENAMED.get((section, k), k): v for k, v in keys.items() if (section, k) not in TUNING_NAMES}
        meant = [f"{k}: {v}" for k, v in renamed.items()]
        if fixed:
            meant.append(f"fixed: {{{', '.join(f'{k}: {v}' for k, v in fixed.items())}}}")
        if not meant:
            meant = ["max_epochs / max_patience" if section == "training" else "fixed: {…}"]
        raise ConfigError(f"{section}: unknown key in a tuning config; did you mean {' and '.join(meant)}? (a "
                          "trial's num_epochs and patience are max_epochs and max_patience here, other training "
                          "settings go under fixed or search_space)")


def load_tune_config(path: str | Path) -> TuneConfig:
    """Load and validate a tuning config YAML."""
    raw = read_yaml(path)  # its errors name the file already
    try:
        _training_sections(raw)
        return validate_tune(build(TuneConfig, raw))
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def trial_config(cfg: TuneConfig, params: dict, trial_number: int | None = None,
                 experiment_name: str | None = None) -> TrainConfig:
    """The complete TrainConfig of one trial: defaults ← ``fixed`` ← sampled ``params``."""
    sections: dict[str, dict] = {"model": {}, "training": {}, "loss": {}}
    for name, value in {**cfg.fixed, **params}.items():
        section, key = PARAM_PATHS[name]
        sections[section][key] = value
    sections["training"]["num_epochs"] = cfg.max_epochs
    sections["training"]["patience"] = cfg.max_patience
    seed = cfg.sampler.seed * 100_003 + (trial_number or 0)
    name = experiment_name or (f"{cfg.study_name}_trial{trial_number:05d}" if trial_number is not None else cfg.study_name)
    raw = {
        "experiment_name": name,
        "output_dir": str(Path(cfg.output_dir or FOLDER_ROOTS["output_dir"]) / "train"),
        "seed": seed,
        "base_data_dir": cfg.base_data_dir,
        "data": dataclasses.asdict(cfg.data),
        **sections,
    }
    try:
        return build(TrainConfig, raw)
    except ConfigError as e:
        raise ConfigError(f"fixed/search values give an invalid training config: {e}") from None


INIT_LINE = "init: {type: categorical, choices: [default, cca]}"
INIT_CHOICES = ("default", "cca")
