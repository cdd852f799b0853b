"""Typed configs, built once from YAML at the edge.

The original tool's YAML keys are accepted unchanged. Every unknown key and bad value fails here,
before anything compiles, with the key's path, what is allowed and (for typos) the nearest valid key.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from xclip_jax.errors import UserError

HEAD_TYPES = ("siglip", "clip", "mlp", "attention")
LOSS_TYPES = ("sigmoid_infonce", "softmax_infonce", "queue_infonce")
DTYPES = ("float32", "bfloat16")


class ConfigError(UserError):
    """A bad config value or key."""


def _check(cond: bool, msg: str):
    if not cond:
        raise ValueError(msg)


# ----------------------------------------------------------------------------- training config

DEVICE = re.compile(r"auto|cpu|(cuda|gpu)(:\d+)?")
NO_DATA = ("no `data:` section: name the embedding files (base_data_dir, and data: with train_image_embeddings, "
           "train_text_embeddings, train_metadata, val_…, test_…), or ask for the built-in synthetic set with "
           "`data: {synthetic: {}}`")


@dataclasses.dataclass(frozen=True)
class SyntheticData:
    """An in-memory synthetic set (see ``xclip_jax.data.synthetic_splits``): no files needed."""

    images: int = 4000
    captions: int = 5
    image_dim: int = 768
    text_dim: int = 1024
    val_images: int = 500
    test_images: int = 500
    noise: float | None = None
    seed: int = 0

    def __post_init__(self):
        for name in ("images", "captions", "image_dim", "text_dim", "val_images", "test_images"):
            _check(getattr(self, name) > 0, f"{name} must be > 0")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where the embedding sets are: file names relative to ``base_data_dir``, or ``synthetic``."""

    train_image_embeddings: str | None = None
    train_text_embeddings: str | None = None
    train_metadata: str | None = None
    val_image_embeddings: str | None = None
    val_text_embeddings: str | None = None
    val_metadata: str | None = None
    test_image_embeddings: str | None = None
    test_text_embeddings: str | None = None
    test_metadata: str | None = None
    synthetic: SyntheticData | None = None

    def __post_init__(self):
        if self.synthetic is None:
            for split in ("train", "val"):
                for part in ("image_embeddings", "text_embeddings", "metadata"):
                    _check(getattr(self, f"{split}_{part}") is not None,
                           f"{split}_{part} is required (or give a `synthetic:` section)")

    def paths(self, split: str, base_dir: str | Path) -> tuple[Path, Path, Path] | None:
        """The (image, text, metadata) paths of a split, or None when the config names none."""
        names = [getattr(self, f"{split}_{part}") for part in ("image_embeddings", "text_embeddings", "metadata")]
        if any(n is None for n in names):
            return None
        return tuple(Path(base_dir) / n for n in names)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    type: str = "siglip"
    output_dim: int = 512
    hidden_dim: int | None = None
    dropout: float = 0.1
    num_heads: int = 8
    num_layers: int = 1

    def __post_init__(self):
        _check(self.type in HEAD_TYPES, f"unknown head type {self.type!r}; allowed: {', '.join(HEAD_TYPES)}")
        _check(self.output_dim > 0, "output_dim must be > 0")
        _check(self.hidden_dim is None or self.hidden_dim > 0, "hidden_dim must be > 0 (or null)")
        _check(0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout}")
        _check(self.num_heads > 0, "num_heads must be > 0")
        _check(self.num_layers > 0, "num_layers must be > 0")


@dataclasses.dataclass(frozen=True)
class TrainingConfig:
    batch_size: int = 2048
    learning_rate: float = 1e-4
    weight_decay: float = 1e-4
    num_epochs: int = 50
    patience: int = 5
    max_grad_norm: float = 1.0
    dtype: str = "float32"

    def __post_init__(self):
        _check(self.batch_size >= 2, "batch_size must be >= 2")
        _check(self.learning_rate > 0, "learning_rate must be > 0")
        _check(self.weight_decay >= 0, "weight_decay must be >= 0")
        _check(self.num_epochs >= 1, "num_epochs must be >= 1")
        _check(self.patience >= 1, "patience must be >= 1")
        _check(self.max_grad_norm > 0, "max_grad_norm must be > 0")
        _check(self.dtype in DTYPES, f"dtype must be one of {', '.join(DTYPES)}")


@dataclasses.dataclass(frozen=True)
class LossConfig:
    type: str = "softmax_infonce"
    temperature: float = 0.07
    learnable_temp: bool = False
    learnable_bias: bool = True
    sigmoid_normalize: str = "pairs"
    queue_size: int = 4096
    mask_batch_duplicates: bool = True

    def __post_init__(self):
        _check(self.type in LOSS_TYPES, f"unknown loss type {self.type!r}; allowed: {', '.join(LOSS_TYPES)}")
        _check(0 < self.temperature, f"temperature must be > 0, got {self.temperature}")
        _check(self.sigmoid_normalize in ("pairs", "batch"), "sigmoid_normalize must be 'pairs' or 'batch'")
        _check(self.queue_size >= 1, "queue_size must be >= 1")


@dataclasses.dataclass(frozen=True)
class EvaluationConfig:
    """The final evaluation of a training run (the original's keys and meanings).

    Attributes:
      top_k: the cut-offs K of Recall@K.
      visualization_samples: pairs of the test set drawn at random for the embedding pictures (a t-SNE
        of both modalities and a PCA figure); 0 draws none.
      tsne_perplexity: the t-SNE's perplexity.
      save_features: also write the test set's projected image and text features and their
        similarity matrix beside the metrics.
    """

    top_k: tuple[int, ...] = (1, 5, 10, 50)
    visualization_samples: int = 1000
    tsne_perplexity: float = 30.0
    save_features: bool = False

    def __post_init__(self):
        _check(len(self.top_k) > 0 and all(k >= 1 for k in self.top_k), "top_k must be a list of ints >= 1")
        _check(self.visualization_samples >= 0, "visualization_samples must be >= 0 (0 draws no pictures)")
        _check(self.tsne_perplexity > 0, "tsne_perplexity must be > 0")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """A complete training run (the original's training YAML)."""

    experiment_name: str = "xclip"
    output_dir: str = "outputs"
    seed: int = 42
    device: str = "auto"  # auto | cpu | cuda | cuda:N (gpu, gpu:N): where the training CLI runs
    base_data_dir: str = "data"
    data: DataConfig | None = None
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    training: TrainingConfig = dataclasses.field(default_factory=TrainingConfig)
    loss: LossConfig = dataclasses.field(default_factory=LossConfig)
    evaluation: EvaluationConfig = dataclasses.field(default_factory=EvaluationConfig)

    def __post_init__(self):
        _check(self.data is not None, NO_DATA)
        _check(DEVICE.fullmatch(self.device) is not None,
               f"device {self.device!r}: use auto, cpu, cuda or cuda:N (gpu, gpu:N also work)")


# Keys the original spelled differently: old name -> our field name, per section.
ALIASES = {"LossConfig": {"learnable_scale": "learnable_temp"}}


# ----------------------------------------------------------------------------- tuning config


@dataclasses.dataclass(frozen=True)
class ParamSpace:
    """One search-space entry: ``type`` with ``choices`` or ``low``/``high``/``log``/``step``.

    ``when`` maps another parameter to the values for which this one is sampled.
    """

    type: str = "categorical"
    choices: tuple | None = None
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    when: dict | None = None

    def __post_init__(self):
        _check(self.type in ("categorical", "float", "int"), f"type must be categorical, float or int, got {self.type!r}")
        if self.type == "categorical":
            _check(bool(self.choices), "a categorical parameter needs a non-empty `choices` list")
        else:
            _check(self.low is not None and self.high is not None, f"a {self.type} parameter needs `low` and `high`")
            _check(self.low <= self.high, f"low ({self.low}) > high ({self.high}); swap them")
            _check(not self.log or self.low > 0, f"log scale needs low > 0, got {self.low}")
        if self.when is not None:
            _check(isinstance(self.when, dict) and all(isinstance(v, (list, tuple)) for v in self.when.values()),
                   "`when` maps a parameter name to a list of values, e.g. {head_type: [clip, mlp]}")


@dataclasses.dataclass(frozen=True)
class PrunerConfig:
    type: str = "SuccessiveHalvingPruner"
    min_resource: int = 1
    reduction_factor: int = 3
    min_early_stopping_rate: int = 0
    n_startup_trials: int = 5
    n_warmup_steps: int = 1

    def __post_init__(self):
        allowed = ("SuccessiveHalvingPruner", "HyperbandPruner", "MedianPruner", "NopPruner")
        _check(self.type in allowed, f"unknown pruner {self.type!r}; allowed: {', '.join(allowed)}")
        _check(self.min_resource >= 1, "min_resource must be >= 1")
        _check(self.reduction_factor >= 2, "reduction_factor must be >= 2")
        _check(self.min_early_stopping_rate >= 0, "min_early_stopping_rate must be >= 0")

    def first_rung(self) -> int:
        """The step at which successive halving first compares trials."""
        return self.min_resource * self.reduction_factor ** self.min_early_stopping_rate


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
    type: str = "tpe"
    seed: int = 42
    multivariate: bool = True
    constant_liar: bool = True
    n_startup_trials: int = 8

    def __post_init__(self):
        _check(self.type in ("tpe", "random"), f"sampler type must be tpe or random, got {self.type!r}")


@dataclasses.dataclass(frozen=True)
class TuneConfig:
    """A tuning study (the original's optuna YAML plus sampler, output_dir, fixed, devices)."""

    study_name: str = "xclip_tuning"
    n_trials: int = 100
    n_jobs: int = 1
    storage: str = "sqlite:///optuna_study.db"
    timeout: float | None = None
    base_data_dir: str = "data"
    data: DataConfig | None = None
    search_space: dict = dataclasses.field(default_factory=dict)
    pruner: PrunerConfig = dataclasses.field(default_factory=PrunerConfig)
    sampler: SamplerConfig = dataclasses.field(default_factory=SamplerConfig)
    max_epochs: int = 8
    max_patience: int = 2
    output_dir: str = "optuna_results"
    checkpoint_dir: str = "checkpoints"
    fixed: dict = dataclasses.field(default_factory=dict)
    devices: tuple[int, ...] | None = None
    final_epochs: int = 50
    final_patience: int = 5
    heartbeat_interval: int = 10
    grace_period: int = 60
    trial_timeout: float | None = None
    trial_memory_limit_gb: float | None = None

    def __post_init__(self):
        _check(self.data is not None, NO_DATA)
        _check(self.n_trials >= 1, "n_trials must be >= 1")
        _check(self.n_jobs >= 1, "n_jobs must be >= 1")
        _check(self.max_epochs >= 1, "max_epochs must be >= 1")
        _check(self.max_patience >= 1, "max_patience must be >= 1")
        _check(self.timeout is None or self.timeout > 0, "timeout must be > 0 seconds or null")
        _check(self.grace_period > self.heartbeat_interval, "grace_period must exceed heartbeat_interval")


# Where each searchable (flat) parameter lands in a TrainConfig.
PARAM_PATHS = {
    "head_type": ("model", "type"),
    "output_dim": ("model", "output_dim"),
    "hidden_dim": ("model", "hidden_dim"),
    "dropout": ("model", "dropout"),
    "num_heads": ("model", "num_heads"),
    "num_layers": ("model", "num_layers"),
    "loss_type": ("loss", "type"),
    "temperature": ("loss", "temperature"),
    "learnable_temp": ("loss", "learnable_temp"),
    "learnable_bias": ("loss", "learnable_bias"),
    "sigmoid_normalize": ("loss", "sigmoid_normalize"),
    "queue_size": ("loss", "queue_size"),
    "mask_batch_duplicates": ("loss", "mask_batch_duplicates"),
    "batch_size": ("training", "batch_size"),
    "learning_rate": ("training", "learning_rate"),
    "weight_decay": ("training", "weight_decay"),
    "max_grad_norm": ("training", "max_grad_norm"),
    "dtype": ("training", "dtype"),
}

SECTION_TYPES = {"model": ModelConfig, "loss": LossConfig, "training": TrainingConfig}

# The original's implicit conditions: a parameter is only sampled when these hold.
DEFAULT_CONDITIONS = {
    "hidden_dim": {"head_type": ["clip", "attention", "mlp"]},
    "num_heads": {"head_type": ["attention"]},
    "num_layers": {"head_type": ["attention"]},
    "queue_size": {"loss_type": ["queue_infonce"]},
    "learnable_temp": {"head_type": ["clip"]},
}


def condition(name: str, space: ParamSpace) -> dict | None:
    """The condition under which ``name`` is sampled (its own ``when``, else the original's)."""
    return space.when if space.when is not None else DEFAULT_CONDITIONS.get(name)


# ----------------------------------------------------------------------------- building


def _nearest(key: str, options) -> str:
    close = difflib.get_close_matches(key, list(options), n=1, cutoff=0.5)
    return f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(sorted(options))}"


def _convert(value, tp, path: str):
    """Check/convert one YAML value to the annotated type ``tp``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, path)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{path}: bad value {value!r}")
    if dataclasses.is_dataclass(tp):
        return build(tp, value, path)
    if tp is Any:
        return value
    if origin is tuple or tp is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        if args and args[-1] is Ellipsis:
            return tuple(_convert(v, args[0], f"{path}[{i}]") for i, v in enumerate(value))
        return tuple(value)
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, float) and value.is_integer())):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return int(value)
    if tp is float:
        if isinstance(value, str):
            try:  # YAML 1.1 reads `1e-4` (no dot) as a string
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return value
    return value


def build(cls, mapping, path: str = ""):
    """Build dataclass ``cls`` from a mapping, validating keys, types and values."""
    where = path or "config"
    if mapping is None:
        mapping = {}
    if not isinstance(mapping, dict):
        raise ConfigError(f"{where}: expected a mapping of keys, got {mapping!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    aliases = ALIASES.get(cls.__name__, {})
    kwargs = {}
    for key, value in mapping.items():
        name = aliases.get(key, key)
        sub = f"{path}.{key}" if path else str(key)
        if name not in names:
            raise ConfigError(f"{sub}: unknown key{_nearest(str(key), names | set(aliases))}")
        if name in kwargs:
            raise ConfigError(f"{sub}: given twice (once under its alias)")
        kwargs[name] = _convert(value, hints[name], sub)
    try:
        return cls(**kwargs)
    except ValueError as e:
        raise ConfigError(f"{where}: {e}") from None


def read_yaml(path: str | Path) -> dict:
    """Read a YAML mapping; syntax errors name the file, line and column."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: config file not found; check the path")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "unknown position"
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{path}: YAML syntax error at {where}: {problem}; fix the YAML there") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of keys at the top level")
    return raw


def load_train_config(path: str | Path) -> TrainConfig:
    """Load and validate a training config YAML."""
    try:
        return build(TrainConfig, read_yaml(path))
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


# Parameter names of the original's tuning code that differ from ours.
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
    for name in cfg.fixed:
        if name not in PARAM_PATHS:
            raise ConfigError(f"fixed.{name}: unknown parameter{_nearest(name, PARAM_PATHS)}")
        if name in spaces:
            raise ConfigError(f"fixed.{name}: also in search_space; keep it in one of the two")
    # A fixed value that makes no valid TrainConfig fails now, not in every trial.
    trial_config(cfg, {}, spaces=spaces)
    return dataclasses.replace(cfg, search_space=spaces)


def load_tune_config(path: str | Path) -> TuneConfig:
    """Load and validate a tuning config YAML."""
    try:
        return validate_tune(build(TuneConfig, read_yaml(path)))
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def trial_config(cfg: TuneConfig, params: dict, spaces: dict | None = None, trial_number: int | None = None,
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
        "output_dir": str(Path(cfg.output_dir) / "train"),
        "seed": seed,
        "base_data_dir": cfg.base_data_dir,
        "data": dataclasses.asdict(cfg.data),
        **sections,
    }
    try:
        return build(TrainConfig, raw)
    except ConfigError as e:
        raise ConfigError(f"fixed/search values give an invalid training config: {e}") from None


def to_dict(cfg) -> dict:
    """A plain, YAML-ready dict of a config (tuples become lists)."""

    def clean(v):
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v

    return clean(dataclasses.asdict(cfg))


def dump_yaml(cfg, path: str | Path, header: str = "") -> None:
    """Write a config as YAML that ``build`` reads back to an equal config."""
    text = yaml.safe_dump(to_dict(cfg), sort_keys=False)
    Path(path).write_text(header + text)
