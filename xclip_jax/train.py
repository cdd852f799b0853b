"""Training: the train state, the jitted step, one-program epochs, evaluation and the fit loop.

The same ``fit`` serves ``python -m xclip_jax.train`` and every tuning trial; a trial only passes an
``on_epoch`` callback that reports to Optuna.

The last partial batch of an epoch is dropped (static shapes keep the epoch one compiled
program); the data are reshuffled every epoch, so every row is still seen.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from xclip_jax import losses
from xclip_jax.heads import HeadSpec, init_head_params, make_heads
from xclip_jax.metrics import retrieval_metrics_indexed


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


@dataclasses.dataclass(frozen=True)
class TrainSpec:
    """The static part of training (what a compiled program depends on). Hashable."""

    head: HeadSpec
    image_dim: int
    text_dim: int
    loss_type: str = "softmax_infonce"
    learnable_temp: bool = False
    learnable_bias: bool = True
    sigmoid_normalize: str = "pairs"
    queue_size: int = 4096
    mask_batch_duplicates: bool = True
    max_grad_norm: float = 1.0


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
    rng: jax.Array
    spec: TrainSpec = struct.field(pytree_node=False)


# ----------------------------------------------------------------------------- construction


def _loss_labels(spec: TrainSpec):
    frozen = set()
    if not spec.learnable_temp:
        frozen.add("log_scale")
    if not (spec.loss_type == "sigmoid_infonce" and spec.learnable_bias):
        frozen.add("bias")

    def label(params):
        return {
            "image": jax.tree.map(lambda _: "heads", params["image"]),
            "text": jax.tree.map(lambda _: "heads", params["text"]),
            "loss": {k: ("frozen" if k in frozen else "loss") for k in params["loss"]},
        }

    return label


def make_optimizer(spec: TrainSpec, learning_rate: float = 0.0, weight_decay: float = 0.0):
    """Global-norm clipping, then AdamW on the heads and Adam (no decay) on learnable loss params.

    ``learning_rate`` and ``weight_decay`` live in the optimizer state (optax.inject_hyperparams),
    so trials that differ only in them share one compiled program.
    """

    def inner(learning_rate, weight_decay):
        return optax.multi_transform(
            {
                "heads": optax.adamw(learning_rate, weight_decay=weight_decay),
                "loss": optax.adam(learning_rate),
                "frozen": optax.set_to_zero(),
            },
            _loss_labels(spec),
        )

    return optax.chain(
        optax.clip_by_global_norm(spec.max_grad_norm),
        optax.inject_hyperparams(inner)(learning_rate=learning_rate, weight_decay=weight_decay),
    )


def create_train_state(spec: TrainSpec, *, learning_rate: float, weight_decay: float, temperature: float,
                       seed: int, dropout: float | None = None) -> TrainState:
    """A fresh train state: initialised heads, loss params, optimizer state, empty queue.

    ``dropout`` defaults to ``spec.head.dropout``; it is kept in the state as data.

    Example:
      >>> spec = TrainSpec(HeadSpec("clip", 64, 128), image_dim=32, text_dim=48)
      >>> state = create_train_state(spec, learning_rate=1e-3, weight_decay=1e-4, temperature=0.07, seed=0)
    """
    rate = spec.head.dropout if dropout is None else dropout
    f32 = functools.partial(jnp.asarray, dtype=jnp.float32)
    return _fresh_state(spec, jax.random.PRNGKey(seed), f32(learning_rate), f32(weight_decay), f32(temperature),
                        f32(rate))


@functools.partial(jax.jit, static_argnums=0)
def _fresh_state(spec: TrainSpec, key, learning_rate, weight_decay, temperature, dropout) -> TrainState:
    # One compiled program instead of dozens of eager ones; the hyperparameters are arguments, so
    # trials that differ only in them share it (and its persistent-cache entry).
    k_init, k_run = jax.random.split(key)
    params = init_head_params(spec.head, spec.image_dim, spec.text_dim, k_init)
    bias = losses.SIGLIP_BIAS_INIT if (spec.loss_type == "sigmoid_infonce" and spec.learnable_bias) else 0.0
    params["loss"] = {"log_scale": -jnp.log(temperature), "bias": jnp.asarray(bias, jnp.float32)}
    tx = make_optimizer(spec, learning_rate, weight_decay)
    queue = losses.init_queue(spec.queue_size, spec.head.output_dim) if spec.loss_type == "queue_infonce" else None
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, dropout=dropout, opt_state=tx.init(params),
                      queue=queue, rng=k_run, spec=spec)


# ----------------------------------------------------------------------------- the step


def compute_loss(spec: TrainSpec, loss_params: dict, zi, zt, ids, queue):
    """The configured loss; returns ``(loss, new_queue)`` (``new_queue`` is None without a queue)."""
    temperature = losses.temperature_from_log_scale(loss_params["log_scale"])
    if spec.loss_type == "sigmoid_infonce":
        return losses.sigmoid_infonce(zi, zt, ids, temperature=temperature, bias=loss_params["bias"],
                                      normalize=spec.sigmoid_normalize), queue
    if spec.loss_type == "softmax_infonce":
        return losses.softmax_infonce(zi, zt, ids, temperature=temperature), queue
    if spec.loss_type == "queue_infonce":
        return losses.queue_infonce(zi, zt, ids, queue, temperature=temperature,
                                    mask_batch_duplicates=spec.mask_batch_duplicates)
    raise ValueError(f"unknown loss type {spec.loss_type!r}")


def _forward(spec: TrainSpec, params, batch, rng=None, dropout_rate=0.0):
    image_head, text_head = make_heads(spec.head, spec.image_dim, spec.text_dim)
    if rng is None:
        return (image_head.apply({"params": params["image"]}, batch["image"]),
                text_head.apply({"params": params["text"]}, batch["text"]))
    k_img, k_txt = jax.random.split(rng)
    zi = image_head.apply({"params": params["image"]}, batch["image"], train=True, dropout_rate=dropout_rate,
                          rngs={"dropout": k_img})
    zt = text_head.apply({"params": params["text"]}, batch["text"], train=True, dropout_rate=dropout_rate,
                         rngs={"dropout": k_txt})
    return zi, zt


def _train_step(state: TrainState, batch: dict):
    spec = state.spec
    rng = jax.random.fold_in(state.rng, state.step)

    def loss_fn(params):
        zi, zt = _forward(spec, params, batch, rng, state.dropout)
        return compute_loss(spec, params["loss"], zi, zt, batch["ids"], state.queue)

    (loss, queue), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    tx = make_optimizer(spec)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {
        "loss": loss,
        "grad_norm": optax.tree.norm(grads),
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


@functools.partial(jax.jit, donate_argnums=0, static_argnames="batch_size")
def run_epoch(state: TrainState, data: DeviceData, batch_size: int):
    """One epoch as one compiled program: on-device shuffle, then a scan of ``train_step``.

    Returns the new state and the epoch's metrics (mean loss and grad norm, final temperature,
    whether any step's loss was not finite), still on the device.
    """
    steps = data.rows // batch_size
    key = jax.random.fold_in(jax.random.fold_in(state.rng, 1), state.step)
    perm_SxB = jax.random.permutation(key, data.rows)[: steps * batch_size].reshape(steps, batch_size)

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


@functools.partial(jax.jit, static_argnames="batch_size")
def eval_loss(state: TrainState, data: DeviceData, batch_size: int):
    """Mean loss over the set's full batches, in order, without dropout; never touches the queue."""
    steps = max(data.rows // batch_size, 1)
    batch_size = min(batch_size, data.rows)
    idx_SxB = jnp.arange(steps * batch_size).reshape(steps, batch_size)

    def body(_, idx_B):
        batch = _gather(data, idx_B)
        zi, zt = _forward(state.spec, state.params, batch)
        loss, _ = compute_loss(state.spec, state.params["loss"], zi, zt, batch["ids"], state.queue)
        return None, loss

    _, per_step = jax.lax.scan(body, None, idx_SxB)
    return jnp.mean(per_step)


@functools.partial(jax.jit, static_argnames=("spec", "side"))
def _encode_chunk(spec: TrainSpec, side: str, params, x):
    image_head, text_head = make_heads(spec.head, spec.image_dim, spec.text_dim)
    head = image_head if side == "image" else text_head
    return head.apply({"params": params}, x, train=False)


def encode(spec: TrainSpec, side: str, params, x, chunk_size: int = 8192) -> jax.Array:
    """Project ``x`` with the ``side`` ("image"/"text") head, in fixed-size chunks (one compile)."""
    n = x.shape[0]
    chunk = min(chunk_size, n)
    outs = []
    for start in range(0, n, chunk):
        part = x[start:start + chunk]
        pad = chunk - part.shape[0]
        if pad:
            part = jnp.pad(part, ((0, pad), (0, 0)))
        out = _encode_chunk(spec, side, params, part)
        outs.append(out[: chunk - pad] if pad else out)
    return jnp.concatenate(outs) if len(outs) > 1 else outs[0]


def project(params, spec: TrainSpec, data: DeviceData) -> tuple[jax.Array, jax.Array]:
    """The heads' outputs for a device-resident set: (unique images [N, D], captions [T, D])."""
    return (encode(spec, "image", params["image"], data.image_NxDi),
            encode(spec, "text", params["text"], data.text_RxDt))


def evaluate(state_or_params, spec: TrainSpec, data: DeviceData, ks=(1, 5, 10, 50)) -> dict:
    """Full retrieval metrics of the heads on a device-resident set (images de-duplicated)."""
    params = state_or_params.params if isinstance(state_or_params, TrainState) else state_or_params
    zi, zt = project(params, spec, data)
    return retrieval_metrics_indexed(zi, zt, data.row_image_R, ks=ks)


# A similarity matrix larger than this is not written (the features are, and it is one product away).
MAX_SIMILARITY_BYTES = 2 << 30


def save_features(zi_NxD, zt_TxD, row_image_T, out_dir, split: str, announce=print) -> list:
    """The projected features of a set and their cosine similarity matrix, as .npy files in ``out_dir``:
    ``{split}_image_features`` [N unique images, D], ``{split}_text_features`` [T captions, D],
    ``{split}_row_image`` [T] (the image of each caption) and ``{split}_similarity`` [N, T]."""
    from pathlib import Path

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, array in (("image_features", zi_NxD), ("text_features", zt_TxD), ("row_image", row_image_T)):
        written.append(out_dir / f"{split}_{name}.npy")
        np.save(written[-1], np.asarray(array))
    n, t = zi_NxD.shape[0], zt_TxD.shape[0]
    if 4 * n * t > MAX_SIMILARITY_BYTES:
        if announce:
            announce(f"features: {split}_similarity.npy skipped ({n:,} x {t:,} floats is over "
                     f"{MAX_SIMILARITY_BYTES >> 30} GiB); it is image_features @ text_features.T")
        return written
    written.append(out_dir / f"{split}_similarity.npy")
    sim = np.lib.format.open_memmap(written[-1], mode="w+", dtype=np.float32, shape=(n, t))
    chunk = max(1, (64 << 20) // (4 * t))
    for start in range(0, n, chunk):
        sim[start:start + chunk] = np.asarray(_similarity_block(zi_NxD[start:start + chunk], zt_TxD))
    sim.flush()
    del sim
    return written


@jax.jit
def _similarity_block(zi_CxD, zt_TxD):
    return jnp.matmul(zi_CxD, zt_TxD.T, precision=jax.lax.Precision.HIGHEST)


# ----------------------------------------------------------------------------- the fit loop


@dataclasses.dataclass
class FitResult:
    best_params: Any
    best_epoch: int
    best_r1: float
    history: list
    state: TrainState
    stopped: str  # "completed", "early_stopping" or what the callback said
    compile_seconds: float = 0.0


def fit(state: TrainState, train_data: DeviceData, val_data: DeviceData, *, batch_size: int, num_epochs: int,
        patience: int, ks=(1, 5, 10, 50), on_epoch: Callable | None = None, start_epoch: int = 0,
        history: list | None = None, best: tuple | None = None, progress: bool = True,
        with_val_loss: bool = True) -> FitResult:
    """Train with early stopping on validation R@1 (the mean of i2t and t2i R@1).

    Args:
      state: the initial (or resumed) train state; it is donated. train_data / val_data: sets on
        the device. batch_size, num_epochs, patience: as in the config.
      on_epoch: ``on_epoch(epoch, record, state, improved) -> str | None``, called after every
        epoch with that epoch's record; returning a string stops training with that reason
        (a tuning trial prunes this way). Checkpointing also hangs off this callback.
      start_epoch, history, best: where a resumed run left off (``best`` = (params, epoch, r1)).
      with_val_loss: also compute the validation loss each epoch (one more compiled program;
        tuning trials skip it, they prune on R@1).

    Returns:
      A FitResult with the best epoch's params (a copy, safe from donation) and the history.

    Raises:
      TrainingDiverged: a training loss was NaN or infinite.
    """
    from tqdm.auto import tqdm

    history = [] if history is None else history  # appended in place: callbacks may hold it
    best_params, best_epoch, best_r1 = best if best else (None, -1, -math.inf)
    stopped = "completed"
    t0 = time.perf_counter()
    # Compiled ahead of time: one program for every epoch, and its compile time measured apart.
    epoch_fn = run_epoch.lower(state, train_data, batch_size=batch_size).compile()
    compile_seconds = time.perf_counter() - t0
    bar = tqdm(range(start_epoch, num_epochs), desc="epochs", disable=not progress, unit="epoch",
               initial=start_epoch, total=num_epochs)
    for epoch in bar:
        t0 = time.perf_counter()
        state, train_metrics = epoch_fn(state, train_data)
        train_metrics = jax.device_get(train_metrics)
        train_time = time.perf_counter() - t0
        if not train_metrics["finite"]:
            raise TrainingDiverged(f"training loss is not finite at epoch {epoch} (lower learning_rate or temperature)")
        val_metrics = evaluate(state, state.spec, val_data, ks)
        val_loss = float(eval_loss(state, val_data, batch_size)) if with_val_loss else None
        record = {
            "epoch": epoch,
            "train_loss": float(train_metrics["loss"]),
            "val_loss": val_loss,
            "val_r1": val_metrics["r1"],
            "val_metrics": val_metrics,
            "grad_norm": float(train_metrics["grad_norm"]),
            "temperature": float(train_metrics["temperature"]),
            "epoch_time": time.perf_counter() - t0,
            "train_time": train_time,
        }
        history.append(record)
        improved = record["val_r1"] > best_r1
        if improved:
            best_r1, best_epoch = record["val_r1"], epoch
            best_params = jax.tree.map(jnp.copy, state.params)
        bar.set_postfix(loss=f"{record['train_loss']:.4f}", val_r1=f"{record['val_r1']:.4f}",
                        best=f"{best_r1:.4f}")
        if on_epoch is not None:
            reason = on_epoch(epoch, record, state, improved)
            if reason:
                stopped = reason
                break
        if epoch - best_epoch >= patience:
            stopped = "early_stopping"
            break
    bar.close()
    return FitResult(best_params, best_epoch, best_r1, history, state, stopped, compile_seconds)


# ----------------------------------------------------------------------------- from a config


def spec_from_config(cfg, image_dim: int, text_dim: int) -> TrainSpec:
    """The static TrainSpec of a typed TrainConfig for the given input dims."""
    m, loss, tr = cfg.model, cfg.loss, cfg.training
    # dropout=0 here: the rate travels in the train state (see create_train_state), not the program.
    head = HeadSpec(head_type=m.type, output_dim=m.output_dim, hidden_dim=m.hidden_dim, dropout=0.0,
                    num_heads=m.num_heads, num_layers=m.num_layers, dtype=tr.dtype)
    return TrainSpec(head=head, image_dim=image_dim, text_dim=text_dim, loss_type=loss.type,
                     learnable_temp=loss.learnable_temp, learnable_bias=loss.learnable_bias,
                     sigmoid_normalize=loss.sigmoid_normalize, queue_size=loss.queue_size,
                     mask_batch_duplicates=loss.mask_batch_duplicates, max_grad_norm=tr.max_grad_norm)


def load_sets(cfg, splits=("train", "val", "test"), announce=print) -> dict:
    """The config's embedding sets (host ``EmbeddingSet``s), validated; missing optional test → absent.

    ``announce`` gets one line per set saying which files it was read from and its size (None: quiet).
    A validation or test set that shares images with the training set gets a warning.
    """
    from xclip_jax import data
    from xclip_jax.errors import UserError

    if cfg.data.synthetic is not None:
        s = cfg.data.synthetic
        kwargs = {} if s.noise is None else {"noise": s.noise}
        sets = data.synthetic_splits(n_images=s.images, captions_per_image=s.captions, image_dim=s.image_dim,
                                     text_dim=s.text_dim, val_images=s.val_images, test_images=s.test_images,
                                     seed=s.seed, **kwargs)
        out = {k: v for k, v in sets.items() if k in splits}
    else:
        out = {}
        for split in splits:
            paths = cfg.data.paths(split, cfg.base_data_dir)
            if paths is None:
                continue
            out[split] = data.load_embedding_set(*paths, name=split)
    ref_name, ref = next(iter(out.items()))
    for split, s in out.items():
        if (s.image_dim, s.text_dim) != (ref.image_dim, ref.text_dim):
            raise UserError(f"{split} set has dims image {s.image_dim}/text {s.text_dim} but {ref_name} has "
                            f"{ref.image_dim}/{ref.text_dim}; use embeddings from the same encoders")
    for s in out.values():
        if announce:
            announce(data.source_line(s))
        if "train" in out and s is not out["train"]:
            data.check_disjoint(out["train"], s)
    return out


def check_fits(cfg, sets: dict) -> None:
    """Config-vs-data checks that need the data: batch size, attention heads."""
    from xclip_jax.errors import UserError

    train = sets["train"]
    if cfg.training.batch_size > train.rows:
        raise UserError(f"training.batch_size={cfg.training.batch_size} is larger than the training set "
                        f"({train.rows} rows); lower batch_size")
    if cfg.loss.type == "queue_infonce" and cfg.loss.queue_size < cfg.training.batch_size:
        from xclip_jax.errors import warn

        warn(f"loss.queue_size {cfg.loss.queue_size} is smaller than training.batch_size {cfg.training.batch_size}: "
             "the queue holds less than one batch of negatives; raise queue_size")
    if cfg.model.type == "attention":
        for dim in (train.image_dim, train.text_dim):
            if dim % cfg.model.num_heads:
                raise UserError(f"model.num_heads={cfg.model.num_heads} does not divide input dim {dim}; "
                                "choose num_heads that divides both input dims")


def initial_state(cfg, image_dim: int, text_dim: int) -> TrainState:
    """A fresh train state for a typed config."""
    return create_train_state(spec_from_config(cfg, image_dim, text_dim),
                              learning_rate=cfg.training.learning_rate, weight_decay=cfg.training.weight_decay,
                              temperature=cfg.loss.temperature, seed=cfg.seed, dropout=cfg.model.dropout)


def heads_metadata(cfg, sets, epoch: int, val_r1: float) -> dict:
    import xclip_jax

    train = sets["train"]
    return {"epoch": int(epoch), "val_r1": float(val_r1), "image_dim": int(train.image_dim),
            "text_dim": int(train.text_dim), "version": xclip_jax.__version__}


# Keys that may change between an interrupted run and its --resume: they do not change what the
# epochs already trained computed (where the run stops, what the final evaluation writes, where).
SAFE_ON_RESUME = ("training.num_epochs", "training.patience", "evaluation.", "device", "output_dir",
                  "experiment_name")


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def check_resumable(saved: dict | None, current: dict) -> None:
    """Refuse to resume with a changed config, except keys that are safe to change (applied, and
    said in one line each)."""
    from xclip_jax.errors import UserError

    if saved is None:  # a resume state from before configs were recorded
        return
    old, new = _flat(saved), _flat(current)
    changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
    unsafe = [k for k in changed if not k.startswith(SAFE_ON_RESUME)]
    if unsafe:
        said = ", ".join(f"{k} ({old.get(k)!r} -> {new.get(k)!r})" for k in unsafe[:4])
        more = f" and {len(unsafe) - 4} more" if len(unsafe) > 4 else ""
        raise UserError(f"cannot --resume: the config changed {said}{more} since the interrupted run; revert "
                        "them, or train anew without --resume (or under another experiment_name)")
    for k in changed:
        print(f"resume: {k} {old.get(k)!r} -> {new.get(k)!r} (applied)")


def run_training(cfg, out_dir, *, resume: bool = False, progress: bool = True, on_epoch: Callable | None = None,
                 sets: dict | None = None, checkpoint_dir=None, write_reports: bool = True) -> dict:
    """Train one config end to end: data → state → fit → best checkpoint → reports.

    Both ``python -m xclip_jax.train`` and each tuning trial run this; a trial passes ``on_epoch``
    (report and prune) and its own ``checkpoint_dir``.

    Args:
      cfg: a typed TrainConfig. out_dir: where history, curves and metrics go.
      resume: continue from ``out_dir/resume`` if present (same final result as an uninterrupted run).
      on_epoch: extra per-epoch callback (see ``fit``). sets: preloaded host sets (else loaded).
      checkpoint_dir: where the best heads go (default ``out_dir/checkpoint``).
      write_reports: the training CLI's outputs (curves, test metrics, a resumable state and the
        best heads after every improvement); without it (a tuning trial) the best heads are
        written once, at the end.

    Returns:
      A summary dict: best_epoch, best_val_r1, stopped, epochs, data_ready_time (epoch seconds when
      the data were on the device), compile_seconds, train_seconds, metrics (test/val, if written).
    """
    import json
    from pathlib import Path

    from xclip_jax import checkpoint
    from xclip_jax.config import to_dict
    from xclip_jax.errors import warn
    from xclip_jax.figures import plot_curves

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt_dir = Path(checkpoint_dir) if checkpoint_dir else out_dir / "checkpoint"
    sets = sets if sets is not None else load_sets(cfg)
    check_fits(cfg, sets)
    train_data, val_data = to_device(sets["train"]), to_device(sets["val"])
    state = initial_state(cfg, sets["train"].image_dim, sets["train"].text_dim)
    cfg_dict = to_dict(cfg)
    ks = tuple(cfg.evaluation.top_k)
    jax.block_until_ready(train_data)
    data_ready = time.time()

    start_epoch, history, best = 0, [], None
    resume_dir = out_dir / "resume"
    if resume:
        saved = checkpoint.read_state_extra(resume_dir)
        if saved is None:
            warn(f"--resume: no interrupted run in {resume_dir}; training from epoch 0")
        else:
            check_resumable(saved.get("config"), cfg_dict)
        restored = checkpoint.restore_state(resume_dir, state) if saved is not None else None
        if restored is not None:
            state, extra = restored
            state = jax.device_put(state)
            history = extra["history"]
            start_epoch = extra["epoch"] + 1
            best_params, _ = checkpoint.load_raw(ckpt_dir)
            best = (jax.device_put(best_params), extra["best_epoch"], extra["best_r1"])

    best_so_far = {"epoch": best[1] if best else -1, "r1": best[2] if best else -math.inf}

    def callback(epoch, record, state, improved):
        # `history` is fit's own list (passed in below), so it already holds this epoch's record.
        if improved:
            best_so_far.update(epoch=epoch, r1=record["val_r1"])
        if write_reports:
            # A resumable run keeps its best heads and its state on disk after every epoch.
            if improved:
                save_best(state.params, epoch, record["val_r1"])
            checkpoint.save_state(resume_dir, state, {"epoch": epoch, "history": history,
                                                      "best_epoch": best_so_far["epoch"],
                                                      "best_r1": best_so_far["r1"], "config": cfg_dict},
                                  step=epoch)
        return on_epoch(epoch, record, state, improved) if on_epoch else None

    def save_best(params, epoch, r1):
        checkpoint.save_heads(ckpt_dir, params, cfg_dict, heads_metadata(cfg, sets, epoch, r1), step=epoch)

    result = fit(state, train_data, val_data, batch_size=cfg.training.batch_size, num_epochs=cfg.training.num_epochs,
                 patience=cfg.training.patience, ks=ks, on_epoch=callback, start_epoch=start_epoch,
                 history=history, best=best, progress=progress, with_val_loss=write_reports)
    if not write_reports and result.best_params is not None:
        # A tuning trial writes one checkpoint, the best epoch's, when it ends (pruned ones too).
        save_best(result.best_params, result.best_epoch, result.best_r1)
    (out_dir / "training_history.json").write_text(json.dumps(history, indent=2))
    summary = {"best_epoch": result.best_epoch, "best_val_r1": result.best_r1, "stopped": result.stopped,
               "epochs": len(history), "data_ready_time": data_ready, "compile_seconds": result.compile_seconds,
               "train_seconds": sum(h["epoch_time"] for h in history)}
    if write_reports and result.best_params is not None:
        plot_curves(history, result.best_epoch, out_dir / "training_curves.png")
        metrics = {"best_epoch": result.best_epoch, "best_val_r1": result.best_r1}
        spec = result.state.spec
        shown = "test" if "test" in sets else "val"  # the set the features and pictures show
        for split in ("test", "val"):
            if split not in sets:
                continue
            split_data = to_device(sets[split])
            zi, zt = project(result.best_params, spec, split_data)
            metrics[split] = retrieval_metrics_indexed(zi, zt, split_data.row_image_R, ks=ks)
            if split != shown:
                continue
            ev = cfg.evaluation
            if ev.save_features:
                save_features(zi, zt, split_data.row_image_R, out_dir / "features", split)
            if ev.visualization_samples:
                from xclip_jax.figures import embedding_figures

                embedding_figures(zi, zt, np.asarray(split_data.row_image_R), samples=ev.visualization_samples,
                                  perplexity=ev.tsne_perplexity, out_dir=out_dir, prefix=split, seed=cfg.seed)
        (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
        summary["metrics"] = metrics
    return summary


INTERRUPTED = ("interrupted: the last finished epoch is saved; run the same command with --resume to continue "
               "from there")


def select_device(device: str):
    """The JAX device a config's ``device`` names (None: JAX's default). ``cuda``/``gpu`` on a machine
    where JAX sees no GPU warns in one line and trains on the CPU, as the original fell back."""
    from xclip_jax.errors import UserError, warn

    if device == "auto":
        return None
    kind, _, index = device.partition(":")
    platform = "cpu" if kind == "cpu" else "gpu"
    try:
        devices = jax.devices(platform)
    except RuntimeError:
        warn(f"device: {device}, but JAX sees no GPU (install with pip install '.[cuda12]'); training on the CPU")
        return jax.devices("cpu")[0]
    if int(index or 0) >= len(devices):
        raise UserError(f"device: {device}, but JAX sees {len(devices)} {platform} device(s); "
                        f"use {kind}:0 to {kind}:{len(devices) - 1}")
    return devices[int(index or 0)]


def main(argv=None):
    """``python -m xclip_jax.train CONFIG [--resume] [--output-dir DIR] [--no-progress]``."""
    import argparse
    from pathlib import Path

    from xclip_jax.config import load_train_config
    from xclip_jax.errors import UserError
    from xclip_jax.metrics import format_table

    parser = argparse.ArgumentParser(prog="python -m xclip_jax.train", description=main.__doc__)
    parser.add_argument("config", help="training YAML (the original's keys are accepted)")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted run from its last epoch")
    parser.add_argument("--output-dir", help="override output_dir")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    args = parser.parse_args(argv)
    cfg = load_train_config(args.config)
    if args.output_dir:
        cfg = dataclasses.replace(cfg, output_dir=args.output_dir)
    out_dir = Path(cfg.output_dir) / cfg.experiment_name
    try:
        with jax.default_device(select_device(cfg.device)):
            summary = run_training(cfg, out_dir, resume=args.resume, progress=not args.no_progress)
    except TrainingDiverged as e:
        raise UserError(str(e)) from None
    print(f"best epoch {summary['best_epoch']} (val R@1 {summary['best_val_r1']:.4f}, {summary['stopped']})")
    for split in ("test", "val"):
        if split in summary.get("metrics", {}):
            print(f"\n{split}:\n{format_table(summary['metrics'][split])}")
    print(f"\noutputs in {out_dir}")
    return 0


if __name__ == "__main__":
    from xclip_jax.errors import cli

    raise SystemExit(cli(main, interrupted=INTERRUPTED)())
