"""What fixes a head, a loss and a training run: the core's specs and their allowed values, and the
key a compiled program is built for.

Plain frozen dataclasses that import nothing (no jax), so that the config (which builds them
directly from its YAML sections) and the tuning driver (which never imports jax) can use them.
Each spec validates its own values; the config turns a ValueError into a one-line error naming
the key.

A compiled program depends on a :class:`ProgramKey` alone: the head and loss types, the data's
dims, the batch size, the dtype and the (padded) widths. Every other value of a run (dropout,
temperature, learning rate, weight decay, clipping, the loss switches, the number of attention
heads, the real widths) travels as data in the train state (``model.HParams``), and the fit loop's
counters (epochs, patience) steer the loop; trials that differ only in them share every program.
"""

from __future__ import annotations

import dataclasses

HEAD_TYPES = ("siglip", "clip", "mlp", "attention", "linear")
HEAD_INITS = ("default", "cca")
CCA_HEADS = ("linear", "siglip")  # the heads whose projection can start from the CCA solution
LOSS_TYPES = ("sigmoid_infonce", "softmax_infonce", "queue_infonce")
DTYPES = ("float32", "bfloat16")
SIGMOID_NORMALIZE = ("pairs", "batch")

# The spec fields a compiled program is built for (the widths too, through their padded bucket:
# ``padding``); every other field is data or a fit-loop counter.
STATIC_FIELDS = {"HeadSpec": ("type",), "LossSpec": ("type",), "TrainingSpec": ("batch_size", "dtype")}


def unused_fields(spec) -> tuple[str, ...]:
    """The fields that ``spec``'s type ignores."""
    if isinstance(spec, HeadSpec):
        return ((() if spec.type in ("clip", "mlp") else ("hidden_dim",))
                + (() if spec.type == "attention" else ("num_heads", "num_layers")))
    if isinstance(spec, LossSpec):
        return ((() if spec.type == "sigmoid_infonce" else ("learnable_bias", "sigmoid_normalize"))
                + (() if spec.type == "queue_infonce" else ("queue_size", "mask_batch_duplicates")))
    return ()


# Every random stream (a JAX PRNG key, numpy's generators, Optuna's samplers) is seeded from an
# integer in [0, 2**32): any integer a user writes is reduced into it by this one rule.
SEED_RANGE = 2**32


def key_seed(seed: int) -> int:
    """``seed`` reduced into ``[0, 2**32)`` (negative and large seeds included): what every random
    stream of the package is seeded with."""
    return int(seed) % SEED_RANGE


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


@dataclasses.dataclass(frozen=True)
class HeadSpec:
    """A head's architecture (the ``model:`` section).

    Attributes:
      type: the head's architecture (``HEAD_TYPES``).
      output_dim: size of the shared embedding space.
      hidden_dim: hidden width for clip/mlp; ``None`` means ``in_dim // 2``. Unused by siglip and
        attention (as in the original).
      dropout: the dropout rate (data: carried in the train state).
      num_heads: attention heads (attention head only; must divide both input dims). With one token
        they only group the attention dropout's decisions: data.
      num_layers: attention blocks (attention head only).
      init: ``default`` (PyTorch's initialisation) or ``cca`` (linear and siglip heads: the
        projections start from the CCA solution of the training set, so epoch 0 is already at the
        CCA baseline; data: it changes initial values, not the program).
    """

    type: str = "siglip"
    output_dim: int = 512
    hidden_dim: int | None = None
    dropout: float = 0.1
    num_heads: int = 8
    num_layers: int = 1
    init: str = "default"

    def __post_init__(self):
        _check(self.type in HEAD_TYPES, f"unknown head type {self.type!r}; allowed: {', '.join(HEAD_TYPES)}")
        _check(self.output_dim > 0, "output_dim must be > 0")
        _check(self.hidden_dim is None or self.hidden_dim > 0, "hidden_dim must be > 0 (or null)")
        _check(0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout}")
        _check(self.num_heads > 0, "num_heads must be > 0")
        _check(self.num_layers > 0, "num_layers must be > 0")
        _check(self.init in HEAD_INITS, f"init must be one of {', '.join(HEAD_INITS)}, got {self.init!r}")

    def hidden_width(self, in_dim: int) -> int:
        """The hidden width of the side whose inputs have ``in_dim`` dims: ``hidden_dim``, or half the
        input (the original's rule, decided here only)."""
        return hidden_width(self.hidden_dim, in_dim)


def hidden_width(hidden_dim: int | None, in_dim: int) -> int:
    """A hidden width as ``HeadSpec.hidden_dim`` gives it (None: ``in_dim // 2``)."""
    return hidden_dim or in_dim // 2


@dataclasses.dataclass(frozen=True)
class LossSpec:
    """The contrastive loss (the ``loss:`` section).

    Attributes:
      type: the loss (``LOSS_TYPES``).
      temperature: τ at the start (data: the loss params hold ``log(1/τ)``).
      learnable_temp: learn τ (the original's ``learnable_scale``).
      learnable_bias: sigmoid only: learn the SigLIP bias (init −10); false is the original's b = 0.
      sigmoid_normalize: sigmoid only: ``pairs`` averages over B×B (the original), ``batch`` divides by B.
      queue_size: queue only: slots of the ring buffer of past texts.
      mask_batch_duplicates: queue only: mask other captions of the same image in the batch.
    """

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
        _check(self.sigmoid_normalize in SIGMOID_NORMALIZE, "sigmoid_normalize must be 'pairs' or 'batch'")
        _check(self.queue_size >= 1, "queue_size must be >= 1")


@dataclasses.dataclass(frozen=True)
class TrainingSpec:
    """Optimisation and the fit loop (the ``training:`` section).

    Attributes:
      batch_size: rows per step (the last partial batch of an epoch is dropped).
      learning_rate, weight_decay: AdamW's (data: carried in the optimizer state).
      num_epochs, patience: the fit loop's length and early stopping on validation R@1.
      max_grad_norm: global-norm clipping before AdamW.
      dtype: the heads' matmul dtype (``bfloat16`` for GPUs; params, losses and metrics stay float32).
    """

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


def fit_problems(head: HeadSpec, loss: LossSpec, training: TrainingSpec, *, image_dim: int, text_dim: int,
                 rows: int) -> tuple[list[str], list[str]]:
    """What stops (errors) or weakens (warnings) a run of these specs on data of these sizes.

    The one place these rules live: the training CLI checks its config with it, and the tuning
    driver checks every combination of the search space with it before anything is stored.

    Returns:
      ``(errors, warnings)``, each a list of one-line messages naming the keys and the fix.
    """
    errors, warnings = [], []
    if training.batch_size > rows:
        errors.append(f"training.batch_size={training.batch_size} is larger than the training set ({rows} rows); "
                      "lower batch_size")
    if head.type == "attention":
        bad = [d for d in (image_dim, text_dim) if d % head.num_heads]
        if bad:
            errors.append(f"model.num_heads={head.num_heads} does not divide the input dims (image {image_dim}, "
                          f"text {text_dim}); choose num_heads that divides both")
    if head.init == "cca" and head.type not in CCA_HEADS:
        errors.append(f"model.init cca starts a {' or '.join(CCA_HEADS)} head's projection from CCA, not a "
                      f"{head.type} head's; use init: default, or head type {' or '.join(CCA_HEADS)}")
    if loss.type == "queue_infonce" and loss.queue_size < training.batch_size:
        warnings.append(f"loss.queue_size {loss.queue_size} is smaller than training.batch_size "
                        f"{training.batch_size}: the queue holds less than one batch of negatives; raise queue_size")
    return errors, warnings


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """A run's three config sections and the input dims. Built in one line from a config:
    ``RunSpec.of(cfg, image_dim, text_dim)``."""

    head: HeadSpec
    loss: LossSpec
    training: TrainingSpec
    image_dim: int
    text_dim: int

    @classmethod
    def of(cls, cfg, image_dim: int, text_dim: int) -> RunSpec:
        """The spec of a typed TrainConfig on inputs of these dims."""
        return cls(cfg.model, cfg.loss, cfg.training, image_dim, text_dim)

    @property
    def batch_size(self) -> int:
        return self.training.batch_size


@dataclasses.dataclass(frozen=True)
class ProgramKey:
    """What a compiled program is built for, and nothing else: the head and loss types, the data's
    dims, the dtype, the batch size and the static widths, which may be padded (``padding``): a
    trial's real widths are data. A width the head or loss does not have is 0; a key for the heads
    alone (:meth:`heads_key`) has no loss and no batch.

    Attributes:
      head, loss: the types. image_dim, text_dim: the inputs.
      output_dim: the output width. hidden: the hidden width of each side (clip, mlp).
      num_layers: attention blocks. num_heads: the most attention heads a member may have (its
        dropout draws one decision per example and head; each member's own count is data).
      queue_size: the queue's slots. batch_size, dtype: the step's.
    """

    head: str
    image_dim: int
    text_dim: int
    output_dim: int
    hidden: tuple[int, int] = (0, 0)
    num_layers: int = 0
    num_heads: int = 0
    dtype: str = "float32"
    loss: str = ""
    queue_size: int = 0
    batch_size: int = 0

    def heads_key(self) -> ProgramKey:
        """The key as far as the heads go: what encoding and evaluation are built for."""
        return dataclasses.replace(self, loss="", queue_size=0, batch_size=0)

    def init_key(self) -> ProgramKey:
        """What the heads' initialisation is built for (params are float32 whatever the dtype)."""
        return dataclasses.replace(self.heads_key(), dtype="float32")
