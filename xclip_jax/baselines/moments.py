"""The pair moments every baseline is fitted from: the two means, the two covariances and the cross
covariance of the caption rows, accumulated in one sweep over fixed-size row chunks (memory-mapped
arrays are read once, one chunk at a time, and never gathered whole)."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

DEFAULT_CHUNK_ROWS = 8192
HIGHEST = jax.lax.Precision.HIGHEST

# ----------------------------------------------------------------------------- pair moments


class _Sums(NamedTuple):
    image_Di: jax.Array
    text_Dt: jax.Array
    image_DixDi: jax.Array
    text_DtxDt: jax.Array
    cross_DixDt: jax.Array


class Moments(NamedTuple):
    mean_image_Di: jax.Array
    mean_text_Dt: jax.Array
    cov_image_DixDi: jax.Array
    cov_text_DtxDt: jax.Array
    cov_cross_DixDt: jax.Array
    rows: int


def _gram(a_CxD, b_CxE):
    return jax.lax.dot_general(
        a_CxD, b_CxE, (((0,), (0,)), ((), ())), precision=HIGHEST,
        preferred_element_type=jnp.float32,
    )


@functools.partial(jax.jit, donate_argnums=0)
def _accumulate(sums, image_CxDi, text_CxDt, valid_C, shift_image_Di, shift_text_Dt):
    # Sums are taken about a shift (the first chunk's mean): squaring raw embeddings whose mean
    # dwarfs their spread would cancel catastrophically in float32 when the mean is removed.
    x_CxDi = (image_CxDi - shift_image_Di) * valid_C[:, None]
    y_CxDt = (text_CxDt - shift_text_Dt) * valid_C[:, None]
    return _Sums(
        sums.image_Di + jnp.sum(x_CxDi, axis=0),
        sums.text_Dt + jnp.sum(y_CxDt, axis=0),
        sums.image_DixDi + _gram(x_CxDi, x_CxDi),
        sums.text_DtxDt + _gram(y_CxDt, y_CxDt),
        sums.cross_DixDt + _gram(x_CxDi, y_CxDt),
    )


@jax.jit
def _finish(sums, shift_image_Di, shift_text_Dt, rows):
    offset_Di = sums.image_Di / rows
    offset_Dt = sums.text_Dt / rows

    def centred(total, a, b):
        return total / rows - jnp.outer(a, b)

    def symmetric(c):
        return (c + c.T) / 2

    return (
        shift_image_Di + offset_Di,
        shift_text_Dt + offset_Dt,
        symmetric(centred(sums.image_DixDi, offset_Di, offset_Di)),
        symmetric(centred(sums.text_DtxDt, offset_Dt, offset_Dt)),
        centred(sums.cross_DixDt, offset_Di, offset_Dt),
    )


def _check_pairs(image, text, row_image):
    if getattr(image, "ndim", None) != 2 or getattr(text, "ndim", None) != 2:
        raise ValueError("image and text must be 2-D arrays [rows, dim]")
    row_image_R = np.asarray(row_image)
    if row_image_R.shape != (text.shape[0],) or not np.issubdtype(row_image_R.dtype, np.integer):
        raise ValueError(
            f"row_image must be an integer array of shape ({text.shape[0]},), got "
            f"{row_image_R.dtype} {row_image_R.shape}"
        )
    if row_image_R.size < 2:
        raise ValueError(f"need at least 2 training rows, got {row_image_R.size}")
    if row_image_R.min() < 0 or row_image_R.max() >= image.shape[0]:
        raise ValueError(f"row_image values must lie in [0, {image.shape[0]})")
    return row_image_R


def standardize(x_CxD):
    # What a LayerNorm (eps 1e-5) without its scale and bias does to each row.
    centred = x_CxD - x_CxD.mean(axis=1, keepdims=True)
    return centred / np.sqrt((centred**2).mean(axis=1, keepdims=True) + 1e-5)


def pair_moments(image, text, row_image, chunk_rows=DEFAULT_CHUNK_ROWS, standardize_rows=False) -> Moments:
    """Means and (cross-)covariances over the caption rows, in one chunked sweep (of each row
    standardized as a LayerNorm would, with ``standardize_rows``)."""
    row_image_R = _check_pairs(image, text, row_image)
    rows = row_image_R.size
    chunk = max(1, min(int(chunk_rows), rows))
    di, dt = image.shape[1], text.shape[1]
    sums = _Sums(
        jnp.zeros((di,), jnp.float32), jnp.zeros((dt,), jnp.float32),
        jnp.zeros((di, di), jnp.float32), jnp.zeros((dt, dt), jnp.float32),
        jnp.zeros((di, dt), jnp.float32),
    )
    full_C = np.ones((chunk,), np.float32)
    for start in range(0, rows, chunk):
        stop = min(start + chunk, rows)
        # Only this chunk's rows are read: a memory-mapped input is never loaded whole.
        x_CxDi = np.asarray(image[row_image_R[start:stop]], dtype=np.float32)
        y_CxDt = np.asarray(text[start:stop], dtype=np.float32)
        if standardize_rows:
            x_CxDi, y_CxDt = standardize(x_CxDi), standardize(y_CxDt)
        if start == 0:
            shift_image_Di = jnp.asarray(x_CxDi.mean(axis=0))
            shift_text_Dt = jnp.asarray(y_CxDt.mean(axis=0))
        valid_C = full_C
        if stop - start < chunk:
            # Zero-padding the last chunk keeps one compiled program for every chunk.
            pad = ((0, chunk - (stop - start)), (0, 0))
            x_CxDi, y_CxDt = np.pad(x_CxDi, pad), np.pad(y_CxDt, pad)
            valid_C = (np.arange(chunk) < stop - start).astype(np.float32)
        sums = _accumulate(sums, x_CxDi, y_CxDt, valid_C, shift_image_Di, shift_text_Dt)
    moments = Moments(*_finish(sums, shift_image_Di, shift_text_Dt, jnp.float32(rows)), rows)
    for side, cov in (("image", moments.cov_image_DixDi), ("text", moments.cov_text_DtxDt)):
        trace = float(jnp.trace(cov))
        if not np.isfinite(trace):
            raise ValueError(f"training {side} embeddings contain NaN or Inf values")
        if trace <= 0:
            raise ValueError(f"training {side} embeddings are constant; nothing to fit")
    return moments


def cap_dims(dims: Sequence[int], moments: Moments) -> list[int]:
    cap = min(moments.cov_image_DixDi.shape[0], moments.cov_text_DtxDt.shape[0], moments.rows)
    return sorted({max(1, min(int(k), cap)) for k in dims})

