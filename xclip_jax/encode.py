"""The heads at evaluation time: projecting embeddings (a checkpoint's heads, at their real widths),
and the validation program of a bundle's members, all in one compiled program per key.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from xclip_jax.heads import Widths
from xclip_jax.metrics import ranks, summarise
from xclip_jax.model import HParams, make_pair
from xclip_jax.padding import program_key
from xclip_jax.spec import ProgramKey, RunSpec
from xclip_jax.step import DeviceData, for_members

# Rows the heads project at a time: bounded memory, one program for any row count.
ENCODE_CHUNK_ROWS = 8192


def _encode_rows(head, params, widths: Widths | None, x_NxD, chunk_size: int = ENCODE_CHUNK_ROWS):
    """Apply ``head`` to every row, ``chunk_size`` rows at a time (a ``lax.map`` over padded chunks:
    bounded memory, one program)."""
    n = x_NxD.shape[0]
    c = min(chunk_size, n)
    k = -(-n // c)
    x_KxCxD = jnp.pad(x_NxD, ((0, k * c - n), (0, 0))).reshape(k, c, x_NxD.shape[1])
    z_KxCxO = jax.lax.map(lambda x: head.apply({"params": params}, x, widths), x_KxCxD)
    return z_KxCxO.reshape(k * c, -1)[:n]


@functools.partial(jax.jit, static_argnames=("key", "side"))
def _encode(key: ProgramKey, side: str, params, x):
    image_head, text_head = make_pair(key)
    return _encode_rows(image_head if side == "image" else text_head, params, None, x)


def encode(spec: RunSpec, side: str, params, x) -> jax.Array:
    """Project ``x`` with the ``side`` ("image"/"text") head of ``spec`` (its real widths, as a
    checkpoint holds them), in fixed-size chunks (one program)."""
    return _encode(program_key(spec).heads_key(), side, params, jnp.asarray(x, jnp.float32))


def project(params, spec: RunSpec, data: DeviceData) -> tuple[jax.Array, jax.Array]:
    """The heads' outputs for a device-resident set: (unique images [N, D], captions [T, D])."""
    return encode(spec, "image", params["image"], data.image_NxDi), encode(spec, "text", params["text"], data.text_RxDt)


def _evaluate_member(key: ProgramKey, params, hp: HParams, data: DeviceData, chunk_size: int):
    image_head, text_head = make_pair(key)
    zi = _encode_rows(image_head, params["image"], hp.widths("image"), data.image_NxDi)
    zt = _encode_rows(text_head, params["text"], hp.widths("text"), data.text_RxDt)
    return ranks(zi, zt, data.row_image_R, min(chunk_size, data.image_NxDi.shape[0]))


@functools.partial(jax.jit, static_argnames=("key", "chunk_size"))
def evaluate_members(key: ProgramKey, params_K, hp_K: HParams, data: DeviceData, chunk_size: int):
    """The validation of every member of a bundle as one program: both projections and the retrieval
    ranks of each, ``(i2t [K, N], t2i [K, T], images finite [K], texts finite [K])``."""
    return for_members(functools.partial(_evaluate_member, key, data=data, chunk_size=chunk_size),
                       (True, True))(params_K, hp_K)


def member_metrics(ranks, ks=(1, 5, 10, 50)) -> list[dict | None]:
    """Each member's metrics from the host copy of a compiled ``evaluate_members``' outputs (None for
    a member whose outputs are not finite: its params diverged)."""
    i2t_KxN, t2i_KxT, images_ok_K, texts_ok_K = ranks
    return [summarise(i2t, t2i, ks) if ok_i and ok_t else None
            for i2t, t2i, ok_i, ok_t in zip(i2t_KxN, t2i_KxT, images_ok_K, texts_ok_K)]
