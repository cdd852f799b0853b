"""The training step and what it runs on: the spec, the train state, the optimizer, the jitted
``train_step``, the one-program epoch, and the heads' evaluation-time projection.

Imports only the core (``spec``, ``heads``, ``losses``, ``metrics``); the fit loop (``train``) and
``checkpoint`` build on it.

The last partial batch of an epoch is dropped (static shapes keep the epoch one compiled
program); the data are reshuffled every epoch, so every row is still seen.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from xclip_jax import losses
from xclip_jax.heads import init_head_params, make_heads
from xclip_jax.metrics import ranks, summarise
from xclip_jax.spec import HeadSpec, LossSpec, TrainingSpec, key_seed, static


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""

    @classmethod
    def at(cls, stopped: str) -> TrainingDiverged:
        """The error of a fit that ended ``stopped`` = "diverged at epoch N"."""
        return cls(f"training loss is not finite ({stopped}; lower learning_rate or temperature)")


class NotFinite(ValueError):
    """The heads' outputs on the validation set were NaN or infinite: their params diverged. Only this
    (or a non-finite loss) is divergence; any other error in an evaluation is itself."""


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """A run's three config sections and the input dims. Built in one line from a config:
    ``RunSpec(cfg.model, cfg.loss, cfg.training, image_dim, text_dim)``.

    The train state carries ``spec.static()``, the form whose data fields (dropout, temperature,
    learning rate, weight decay, epochs, patience) are fixed: compiled programs are keyed on it, so
    trials differing only in those share every program; their values travel in the state.
    """

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

    def static(self) -> RunSpec:
        return dataclasses.replace(self, head=static(self.head), loss=static(self.loss), training=static(self.training))

    def heads_only(self) -> RunSpec:
        """The static spec as far as the heads go (head, dims, dtype; loss and training at their
        defaults): encoding and evaluation depend on nothing else, so their programs are keyed on it."""
        return dataclasses.replace(self.static(), loss=LossSpec(), training=TrainingSpec(dtype=self.training.dtype))


class DeviceData(NamedTuple):
    """An embedding set resident on the device, each image once.

    image_NxDi: unique image embeddings. text_RxDt: one row per caption. row_image_R: image index
    of each row (also the row's id for the losses: equal index = same image).
    """

    image_NxDi: jax.Array
    text_RxDt: jax.Array
    row_image_R: jax.Array

    @property
    def rows(self) -> int:
        return self.text_RxDt.shape[0]


def to_device(embedding_set) -> DeviceData:
    """Put an ``xclip_jax.data.EmbeddingSet`` on the default device."""
    return DeviceData(
        jnp.asarray(embedding_set.image, jnp.float32),
        jnp.asarray(embedding_set.text, jnp.float32),
        jnp.asarray(embedding_set.row_image, jnp.int32),
    )


@struct.dataclass
class TrainState:
    """Everything that changes during training, as one pytree (jitted, donated, checkpointed)."""

    step: jax.Array
    params: dict  # {"image", "text", "loss": {"log_scale", "bias"}}
    dropout: jax.Array  # the rate, as data: trials differing only in it share one compiled program
    opt_state: Any
    queue: losses.QueueState | None
    rng: dict  # {"dropout", "shuffle"}: independent streams, each folded with the step
    spec: RunSpec = struct.field(pytree_node=False)


# ----------------------------------------------------------------------------- construction


def _loss_labels(loss: LossSpec):
    frozen = set()
    if not loss.learnable_temp:
        frozen.add("log_scale")
    if not (loss.type == "sigmoid_infonce" and loss.learnable_bias):
        frozen.add("bias")

    def label(params):
        return {
            "image": jax.tree.map(lambda _: "heads", params["image"]),
            "text": jax.tree.map(lambda _: "heads", params["text"]),
            "loss": {k: ("frozen" if k in frozen else "loss") for k in params["loss"]},
        }

    return label


def make_optimizer(spec: RunSpec, learning_rate: float = 0.0, weight_decay: float = 0.0):
    """AdamW on the heads after clipping *their* gradients' global norm (``max_grad_norm``), as the
    original clips the heads' parameters only; Adam (no decay, no clip) on learnable loss params;
    nothing on frozen ones, whose gradients touch neither the clip nor anything else.

    ``learning_rate`` and ``weight_decay`` live in the optimizer state (optax.inject_hyperparams:
    ``opt_state.hyperparams``), so trials that differ only in them share one compiled program.
    """

    def inner(learning_rate, weight_decay):
        return optax.multi_transform(
            {
                "heads": optax.chain(optax.clip_by_global_norm(spec.training.max_grad_norm),
                                     optax.adamw(learning_rate, weight_decay=weight_decay)),
                "loss": optax.adam(learning_rate),
                "frozen": optax.set_to_zero(),
            },
            _loss_labels(spec.loss),
        )

    return optax.inject_hyperparams(inner)(learning_rate=learning_rate, weight_decay=weight_decay)


def state_args(spec: RunSpec, seed: int) -> tuple:
    """``_fresh_state``'s arguments: the static spec, then the seed and the data fields as arrays."""
    # numpy scalars: placing them on the device compiles nothing (jnp.asarray would, once per dtype)
    return (spec.static(), np.uint32(key_seed(seed)), np.float32(spec.training.learning_rate),
            np.float32(spec.training.weight_decay), np.float32(spec.loss.temperature), np.float32(spec.head.dropout))


def create_train_state(spec: RunSpec, seed: int) -> TrainState:
    """A fresh train state: initialised heads, loss params, optimizer state, empty queue.

    The data fields of the spec (dropout, temperature, learning rate, weight decay) are read here,
    once, and travel in the state, which carries ``spec.static()``.

    Example:
      >>> spec = RunSpec(HeadSpec("clip", 64, 128), LossSpec(), TrainingSpec(batch_size=256), 32, 48)
      >>> state = create_train_state(spec, seed=0)
    """
    return _fresh_state(*state_args(spec, seed))


def _fresh_state_core(spec: RunSpec, seed, learning_rate, weight_decay, temperature, dropout) -> TrainState:
    # Independent streams for the init, each step's dropout and each epoch's shuffle: two derived from
    # one key by fold_in and split collide (partitionable threefry: split(k)[i] == fold_in(k, i)).
    k_init, k_dropout, k_shuffle = jax.random.split(jax.random.PRNGKey(seed), 3)
    params = init_head_params(spec.head, spec.image_dim, spec.text_dim, k_init)
    sigmoid_bias = spec.loss.type == "sigmoid_infonce" and spec.loss.learnable_bias
    params["loss"] = {"log_scale": losses.clamp_log_scale(-jnp.log(temperature)),
                      "bias": jnp.asarray(losses.SIGLIP_BIAS_INIT if sigmoid_bias else 0.0, jnp.float32)}
    tx = make_optimizer(spec, learning_rate, weight_decay)
    queue = (losses.init_queue(spec.loss.queue_size, spec.head.output_dim)
             if spec.loss.type == "queue_infonce" else None)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, dropout=dropout, opt_state=tx.init(params),
                      queue=queue, rng={"dropout": k_dropout, "shuffle": k_shuffle}, spec=spec)


# One compiled program instead of dozens of eager ones; the hyperparameters and the seed are
# arguments, so trials that differ only in them share it (and its persistent-cache entry).
_fresh_state = jax.jit(_fresh_state_core, static_argnums=0)


@functools.partial(jax.jit, static_argnums=0)
def _fresh_bundle(spec: RunSpec, seeds_K, learning_rates_K, weight_decays_K, temperatures_K, dropouts_K):
    # K members' states, stacked on a leading axis: each exactly what _fresh_state gives for its values.
    return jax.vmap(functools.partial(_fresh_state_core, spec))(seeds_K, learning_rates_K, weight_decays_K,
                                                                  temperatures_K, dropouts_K)


def bundle_args(specs: list[RunSpec], seeds: list[int]) -> tuple:
    """``_fresh_bundle``'s arguments for K members of one static spec (each as ``state_args``)."""
    members = [state_args(spec, seed) for spec, seed in zip(specs, seeds)]
    if len({m[0] for m in members}) != 1:
        raise ValueError("a bundle's members must share every static shape (head, dims, loss, batch, queue)")
    return (members[0][0], *(np.stack(column) for column in list(zip(*members))[1:]))


# ----------------------------------------------------------------------------- the step


def compute_loss(loss: LossSpec, loss_params: dict, zi, zt, ids, queue):
    """The configured loss; returns ``(loss, new_queue)`` (``new_queue`` is None without a queue)."""
    temperature = losses.temperature_from_log_scale(loss_params["log_scale"])
    if loss.type == "sigmoid_infonce":
        return losses.sigmoid_infonce(zi, zt, ids, temperature=temperature, bias=loss_params["bias"],
                                      normalize=loss.sigmoid_normalize), queue
    if loss.type == "softmax_infonce":
        return losses.softmax_infonce(zi, zt, ids, temperature=temperature), queue
    return losses.queue_infonce(zi, zt, ids, queue, temperature=temperature,
                                mask_batch_duplicates=loss.mask_batch_duplicates)


def _heads(spec: RunSpec):
    return make_heads(spec.head, spec.image_dim, spec.text_dim, spec.training.dtype)


def _forward(spec: RunSpec, params, batch, rng, dropout_rate):
    image_head, text_head = _heads(spec)
    k_img, k_txt = jax.random.split(rng)
    zi = image_head.apply({"params": params["image"]}, batch["image"], train=True, dropout_rate=dropout_rate,
                          rngs={"dropout": k_img})
    zt = text_head.apply({"params": params["text"]}, batch["text"], train=True, dropout_rate=dropout_rate,
                         rngs={"dropout": k_txt})
    return zi, zt


def dropout_key(state: TrainState) -> jax.Array:
    """The key of this step's dropout (split once more: image head, text head)."""
    return jax.random.fold_in(state.rng["dropout"], state.step)


def shuffle_key(state: TrainState) -> jax.Array:
    """The key of the shuffle of the epoch that starts at this step."""
    return jax.random.fold_in(state.rng["shuffle"], state.step)


def _train_step(state: TrainState, batch: dict):
    spec = state.spec
    rng = dropout_key(state)

    def loss_fn(params):
        zi, zt = _forward(spec, params, batch, rng, state.dropout)
        return compute_loss(spec.loss, params["loss"], zi, zt, batch["ids"], state.queue)

    (loss, queue), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    tx = make_optimizer(spec)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    params["loss"] = {**params["loss"], "log_scale": losses.clamp_log_scale(params["loss"]["log_scale"])}
    metrics = {
        "loss": loss,
        "grad_norm": optax.tree.norm({"image": grads["image"], "text": grads["text"]}),  # what is clipped
        "temperature": losses.temperature_from_log_scale(params["loss"]["log_scale"]),
    }
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state, queue=queue), metrics


train_step = jax.jit(_train_step, donate_argnums=0)
train_step.__doc__ = """One optimisation step: ``train_step(state, batch) -> (state, metrics)``.

``batch`` is ``{"image": [B, Di], "text": [B, Dt], "ids": [B] int}``; the state is donated.
"""


def _gather(data: DeviceData, idx_B):
    image_idx = data.row_image_R[idx_B]
    return {"image": data.image_NxDi[image_idx], "text": data.text_RxDt[idx_B], "ids": image_idx}


def _epoch(state: TrainState, data: DeviceData):
    batch_size = state.spec.batch_size
    steps = data.rows // batch_size
    key = shuffle_key(state)
    # One sort of random 32-bit keys (ties, ~rows²/2³³ pairs, keep their order): one sorting round
    # where jax.random.permutation makes several, each compiled and run.
    perm = jnp.argsort(jax.random.bits(key, (data.rows,), jnp.uint32))
    perm_SxB = perm[: steps * batch_size].reshape(steps, batch_size)

    def body(st, idx_B):
        return _train_step(st, _gather(data, idx_B))

    state, per_step = jax.lax.scan(body, state, perm_SxB)
    metrics = {
        "loss": jnp.mean(per_step["loss"]),
        "grad_norm": jnp.mean(per_step["grad_norm"]),
        "temperature": per_step["temperature"][-1],
        "finite": jnp.all(jnp.isfinite(per_step["loss"])),
    }
    return state, metrics


run_epoch = jax.jit(_epoch, donate_argnums=0)
run_epoch.__doc__ = """One epoch as one compiled program: ``run_epoch(state, data) -> (state, metrics)``: an
on-device shuffle, then a scan of ``train_step`` over the spec's batch size. Returns the new state and the epoch's
metrics (mean loss and grad norm, final temperature, whether every step's loss was finite), on the device."""


@functools.partial(jax.jit, donate_argnums=0)
def run_bundle_epoch(states: TrainState, data: DeviceData, active_K):
    """One epoch of K same-shape trials as one program (``vmap`` of ``run_epoch`` over the members).

    Each member keeps its own shuffle order, dropout, optimizer state and queue (all from its own
    state); a member whose ``active_K`` is False is left exactly as it was (stopped, pruned or
    diverged). Returns the new stacked states and per-member metrics ``[K]``.
    """
    new, metrics = jax.vmap(_epoch, in_axes=(0, None))(states, data)

    def keep(new_leaf, old_leaf):
        return jnp.where(active_K.reshape((-1,) + (1,) * (new_leaf.ndim - 1)), new_leaf, old_leaf)

    return jax.tree.map(keep, new, states), metrics


@jax.jit
def eval_loss(state: TrainState, data: DeviceData):
    """Mean loss over the set's full batches, in order, without dropout, and without the queue: its
    training texts' ids mean nothing against validation ids. A queue loss scores its batch alone."""
    spec = state.spec
    queue = None if state.queue is None else losses.init_queue(1, spec.head.output_dim)
    steps = max(data.rows // spec.batch_size, 1)
    batch_size = min(spec.batch_size, data.rows)
    idx_SxB = jnp.arange(steps * batch_size).reshape(steps, batch_size)
    image_head, text_head = _heads(spec)

    def body(_, idx_B):
        batch = _gather(data, idx_B)
        zi = image_head.apply({"params": state.params["image"]}, batch["image"])
        zt = text_head.apply({"params": state.params["text"]}, batch["text"])
        loss, _ = compute_loss(spec.loss, state.params["loss"], zi, zt, batch["ids"], queue)
        return None, loss

    _, per_step = jax.lax.scan(body, None, idx_SxB)
    return jnp.mean(per_step)


# ----------------------------------------------------------------------------- evaluation


# Rows the heads project at a time at evaluation: bounded memory, one program for any row count.
ENCODE_CHUNK_ROWS = 8192


def _encode_rows(head, params, x_NxD, chunk_size: int):
    """Apply ``head`` to every row, ``chunk_size`` rows at a time (a ``lax.map`` over padded chunks:
    bounded memory, one program)."""
    n = x_NxD.shape[0]
    c = min(chunk_size, n)
    k = -(-n // c)
    x_KxCxD = jnp.pad(x_NxD, ((0, k * c - n), (0, 0))).reshape(k, c, x_NxD.shape[1])
    z_KxCxO = jax.lax.map(lambda x: head.apply({"params": params}, x, train=False), x_KxCxD)
    return z_KxCxO.reshape(k * c, -1)[:n]


@functools.partial(jax.jit, static_argnames=("spec", "side", "chunk_size"))
def _encode(spec: RunSpec, side: str, params, x, chunk_size: int):
    image_head, text_head = _heads(spec)
    return _encode_rows(image_head if side == "image" else text_head, params, x, chunk_size)


def encode(spec: RunSpec, side: str, params, x, chunk_size: int = ENCODE_CHUNK_ROWS) -> jax.Array:
    """Project ``x`` with the ``side`` ("image"/"text") head, in fixed-size chunks (one program)."""
    return _encode(spec.heads_only(), side, params, jnp.asarray(x, jnp.float32), chunk_size)


def project(params, spec: RunSpec, data: DeviceData) -> tuple[jax.Array, jax.Array]:
    """The heads' outputs for a device-resident set: (unique images [N, D], captions [T, D])."""
    return encode(spec, "image", params["image"], data.image_NxDi), encode(spec, "text", params["text"], data.text_RxDt)


def _eval_core(spec: RunSpec, params, data: DeviceData, chunk_size: int):
    image_head, text_head = _heads(spec)
    zi = _encode_rows(image_head, params["image"], data.image_NxDi, ENCODE_CHUNK_ROWS)
    zt = _encode_rows(text_head, params["text"], data.text_RxDt, ENCODE_CHUNK_ROWS)
    return ranks(zi, zt, data.row_image_R, min(chunk_size, data.image_NxDi.shape[0]))


# The whole evaluation is one program: both projections and the retrieval ranks.
_eval_program = jax.jit(_eval_core, static_argnames=("spec", "chunk_size"))


@functools.partial(jax.jit, static_argnames=("spec", "chunk_size"))
def _bundle_eval_program(spec: RunSpec, params_K, data: DeviceData, chunk_size: int):
    # The evaluation of K members at once: their ranks [K, N] and [K, T], and finiteness [K].
    return jax.vmap(lambda params: _eval_core(spec, params, data, chunk_size))(params_K)


def run_eval(eval_fn, params, data: DeviceData, ks=(1, 5, 10, 50)) -> dict:
    """The metrics dict of a compiled evaluation program (see ``Programs.eval_fn``).

    Raises:
      NotFinite: the heads' outputs were not finite (diverged params).
    """
    i2t, t2i, images_ok, texts_ok = jax.device_get(eval_fn(params, data))
    if not (images_ok and texts_ok):
        raise NotFinite("the heads' outputs are not finite (NaN or Inf params)")
    return summarise(i2t, t2i, ks)


def run_bundle_eval(eval_fn, params_K, data: DeviceData, ks=(1, 5, 10, 50)) -> list[dict | None]:
    """Each member's metrics from a compiled bundle evaluation (None for a member whose outputs are
    not finite: its params diverged)."""
    i2t_KxN, t2i_KxT, images_ok_K, texts_ok_K = jax.device_get(eval_fn(params_K, data))
    return [summarise(i2t, t2i, ks) if ok_i and ok_t else None
            for i2t, t2i, ok_i, ok_t in zip(i2t_KxN, t2i_KxT, images_ok_K, texts_ok_K)]
