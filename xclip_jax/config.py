"""Typed configs, built once from YAML at the edge: the training config, and the machinery that
builds any config dataclass (the tuning config, ``tune_config``, uses it too).

The original tool's YAML keys are accepted unchanged. Every unknown key and bad value fails here,
before anything compiles, with the key's path, what is allowed and (for typos) the nearest valid key.
The training config's ``model``, ``loss`` and ``training`` sections *are* the core's specs
(``xclip_jax.spec``), built directly from the YAML.
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
from xclip_jax.spec import (
    CCA_HEADS,
    DTYPES,
    HEAD_INITS,
    HEAD_TYPES,
    LOSS_TYPES,
    SIGMOID_NORMALIZE,
    HeadSpec,
    LossSpec,
    TrainingSpec,
    unused_fields,
)


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
    """An in-memory synthetic set (``data: {synthetic: {…}}``, see ``xclip_jax.data.synthetic_splits``):
    COCO-like, deterministic, no files needed.

    Attributes:
      images: training images.
      captions: captions (rows) per image.
      image_dim, text_dim: the embedding widths of the two sides.
      val_images, test_images: images of the validation and test sets.
      noise: noise-to-signal ratio of each side (null: the generator's default, 1.75: hard; 0.5–1
        learns in a few epochs).
      seed: the generator's seed.
      nonlinearity: spread of each map's tanh input (null: the generator's default, 1.5).
      latent_dim: coordinates of each image's latent vector, which both sides see through maps of their own.
      fold: share of latent coordinates the captions see only by magnitude, which no linear map recovers.
    """

    images: int = 4000
    captions: int = 5
    image_dim: int = 768
    text_dim: int = 1024
    val_images: int = 500
    test_images: int = 500
    noise: float | None = None
    seed: int = 0
    nonlinearity: float | None = None
    latent_dim: int = 64
    fold: float = 0.0

    def __post_init__(self):
        for name in ("images", "captions", "image_dim", "text_dim", "val_images", "test_images", "latent_dim"):
            _check(getattr(self, name) > 0, f"{name} must be > 0")
        _check(self.nonlinearity is None or self.nonlinearity > 0, "nonlinearity must be > 0")
        _check(0.0 <= self.fold <= 1.0, f"fold must be between 0 and 1, got {self.fold}")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where the embedding sets are (the ``data:`` section): file names relative to ``base_data_dir``,
    or ``synthetic``. A name is read by the file rule: a converted ``.npy`` beside it wins.

    Attributes:
      train_image_embeddings, train_text_embeddings, train_metadata: the training set's files.
      val_image_embeddings, val_text_embeddings, val_metadata: the validation set's files (early
        stopping and pruning read it).
      test_image_embeddings, test_text_embeddings, test_metadata: the test set's files (optional:
        the final metrics and the baselines' test column).
      synthetic: the built-in synthetic set instead of files (``synthetic: {}`` takes its defaults).
    """

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
    """A complete training run (the original's training YAML).

    Attributes:
      experiment_name: the run's folder under ``output_dir``.
      output_dir: where runs are written, ``output_dir/experiment_name/``.
      seed: the seed of initialisation, dropout and shuffling.
      device: ``auto`` (JAX's default), ``cpu``, ``cuda`` or ``cuda:N`` (``gpu``, ``gpu:N``); ``cuda``
        on a machine without a GPU trains on the CPU with a warning.
      base_data_dir: the folder the data section's file names are relative to.
      data: the embedding sets (required).
      model: the heads.
      training: optimisation and the fit loop.
      loss: the contrastive loss.
      evaluation: the final evaluation.
    """

    experiment_name: str = "xclip"
    output_dir: str = "outputs"
    seed: int = 42
    device: str = "auto"
    base_data_dir: str = "data"
    data: DataConfig | None = None
    model: HeadSpec = dataclasses.field(default_factory=HeadSpec)
    training: TrainingSpec = dataclasses.field(default_factory=TrainingSpec)
    loss: LossSpec = dataclasses.field(default_factory=LossSpec)
    evaluation: EvaluationConfig = dataclasses.field(default_factory=EvaluationConfig)

    def __post_init__(self):
        _check(self.data is not None, NO_DATA)
        _check(DEVICE.fullmatch(self.device) is not None,
               f"device {self.device!r}: use auto, cpu, cuda or cuda:N (gpu, gpu:N also work)")


def settings_line(cfg: TrainConfig, image_dim: int, text_dim: int) -> str:
    """The resolved settings of a training run in one line (the defaults filled in, the fields its head
    and loss ignore left out), e.g. ``settings: model clip (output_dim 512, hidden_dim 576/2048 (half of
    each input dim), dropout 0.1); loss softmax_infonce (…); training batch_size 2048, …; seed 42``."""

    def fields(spec) -> str:
        said = []
        for f in dataclasses.fields(spec):
            value = getattr(spec, f.name)
            if f.name == "type" or f.name in unused_fields(spec) or (f.name == "init" and spec.type not in CCA_HEADS):
                continue
            if f.name == "hidden_dim" and value is None:  # as in the original: half of each input dim
                value = f"{spec.hidden_width(image_dim)}/{spec.hidden_width(text_dim)} (half of each input dim)"
            elif isinstance(value, bool):
                value = str(value).lower()  # as YAML writes it
            said.append(f"{f.name} {value:g}" if isinstance(value, float) else f"{f.name} {value}")
        return ", ".join(said)

    return (f"settings: model {cfg.model.type} ({fields(cfg.model)}); loss {cfg.loss.type} ({fields(cfg.loss)}); "
            f"training {fields(cfg.training)}; seed {cfg.seed}")


# Keys the original spelled differently: old name -> our field name, per section.
ALIASES = {"LossSpec": {"learnable_scale": "learnable_temp"}}

# Keys whose value is one of a few names: {config class: {field: the names}}. A typo gets the nearest
# name, and the configuration reference lists them; the tuning config adds its own classes' keys.
CHOICES: dict[type, dict[str, tuple]] = {
    HeadSpec: {"type": HEAD_TYPES, "init": HEAD_INITS},
    LossSpec: {"type": LOSS_TYPES, "sigmoid_normalize": SIGMOID_NORMALIZE},
    TrainingSpec: {"dtype": DTYPES},
}

# A tuning config's own top-level keys: given to the training CLI, they say which command it is for.
TUNING_KEYS = ("study_name", "search_space", "n_trials", "pruner", "sampler", "fixed")


# ----------------------------------------------------------------------------- building


def _nearest(key: str, options) -> str:
    close = difflib.get_close_matches(key, list(options), n=1, cutoff=0.5)
    return f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(sorted(options))}"


# Names that mean one of the allowed values under another name: a spelling match would mislead
# ("ASHAPruner" is nearest to "NopPruner", which turns pruning off).
_ASHA = ("ASHA (asynchronous successive halving) is Optuna's 'SuccessiveHalvingPruner'; 'HyperbandPruner' runs "
         "several brackets of it")
KNOWN_AS = {"ASHAPruner": _ASHA, "ASHA": _ASHA}


def choice_hint(value, allowed) -> str:
    """``; did you mean 'clip'?`` for a value close to one of ``allowed`` (a typo), the allowed name
    of a value known under another (``KNOWN_AS``), else ``""``."""
    if not isinstance(value, str) or value in allowed:
        return ""
    known = next((said for name, said in KNOWN_AS.items() if name.lower() == value.lower()), None)
    if known:
        return f"; {known}"
    close = difflib.get_close_matches(value, [str(a) for a in allowed], n=1, cutoff=0.5)
    return f"; did you mean {close[0]!r}?" if close else ""


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
        hint = next((h for name, allowed in CHOICES.get(cls, {}).items()
                     if (h := choice_hint(kwargs.get(name), allowed))), "")
        raise ConfigError(f"{where}: {e}{hint}") from None


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
    raw = read_yaml(path)  # its errors name the file already
    tuning = [key for key in TUNING_KEYS if key in raw]
    if tuning:
        raise ConfigError(f"{path}: a tuning config (it has {', '.join(tuning)}), not a training config; run "
                          f"python -m xclip_jax.tune {path}, then train the best_config.yaml the study writes")
    try:
        return build(TrainConfig, raw)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


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
