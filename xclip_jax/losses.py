"""Contrastive losses over L2-normalised embeddings, all jit-compatible: ``sigmoid_infonce`` (SigLIP's
pairwise binary cross-entropy, with its learnable bias), ``softmax_infonce`` (InfoNCE both ways,
every caption of an image a positive) and ``queue_infonce`` (image→text InfoNCE against a MoCo-style
queue of earlier texts). Each function gives its formula. ``τ`` is the temperature and
``pos[i, j] = ids[i] == ids[j]``.

Every loss takes ``zi`` [B, D] image embeddings, ``zt`` [B, D] text embeddings and ``ids`` [B]
(equal ids mark captions of the same image) and computes in float32.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

MAX_LOG_SCALE = math.log(100.0)
SIGLIP_BIAS_INIT = -10.0


def _logits(zi, zt, temperature):
    return jnp.matmul(zi.astype(jnp.float32), zt.astype(jnp.float32).T) / temperature


def sigmoid_infonce(zi, zt, ids, *, temperature, bias=0.0, normalize="pairs"):
    """Binary cross-entropy over every image–text pair (SigLIP-style): logits ``= zi·ztᵀ / τ + b``,
    the loss the binary cross-entropy with logits against ``pos`` over all B×B entries.

    Args:
      zi, zt: [B, D] normalised embeddings. ids: [B] image ids.
      temperature: τ (scalar, may be traced). bias: the additive logit bias b (0 = the original).
      normalize: ``"pairs"`` averages over all B×B entries (the original); ``"batch"`` sums and
        divides by B (the SigLIP paper and big_vision); or a (traced) bool, True for ``"batch"``.

    Returns:
      The scalar loss.
    """
    if isinstance(normalize, str):
        if normalize not in ("pairs", "batch"):
            raise ValueError(f"normalize must be 'pairs' or 'batch', got {normalize!r}")
        normalize = normalize == "batch"
    logits_BxB = _logits(zi, zt, temperature) + bias
    pos_BxB = ids[:, None] == ids[None, :]
    # BCE(x, y) = softplus(x) − y·x: one transcendental pass over B×B instead of two log-sigmoids.
    bce_BxB = jax.nn.softplus(logits_BxB) - jnp.where(pos_BxB, logits_BxB, 0.0)
    batch = zi.shape[0]
    return jnp.sum(bce_BxB) / jnp.where(normalize, batch, batch * batch).astype(jnp.float32)


def softmax_infonce(zi, zt, ids, *, temperature):
    """Symmetric multi-positive InfoNCE: every caption of the image is a positive. With ``P`` the
    positive mask ``pos`` with rows normalised to sum 1, ``L_i2t = −Σ P ⊙ log_softmax(zi·ztᵀ / τ, axis=1)
    / B`` and ``L_t2i`` the same on the transposed logits.

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

    Its live size may be smaller than its slots (a trial's queue padded to a program's): the ring
    then wraps at the live size, passed as data, and the slots past it are never written.

    Attributes:
      emb_QxD: stored embeddings. ids_Q: their image ids. valid_Q: which slots hold an entry.
      ptr: the next slot to write.
    """

    emb_QxD: jax.Array
    ids_Q: jax.Array
    valid_Q: jax.Array
    ptr: jax.Array


def init_queue(size: int, dim: int) -> QueueState:
    """An empty queue of ``size`` slots of ``dim`` dims (on the device)."""
    return QueueState(*map(jnp.asarray, empty_queue(size, dim)))


def empty_queue(slots: int, dim: int, members: int | None = None) -> tuple:
    """An empty queue's arrays on the host (numpy), with a leading member axis when ``members`` is
    given: placing them on the device compiles nothing."""
    lead = () if members is None else (members,)
    return (np.zeros(lead + (slots, dim), np.float32), np.full(lead + (slots,), -1, np.int32),
            np.zeros(lead + (slots,), bool), np.zeros(lead, np.int32))


def enqueue(queue: QueueState, emb_BxD, ids_B, size=None) -> QueueState:
    """Write a batch into the ring after the last entry; the ring wraps at ``size`` (its live size,
    may be traced; default: every slot).

    A batch longer than the queue keeps its last ``size`` rows; a batch that wraps past the end writes
    all of its rows (the first ones at the end, the rest from slot 0). No slot is written twice.
    """
    batch = emb_BxD.shape[0]
    size = queue.emb_QxD.shape[0] if size is None else size
    rows_B = jnp.arange(batch)
    # Row i goes to slot (ptr + i) % size; of a batch longer than the ring only the last `size` rows
    # do (their slots are distinct), the others are sent past the end and dropped.
    slots_B = jnp.where(rows_B >= batch - size, (queue.ptr + rows_B) % size, queue.emb_QxD.shape[0])
    return QueueState(
        emb_QxD=queue.emb_QxD.at[slots_B].set(jax.lax.stop_gradient(emb_BxD).astype(jnp.float32), mode="drop"),
        ids_Q=queue.ids_Q.at[slots_B].set(ids_B.astype(jnp.int32), mode="drop"),
        valid_Q=queue.valid_Q.at[slots_B].set(True, mode="drop"),
        ptr=((queue.ptr + batch) % size).astype(jnp.int32),
    )


def queue_infonce(zi, zt, ids, queue: QueueState, *, temperature, mask_batch_duplicates=True, size=None):
    """Image→text InfoNCE against the batch's texts and a queue of earlier texts (MoCo-style):
    logits ``= [zi·ztᵀ, zi·Qᵀ] / τ``, the label of row i its own text; queue entries of the row's
    image and empty slots are masked to −∞; then cross-entropy. After the step the batch's texts
    enter the FIFO ring buffer.

    Args:
      zi, zt: [B, D] normalised embeddings. ids: [B] image ids. queue: the ring buffer.
      temperature: τ.
      mask_batch_duplicates: mask other captions of the same image in the batch instead of treating
        them as negatives (``False`` restores the original's behaviour; may be a traced bool).
      size: the queue's live size (may be traced; default: all its slots). Empty slots, those past
        it included, are masked.

    Returns:
      ``(loss, new_queue)``: the new queue holds this batch's texts (no gradient) and ids.
    """
    neg_inf = jnp.finfo(jnp.float32).min
    logits_BxB = _logits(zi, zt, temperature)
    # The target is the pair's own text: the batch block's diagonal (never masked), taken from the very
    # logits the log-sum-exp sees. A separate elementwise product would differ from a matmul that
    # rounds (TF32 on GPUs) by ~1e-3/τ, and a row's loss could go negative.
    own_B = jnp.diagonal(logits_BxB)
    same_BxB = (ids[:, None] == ids[None, :]) & ~jnp.eye(ids.shape[0], dtype=bool)
    logits_BxB = jnp.where(same_BxB & mask_batch_duplicates, neg_inf, logits_BxB)
    logits_BxQ = _logits(zi, queue.emb_QxD, temperature)
    drop_BxQ = (queue.ids_Q[None, :] == ids[:, None]) | ~queue.valid_Q[None, :]
    logits_BxQ = jnp.where(drop_BxQ, neg_inf, logits_BxQ)
    # log-sum-exp over [batch | queue] without concatenating the two blocks
    lse_B = jnp.logaddexp(jax.nn.logsumexp(logits_BxB, axis=1), jax.nn.logsumexp(logits_BxQ, axis=1))
    loss = jnp.mean(lse_B - own_B)
    return loss, enqueue(queue, zt, ids, size)


def temperature_from_log_scale(log_scale):
    """τ = exp(−log_scale). The scale's bound (≤ 100) is kept on the parameter, after each update
    (``clamp_log_scale``): a clamp here would have zero gradient above it, and a learnable scale that
    Adam's momentum carried past it would never come back."""
    return jnp.exp(-log_scale)


def clamp_log_scale(log_scale):
    """The learnable scale's bound, applied to the parameter: scale = exp(log_scale) ≤ 100."""
    return jnp.minimum(log_scale, MAX_LOG_SCALE)
