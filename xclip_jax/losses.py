"""Contrastive losses over L2-normalised embeddings (SPEC §3), all jit-compatible.

Every loss takes ``zi`` [B, D] image embeddings, ``zt`` [B, D] text embeddings and ``ids`` [B]
(equal ids mark captions of the same image) and computes in float32.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

MAX_LOG_SCALE = math.log(100.0)
SIGLIP_BIAS_INIT = -10.0


def _logits(zi, zt, temperature):
    return jnp.matmul(zi.astype(jnp.float32), zt.astype(jnp.float32).T) / temperature


def sigmoid_infonce(zi, zt, ids, *, temperature, bias=0.0, normalize="pairs"):
    """Binary cross-entropy over every image–text pair (SigLIP-style).

    Args:
      zi, zt: [B, D] normalised embeddings. ids: [B] image ids.
      temperature: τ (scalar, may be traced). bias: the additive logit bias b (0 = the original).
      normalize: ``"pairs"`` averages over all B×B entries (the original); ``"batch"`` sums and
        divides by B (the SigLIP paper and big_vision).

    Returns:
      The scalar loss.
    """
    logits_BxB = _logits(zi, zt, temperature) + bias
    pos_BxB = ids[:, None] == ids[None, :]
    # BCE(x, y) = softplus(x) − y·x: one transcendental pass over B×B instead of two log-sigmoids.
    bce_BxB = jax.nn.softplus(logits_BxB) - jnp.where(pos_BxB, logits_BxB, 0.0)
    if normalize == "pairs":
        return jnp.mean(bce_BxB)
    if normalize == "batch":
        return jnp.sum(bce_BxB) / zi.shape[0]
    raise ValueError(f"normalize must be 'pairs' or 'batch', got {normalize!r}")


def softmax_infonce(zi, zt, ids, *, temperature):
    """Symmetric multi-positive InfoNCE: every caption of the image is a positive.

    Args:
      zi, zt: [B, D] normalised embeddings. ids: [B] image ids. temperature: τ.

    Returns:
      (L_i2t + L_t2i) / 2, each the cross-entropy against the row-normalised positive mask.
    """
    logits_BxB = _logits(zi, zt, temperature)
    pos_BxB = ids[:, None] == ids[None, :]
    # The positive mask is symmetric and row i has as many positives as column i, so both directions
    # share one target term, and t2i's log-softmax is a log-sum-exp down the columns of the same
    # matrix (no transposed copy): L = (Σ lse_rows + Σ lse_cols − 2 Σ_ij pos_ij l_ij / n_i) / 2B.
    n_pos_B = jnp.sum(pos_BxB, axis=1).astype(jnp.float32)
    target = jnp.sum(jnp.where(pos_BxB, logits_BxB, 0.0) / n_pos_B[:, None])
    lse_rows = jnp.sum(jax.nn.logsumexp(logits_BxB, axis=1))
    lse_cols = jnp.sum(jax.nn.logsumexp(logits_BxB, axis=0))
    return (lse_rows + lse_cols - 2.0 * target) / (2.0 * zi.shape[0])


class QueueState(NamedTuple):
    """A FIFO ring buffer of past text embeddings (MoCo-style negatives).

    Attributes:
      emb_QxD: stored embeddings. ids_Q: their image ids. valid_Q: which slots hold an entry.
      ptr: the next slot to write.
    """

    emb_QxD: jax.Array
    ids_Q: jax.Array
    valid_Q: jax.Array
    ptr: jax.Array


def init_queue(size: int, dim: int) -> QueueState:
    """An empty queue of ``size`` slots of ``dim`` dims."""
    return QueueState(
        emb_QxD=jnp.zeros((size, dim), jnp.float32),
        ids_Q=jnp.full((size,), -1, jnp.int32),
        valid_Q=jnp.zeros((size,), bool),
        ptr=jnp.zeros((), jnp.int32),
    )


def enqueue(queue: QueueState, emb_BxD, ids_B) -> QueueState:
    """Write a batch into the ring after the last entry.

    A batch longer than the queue keeps its last ``Q`` rows; a batch that wraps past the end writes
    all of its rows (the first ones at the end, the rest from slot 0).
    """
    size = queue.emb_QxD.shape[0]
    batch = emb_BxD.shape[0]
    if batch > size:
        skip = batch - size
        emb_BxD, ids_B = emb_BxD[skip:], ids_B[skip:]
        start = (queue.ptr + skip) % size
    else:
        start = queue.ptr
    slots = (start + jnp.arange(emb_BxD.shape[0])) % size
    return QueueState(
        emb_QxD=queue.emb_QxD.at[slots].set(jax.lax.stop_gradient(emb_BxD).astype(jnp.float32)),
        ids_Q=queue.ids_Q.at[slots].set(ids_B.astype(jnp.int32)),
        valid_Q=queue.valid_Q.at[slots].set(True),
        ptr=((queue.ptr + batch) % size).astype(jnp.int32),
    )


def queue_infonce(zi, zt, ids, queue: QueueState, *, temperature, mask_batch_duplicates=True):
    """Image→text InfoNCE against the batch's texts and a queue of earlier texts.

    Args:
      zi, zt: [B, D] normalised embeddings. ids: [B] image ids. queue: the ring buffer.
      temperature: τ.
      mask_batch_duplicates: mask other captions of the same image in the batch instead of treating
        them as negatives (``False`` restores the original's behaviour).

    Returns:
      ``(loss, new_queue)``: the new queue holds this batch's texts (no gradient) and ids.
    """
    neg_inf = jnp.finfo(jnp.float32).min
    logits_BxB = _logits(zi, zt, temperature)
    # The target is the pair's own text: the batch block's diagonal (never masked), taken from the very
    # logits the log-sum-exp sees. A separate elementwise product would differ from a matmul that
    # rounds (TF32 on GPUs) by ~1e-3/τ, and a row's loss could go negative.
    own_B = jnp.diagonal(logits_BxB)
    if mask_batch_duplicates:
        same_BxB = (ids[:, None] == ids[None, :]) & ~jnp.eye(ids.shape[0], dtype=bool)
        logits_BxB = jnp.where(same_BxB, neg_inf, logits_BxB)
    logits_BxQ = _logits(zi, queue.emb_QxD, temperature)
    drop_BxQ = (queue.ids_Q[None, :] == ids[:, None]) | ~queue.valid_Q[None, :]
    logits_BxQ = jnp.where(drop_BxQ, neg_inf, logits_BxQ)
    # log-sum-exp over [batch | queue] without concatenating the two blocks
    lse_B = jnp.logaddexp(jax.nn.logsumexp(logits_BxB, axis=1), jax.nn.logsumexp(logits_BxQ, axis=1))
    loss = jnp.mean(lse_B - own_B)
    return loss, enqueue(queue, zt, ids)


def temperature_from_log_scale(log_scale):
    """τ = exp(−log_scale). The scale's bound (≤ 100) is kept on the parameter, after each update
    (``clamp_log_scale``): a clamp here would have zero gradient above it, and a learnable scale that
    Adam's momentum carried past it would never come back."""
    return jnp.exp(-log_scale)


def clamp_log_scale(log_scale):
    """The learnable scale's bound, applied to the parameter: scale = exp(log_scale) ≤ 100."""
    return jnp.minimum(log_scale, MAX_LOG_SCALE)
