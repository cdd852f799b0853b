"""The train state and its transitions: the optimizer, the jitted ``train_step``, the one-program epoch
of a bundle of members, and the validation loss.

One path for every run: a bundle of K members (a single trial is K = 1), each leaf of the state
with a leading member axis, one program for all of them keyed on the static ``ProgramKey`` the
state carries; every member's values are its ``HParams`` (data). ``train_step`` (one member, no
member axis) is the public step a user imports; the epoch program maps it over the members.

The last partial batch of an epoch is dropped (static shapes keep the epoch one compiled
program); the data are reshuffled every epoch, so every row is still seen.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from xclip_jax import losses
from xclip_jax.model import HParams, apply_heads, count, hparams, init_heads, member, stack
from xclip_jax.padding import EXACT, Buckets, program_key
from xclip_jax.spec import ProgramKey, RunSpec


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""

    @classmethod
    def at(cls, stopped: str) -> TrainingDiverged:
        """The error of a fit that ended ``stopped`` = "diverged at epoch N"."""
        return cls(f"training loss is not finite ({stopped}; lower learning_rate or temperature)")


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
    """Everything that changes during training, as one pytree (jitted, donated, checkpointed): one
    member's, or a bundle's with a leading member axis on every leaf."""

    step: jax.Array
    params: dict  # {"image", "text", "loss": {"log_scale", "bias"}}
    opt_state: Any
    queue: losses.QueueState | None
    rng: dict  # {"dropout", "shuffle"}: independent streams, each folded with the step
    hp: HParams
    key: ProgramKey = struct.field(pytree_node=False)


# ----------------------------------------------------------------------------- construction


def make_optimizer(hp: HParams):
    """AdamW on the heads after clipping *their* gradients' global norm (``max_grad_norm``), as the
    original clips the heads' parameters only; Adam (no decay, no clip) on the loss params, whose
    updates are dropped for those the trial does not learn (``frozen_loss_updates``).

    Every value comes from ``hp`` (arrays): trials that differ in them share one program, and the
    optimizer's state (moments, counts) does not depend on them.
    """
    def label(params):
        return {side: jax.tree.map(lambda _, side=side: "heads" if side != "loss" else "loss", sub)
                for side, sub in params.items()}

    heads = optax.chain(optax.clip_by_global_norm(hp.max_grad_norm),
                        optax.adamw(hp.learning_rate, weight_decay=hp.weight_decay))
    return optax.multi_transform({"heads": heads, "loss": optax.adam(hp.learning_rate)}, label)


def frozen_loss_updates(hp: HParams, updates: dict) -> dict:
    """The loss params' updates with those of a frozen τ or bias zero (a `where`: a frozen param's
    Adam moments may hold anything, even NaN, and never reach it)."""
    learn = {"log_scale": hp.learnable_temp, "bias": hp.learnable_bias}
    return {**updates, "loss": {k: jnp.where(learn[k], u, 0.0) for k, u in updates["loss"].items()}}


def _init_member(key: ProgramKey, hp: HParams):
    # Independent streams for the init, each step's dropout and each epoch's shuffle: two derived from
    # one key by fold_in and split collide (partitionable threefry: split(k)[i] == fold_in(k, i)).
    k_init, k_dropout, k_shuffle = jax.random.split(jax.random.PRNGKey(hp.seed), 3)
    params = init_heads(key, hp, k_init)
    params["loss"] = {"log_scale": losses.clamp_log_scale(-jnp.log(hp.temperature)),
                      "bias": jnp.where(hp.learnable_bias, losses.SIGLIP_BIAS_INIT, 0.0).astype(jnp.float32)}
    return params, make_optimizer(hp).init(params), {"dropout": k_dropout, "shuffle": k_shuffle}


def for_members(fn, mapped: tuple[bool, ...]):
    """``fn`` over the leading member axis of the arguments flagged in ``mapped`` (a ``vmap``; one
    member runs ``fn`` itself, its axis dropped and put back: its values are then unbatched, so a
    ``cond`` on them, as dropout's on its rate, branches instead of computing both sides)."""
    def run(*args):
        size = count(next(a for a, m in zip(args, mapped) if m))
        if size > 1:
            return jax.vmap(fn, in_axes=tuple(0 if m else None for m in mapped))(*args)
        squeezed = [jax.tree.map(lambda x: x[0], a) if m else a for a, m in zip(args, mapped)]
        return jax.tree.map(lambda x: x[None], fn(*squeezed))

    return run


_init_program = jax.jit(lambda key, hp_K: for_members(lambda hp: _init_member(key, hp), (True,))(hp_K),
                        static_argnums=0)


def fresh_states(key: ProgramKey, hp_K: HParams, init_fn=None) -> TrainState:
    """The fresh train states of a bundle of members of one program (their ``HParams`` stacked):
    initialised heads, loss params, optimizer state, empty queue. ``init_fn(hp_K)`` is the compiled
    initialisation (``Programs.init_fn``; default: jitted here)."""
    size = count(hp_K)
    params, opt_state, rng = (init_fn or (lambda hp: _init_program(key.init_key(), hp)))(hp_K)
    queue = (losses.QueueState(*jax.device_put(losses.empty_queue(key.queue_size, key.output_dim, size)))
             if key.loss == "queue_infonce" else None)
    return TrainState(step=jax.device_put(np.zeros(size, np.int32)), params=params, opt_state=opt_state,
                      queue=queue, rng=rng, hp=jax.device_put(hp_K), key=key)


def create_train_state(spec: RunSpec, seed: int, buckets: Buckets = EXACT) -> TrainState:
    """A fresh train state of one trial (no member axis), its widths padded to ``buckets``.

    Example:
      >>> spec = RunSpec(HeadSpec("clip", 64, 128), LossSpec(), TrainingSpec(batch_size=256), 32, 48)
      >>> state = create_train_state(spec, seed=0)
    """
    return member(fresh_states(program_key(spec, buckets), stack([hparams(spec, seed)])), 0)


# ----------------------------------------------------------------------------- the step


def compute_loss(key: ProgramKey, hp: HParams, loss_params: dict, zi, zt, ids, queue):
    """The member's loss; returns ``(loss, new_queue)`` (``new_queue`` is None without a queue)."""
    temperature = losses.temperature_from_log_scale(loss_params["log_scale"])
    if key.loss == "sigmoid_infonce":
        return losses.sigmoid_infonce(zi, zt, ids, temperature=temperature, bias=loss_params["bias"],
                                      normalize=hp.sigmoid_per_batch), queue
    if key.loss == "softmax_infonce":
        return losses.softmax_infonce(zi, zt, ids, temperature=temperature), queue
    return losses.queue_infonce(zi, zt, ids, queue, temperature=temperature,
                                mask_batch_duplicates=hp.mask_batch_duplicates, size=hp.queue_size)


def dropout_key(state: TrainState) -> jax.Array:
    """The key of this step's dropout (split once more: image head, text head)."""
    return jax.random.fold_in(state.rng["dropout"], state.step)


def shuffle_key(state: TrainState) -> jax.Array:
    """The key of the shuffle of the epoch that starts at this step."""
    return jax.random.fold_in(state.rng["shuffle"], state.step)


def _train_step(state: TrainState, batch: dict):
    key, hp = state.key, state.hp

    def loss_fn(params):
        zi, zt = apply_heads(key, hp, params, batch["image"], batch["text"], rng=dropout_key(state))
        return compute_loss(key, hp, params["loss"], zi, zt, batch["ids"], state.queue)

    (loss, queue), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = make_optimizer(hp).update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, frozen_loss_updates(hp, updates))
    params["loss"] = {**params["loss"], "log_scale": losses.clamp_log_scale(params["loss"]["log_scale"])}
    metrics = {
        "loss": loss,
        "grad_norm": optax.tree.norm({"image": grads["image"], "text": grads["text"]}),  # what is clipped
        "temperature": losses.temperature_from_log_scale(params["loss"]["log_scale"]),
    }
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state, queue=queue), metrics


train_step = jax.jit(_train_step, donate_argnums=0)
train_step.__doc__ = """One optimisation step of one trial: ``train_step(state, batch) -> (state, metrics)``.

``state`` has no member axis (``create_train_state``); ``batch`` is ``{"image": [B, Di], "text":
[B, Dt], "ids": [B] int}``; the state is donated.
"""


def _gather(data: DeviceData, idx_B):
    image_idx = data.row_image_R[idx_B]
    return {"image": data.image_NxDi[image_idx], "text": data.text_RxDt[idx_B], "ids": image_idx}


def _epoch(state: TrainState, data: DeviceData, active):
    batch_size = state.key.batch_size
    steps = data.rows // batch_size
    # One sort of random 32-bit keys (ties, ~rows²/2³³ pairs, keep their order): one sorting round
    # where jax.random.permutation makes several, each compiled and run.
    perm = jnp.argsort(jax.random.bits(shuffle_key(state), (data.rows,), jnp.uint32))
    perm_SxB = perm[: steps * batch_size].reshape(steps, batch_size)

    def body(st, idx_B):
        # An inactive member keeps its state, step by step: a select the update fuses into, where one
        # after the scan would keep the whole old state alive beside the new (a state's copy).
        new, metrics = _train_step(st, _gather(data, idx_B))
        if active is None:  # a bundle of one runs only while its member is active
            return new, metrics
        return jax.tree.map(lambda n, o: jnp.where(active, n, o), new, st), metrics

    state, per_step = jax.lax.scan(body, state, perm_SxB)
    metrics = {
        "loss": jnp.mean(per_step["loss"]),
        "grad_norm": jnp.mean(per_step["grad_norm"]),
        "temperature": per_step["temperature"][-1],
        "finite": jnp.all(jnp.isfinite(per_step["loss"])),
    }
    return state, metrics


def _epochs(states: TrainState, data: DeviceData, active_K):
    if count(states) == 1:
        return for_members(lambda st, d: _epoch(st, d, None), (True, False))(states, data)
    return for_members(_epoch, (True, False, True))(states, data, active_K)


run_epochs = jax.jit(_epochs, donate_argnums=0)
run_epochs.__doc__ = """One epoch of every member of a bundle as one compiled program:
``run_epochs(states, data, active_K) -> (states, metrics)``.

Each member shuffles with its own key, then scans ``train_step`` over the program's batch size with
its own values, dropout, optimizer state and queue; a member whose ``active_K`` is False is left
exactly as it was (stopped, pruned or diverged; a bundle of one is run only while its member is
active, and does not read the flag). Returns the new states (donated in) and per-member
metrics ``[K]`` (mean loss and grad norm, final temperature, whether every step's loss was finite),
still on the device.
"""


@jax.jit
def eval_loss(state: TrainState, data: DeviceData):
    """One member's mean loss over the set's full batches, in order, without dropout, and without the
    queue: its training texts' ids mean nothing against validation ids. A queue loss scores its
    batch alone."""
    key, hp = state.key, state.hp
    queue = None if state.queue is None else losses.init_queue(1, key.output_dim)
    steps = max(data.rows // key.batch_size, 1)
    batch_size = min(key.batch_size, data.rows)
    idx_SxB = jnp.arange(steps * batch_size).reshape(steps, batch_size)

    def body(_, idx_B):
        batch = _gather(data, idx_B)
        zi, zt = apply_heads(key, hp, state.params, batch["image"], batch["text"])
        loss, _ = compute_loss(key, hp.replace(queue_size=jnp.int32(1)), state.params["loss"], zi, zt, batch["ids"],
                               queue)
        return None, loss

    _, per_step = jax.lax.scan(body, None, idx_SxB)
    return jnp.mean(per_step)
