"""A trial's model: its hyperparameters as one pytree of data (:class:`HParams`), and its pair of heads
built for a program's static widths and run at the trial's own.

A train state carries an ``HParams`` beside its params. In a bundle (``batch_trials``, and a single
trial is a bundle of one) every leaf has a leading member axis, so each member has its own values
under one compiled program. Helpers here move between a member's padded params and its real ones:
a checkpoint is never padded.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from xclip_jax.heads import Head, Widths, build_head
from xclip_jax.spec import ProgramKey, RunSpec, key_seed


@struct.dataclass
class HParams:
    """Everything about one trial that is data, not a program's shape (a leading member axis in a
    bundle). ``temperature`` is τ at the start (the loss params then hold log(1/τ)); the widths are
    the trial's real ones, at most the program's."""

    seed: jax.Array  # uint32
    learning_rate: jax.Array
    weight_decay: jax.Array
    max_grad_norm: jax.Array
    temperature: jax.Array
    dropout: jax.Array
    learnable_temp: jax.Array  # bool
    learnable_bias: jax.Array  # bool: a sigmoid loss that learns its bias
    sigmoid_per_batch: jax.Array  # bool: sigmoid_normalize "batch"
    mask_batch_duplicates: jax.Array  # bool
    output_dim: jax.Array  # int32, and the rest
    hidden_image: jax.Array
    hidden_text: jax.Array
    num_layers: jax.Array
    num_heads: jax.Array
    queue_size: jax.Array

    def widths(self, side: str) -> Widths:
        """The widths of the ``side`` ("image"/"text") head."""
        return Widths(self.output_dim, self.hidden_image if side == "image" else self.hidden_text, self.num_layers,
                      self.num_heads)


def hparams(spec: RunSpec, seed: int) -> HParams:
    """One trial's values as host scalars (numpy: placing them on the device compiles nothing)."""
    head, loss, training = spec.head, spec.loss, spec.training
    f, i, b = np.float32, np.int32, np.bool_
    return HParams(seed=np.uint32(key_seed(seed)), learning_rate=f(training.learning_rate),
                   weight_decay=f(training.weight_decay), max_grad_norm=f(training.max_grad_norm),
                   temperature=f(loss.temperature), dropout=f(head.dropout), learnable_temp=b(loss.learnable_temp),
                   learnable_bias=b(loss.type == "sigmoid_infonce" and loss.learnable_bias),
                   sigmoid_per_batch=b(loss.sigmoid_normalize == "batch"),
                   mask_batch_duplicates=b(loss.mask_batch_duplicates), output_dim=i(head.output_dim),
                   hidden_image=i(head.hidden_width(spec.image_dim)), hidden_text=i(head.hidden_width(spec.text_dim)),
                   num_layers=i(head.num_layers), num_heads=i(head.num_heads), queue_size=i(loss.queue_size))


def stack(trees: list):
    """Trees of one structure stacked on a leading member axis (numpy)."""
    return jax.tree.map(lambda *xs: np.stack(xs), *trees)


def member(tree, i: int):
    """Member ``i`` of a stacked tree."""
    return jax.tree.map(lambda x: x[i], tree)


def count(tree) -> int:
    """The members of a stacked tree."""
    return jax.tree.leaves(tree)[0].shape[0]


# ----------------------------------------------------------------------------- the pair of heads


def make_pair(key: ProgramKey) -> tuple[Head, Head]:
    """The image and text heads at the key's static widths, matmuls in its dtype."""
    return tuple(build_head(key.head, output_dim=key.output_dim, hidden_dim=hidden, num_layers=key.num_layers,
                            num_heads=max(key.num_heads, 1), dtype=key.dtype) for hidden in key.hidden)


def init_heads(program: ProgramKey, hp: HParams, rng: jax.Array) -> dict:
    """Fresh parameters ``{"image": …, "text": …}`` of one member: drawn at its real widths, zero in
    the padding around them."""
    k_img, k_txt = jax.random.split(rng)
    params = {}
    dims = (program.image_dim, program.text_dim)
    for side, head, k, dim in zip(("image", "text"), make_pair(program), (k_img, k_txt), dims):
        params[side] = head.init(k, jnp.zeros((1, dim), jnp.float32), hp.widths(side))["params"]
    return params


def apply_heads(program: ProgramKey, hp: HParams, params: dict, image, text, *, rng=None):
    """Both heads' outputs (L2-normalised, zero past the real output width); with ``rng``, in training
    mode (dropout at the member's rate, one key per head)."""
    out = []
    keys = jax.random.split(rng) if rng is not None else (None, None)
    for side, head, x, k in zip(("image", "text"), make_pair(program), (image, text), keys):
        train = {"train": True, "dropout_rate": hp.dropout, "rngs": {"dropout": k}} if k is not None else {}
        out.append(head.apply({"params": params[side]}, x, hp.widths(side), **train))
    return tuple(out)


# ----------------------------------------------------------------------------- padded and real


def real_key(key: ProgramKey, hp: HParams) -> ProgramKey:
    """The key of one member (host values) at its real widths: its unpadded program's."""
    return dataclasses.replace(
        key, output_dim=int(hp.output_dim),
        hidden=(int(hp.hidden_image), int(hp.hidden_text)) if key.hidden != (0, 0) else (0, 0),
        num_layers=int(hp.num_layers) if key.num_layers else 0,
        num_heads=int(hp.num_heads) if key.num_heads else 0,
        queue_size=int(hp.queue_size) if key.queue_size else 0)


@functools.lru_cache(maxsize=256)
def param_shapes(key: ProgramKey) -> dict:
    """The shapes of the heads' params under ``key`` (traced, not run)."""
    def init(rng):
        widths = Widths(key.output_dim, 0, key.num_layers, 1)
        return {side: head.init(rng, jnp.zeros((1, dim), jnp.float32), widths._replace(hidden_dim=hidden))["params"]
                for side, head, dim, hidden in zip(("image", "text"), make_pair(key.init_key()),
                                                    (key.image_dim, key.text_dim), key.hidden)}

    return jax.eval_shape(init, jax.random.PRNGKey(0))


def unpad(params: dict, key: ProgramKey) -> dict:
    """One member's padded heads params cut to the shapes of its real-width ``key`` (:func:`real_key`):
    what its own unpadded program would hold, and what a checkpoint stores."""
    def cut(tree, shapes):
        if isinstance(shapes, dict):
            return {name: cut(tree[name], sub) for name, sub in shapes.items()}
        return tree[tuple(slice(0, n) for n in shapes.shape)]

    return cut({"image": params["image"], "text": params["text"]}, param_shapes(key.init_key()))
