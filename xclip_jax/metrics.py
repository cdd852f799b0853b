"""COCO-style image<->text retrieval metrics on de-duplicated images.

Plain arrays in, a dict of Python floats out. This module is part of the core: it imports neither
Optuna nor the config module.

Similarity is cosine, as in the original tool and every CLIP evaluation: the inputs are
L2-normalised first (a no-op, to the last bit or so, for the heads' unit-norm outputs), then
compared by dot products in float32. One sweep over fixed-size chunks of images computes
each chunk's ``[chunk, T]`` similarity block once and reduces it on the device in both directions:
image->text ranks for the chunk, and per-caption counts of images that beat the caption's own
image. Both directions therefore cost one N x T matrix product, not two; memory is bounded by a
few ``chunk_size * T`` float32 blocks and the full matrix never exists. The whole computation is
one traceable function (:func:`ranks`, a ``lax.scan`` over chunks padded to whole chunks): one
compiled program per shape, which the training step also inlines into its evaluation program.

A rank is 1 + the number of wrong candidates with a *strictly* greater similarity than the best
correct one, so exact ties go in the query's favour. Image->text ties are judged on the very
numbers being compared. Text->image compares every image with the caption's own similarity
computed once before the sweep, which can differ from the sweep's own value in the last bit: an
image that ties the own image exactly (e.g. a duplicate embedding) may then count either way.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from xclip_jax.ids import group_first_occurrence

DEFAULT_KS = (1, 5, 10, 50)
DEFAULT_CHUNK_SIZE = 1024

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "DEFAULT_KS",
    "format_table",
    "ranks",
    "retrieval_metrics",
    "retrieval_metrics_indexed",
    "summarise",
]


def _similarity(queries_CxD: jax.Array, candidates_MxD: jax.Array) -> jax.Array:
    # HIGHEST keeps GPUs from silently using TF32/bf16 passes, which would reorder near-ties
    # differently from a float32 reference; on CPU it costs nothing.
    return jax.lax.dot_general(
        queries_CxD,
        candidates_MxD,
        dimension_numbers=(((1,), (1,)), ((), ())),
        precision=jax.lax.Precision.HIGHEST,
        preferred_element_type=jnp.float32,
    )


# Counts are summed as float32 0/1 values, exact only below 2**24.
_MAX_EXACT_COUNT = 2**24

# Smallest normal float32: keeps _greater's denominator non-zero without moving any result that
# matters (see _greater).
_TINY = float(np.finfo(np.float32).tiny)


def _greater(diff):
    """1.0 where ``diff > 0``, else 0.0, in float arithmetic only.

    XLA:CPU leaves compare-and-select reductions scalar, which is slower than this vectorised form
    (benchmarks/RESULTS.md has the metrics benchmark). Exact for every float32 ``diff`` but
    positives below ~1e-31, which give a fraction that the caller's rounding absorbs.
    """
    magnitude = jnp.abs(diff)
    return (diff + magnitude) / (2.0 * magnitude + _TINY)


def _matvec(a_RxK, v_K):
    # HIGHEST keeps the 0/1 indicator sums exact integers on GPUs too (no TF32 truncation).
    return jnp.dot(a_RxK, v_K, precision=jax.lax.Precision.HIGHEST)


def _image_chunk_step(
    images_QxD, start, num_images, texts_TxD, text_image_T, own_ref_T, t2i_counts_T, own_sim_T,
    finite, *, chunk_size,
):
    """One chunk of images against all captions: both directions from one similarity block.

    Args:
      images_QxD: all images, zero-padded to a multiple of ``chunk_size`` rows.
      start: first image of this chunk (traced: one loop body serves every chunk).
      num_images: N, the number of real (unpadded) images.
      texts_TxD, text_image_T: all captions and the image index of each.
      own_ref_T: each caption's similarity to its own image, computed once up front; the
        threshold a caption's own image has to be beaten by in text->image ranking.
      t2i_counts_T: running count, per caption, of images scoring above ``own_ref_T``.
      own_sim_T: running copy of each caption's own similarity as this matmul computes it.
      finite: running flag, False once any similarity has overflowed to Inf/NaN.

    Returns:
      ``(i2t_ranks_C, t2i_counts_T, own_sim_T, finite)``; ranks of padded rows are meaningless.
    """
    d = images_QxD.shape[1]
    queries_CxD = jax.lax.dynamic_slice(images_QxD, (start, 0), (chunk_size, d))
    sim_CxT = _similarity(queries_CxD, texts_TxD)

    # Each caption whose image is in this chunk reads its own similarity out of this block, so the
    # image->text threshold is the very number the comparison below sees: exact, tie-safe.
    local_T = text_image_T - start
    in_chunk_T = jnp.logical_and(local_T >= 0, local_T < chunk_size)
    row_T = jnp.clip(local_T, 0, chunk_size - 1)
    own_here_T = sim_CxT[row_T, jnp.arange(sim_CxT.shape[1])]
    best_own_C = jax.ops.segment_max(
        own_here_T, jnp.where(in_chunk_T, row_T, chunk_size), num_segments=chunk_size
    )
    # An image's own captions never exceed their maximum, so no mask is needed to exclude them.
    # Row sums as a mat-vec: XLA:CPU turns a fused reduce of this expression into a library call
    # that first materialises full-size constant blocks.
    above_best_CxT = _greater(sim_CxT - best_own_C[:, None])
    i2t_counts_C = _matvec(above_best_CxT, jnp.ones((sim_CxT.shape[1],), jnp.float32))
    i2t_ranks_C = 1 + jnp.round(i2t_counts_C).astype(jnp.int32)

    # Column sums as a mat-vec: XLA:CPU's column reductions are slow, and the vector drops the
    # zero-padded image rows for free.
    valid_C = (start + jnp.arange(chunk_size) < num_images).astype(jnp.float32)
    above_CxT = _greater(sim_CxT - own_ref_T[None, :])
    chunk_counts_T = _matvec(above_CxT.T, valid_C)
    t2i_counts_T = t2i_counts_T + jnp.round(chunk_counts_T).astype(jnp.int32)
    own_sim_T = jnp.where(in_chunk_T, own_here_T, own_sim_T)

    # An Inf/NaN similarity anywhere in a real row or column makes that row's or column's count
    # NaN, which would otherwise round to a silent, perfect-looking rank.
    finite = finite & jnp.all(jnp.isfinite(chunk_counts_T))
    finite = finite & jnp.all(jnp.isfinite(i2t_counts_C) | (valid_C == 0))
    return i2t_ranks_C, t2i_counts_T, own_sim_T, finite


def _own_reference(texts_TxD, images_NxD, text_image_T, *, chunk_size):
    """Each caption's dot product with its own image, ``[T]``, gathering ``chunk_size`` rows at once.

    Chunked so the gathered image rows never cost a second ``[T, D]`` array.
    """
    t, d = texts_TxD.shape
    c = min(chunk_size, t)

    def body(i, out_T):
        # Clamping the last chunk's start overlaps the previous chunk instead of padding the
        # caption array: the overlap is recomputed to identical values.
        start = jnp.minimum(i * c, t - c)
        texts_CxD = jax.lax.dynamic_slice(texts_TxD, (start, 0), (c, d))
        images_CxD = images_NxD[jax.lax.dynamic_slice(text_image_T, (start,), (c,))]
        own_C = jnp.einsum(
            "cd,cd->c", texts_CxD, images_CxD, precision=jax.lax.Precision.HIGHEST
        )
        return jax.lax.dynamic_update_slice(out_T, own_C, (start,))

    return jax.lax.fori_loop(0, -(-t // c), body, jnp.zeros((t,), jnp.float32))


def _t2i_ranks(t2i_counts_T, own_sim_T, own_ref_T):
    # The sweep counted every image above the reference, the caption's own image included when
    # its matmul similarity rounds above the separately computed reference: take that back out.
    own_counted_T = jnp.round(_greater(own_sim_T - own_ref_T)).astype(jnp.int32)
    return 1 + t2i_counts_T - own_counted_T


def ranks(images_NxD, texts_TxD, text_image_T, chunk_size: int):
    """Image->text and text->image ranks, traceable (jit it, or call it inside a jitted program).

    Both sides are L2-normalised (cosine similarity); then one sweep over image chunks (a
    ``lax.scan``, padded to whole chunks) computes each chunk's ``[chunk, T]`` similarity block once
    and reduces it in both directions.

    Args:
      images_NxD: one row per unique image. texts_TxD: one row per caption. text_image_T: each
        caption's image index (int32). chunk_size: images per block (a Python int).

    Returns:
      ``(i2t_ranks [N], t2i_ranks [T], images_finite, texts_finite)``: 1-based int32 ranks, and
      whether each input was free of NaN/Inf (the ranks mean nothing where it was not).
    """
    images_finite = jnp.all(jnp.isfinite(images_NxD))
    texts_finite = jnp.all(jnp.isfinite(texts_TxD))
    images_NxD, texts_TxD = _l2_normalize(images_NxD), _l2_normalize(texts_TxD)
    n, d = images_NxD.shape
    t = texts_TxD.shape[0]
    num_chunks = -(-n // chunk_size)
    images_QxD = jnp.pad(images_NxD, ((0, num_chunks * chunk_size - n), (0, 0)))
    own_ref_T = _own_reference(texts_TxD, images_NxD, text_image_T, chunk_size=chunk_size)

    def body(carry, start):
        t2i_counts_T, own_sim_T, finite = carry
        ranks_C, t2i_counts_T, own_sim_T, finite = _image_chunk_step(
            images_QxD, start, n, texts_TxD, text_image_T, own_ref_T, t2i_counts_T, own_sim_T, finite,
            chunk_size=chunk_size)
        return (t2i_counts_T, own_sim_T, finite), ranks_C

    init = (jnp.zeros((t,), jnp.int32), jnp.zeros((t,), jnp.float32), jnp.array(True))
    starts = jnp.arange(num_chunks, dtype=jnp.int32) * chunk_size
    (t2i_counts_T, own_sim_T, finite), ranks_KxC = jax.lax.scan(body, init, starts)
    i2t_ranks_N = ranks_KxC.reshape(-1)[:n]
    # With finite unit-norm inputs no similarity can overflow: `finite` only guards the inputs again.
    return (i2t_ranks_N, _t2i_ranks(t2i_counts_T, own_sim_T, own_ref_T), images_finite & finite,
            texts_finite & finite)


_ranks_program = jax.jit(ranks, static_argnames="chunk_size")


def _l2_normalize(x):
    # Cosine similarity: rank by direction only (a raw embedding's norm says nothing about a match).
    # Dividing by the row's largest magnitude first keeps the norm finite for any finite input.
    x = x.astype(jnp.float32)
    scale = jnp.max(jnp.abs(x), axis=-1, keepdims=True)
    x = x / jnp.where(scale > 0, scale, 1.0)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _as_embeddings(x, name: str):
    if not hasattr(x, "shape"):
        x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"{name} must be 2-D [rows, dim], got shape {tuple(x.shape)}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"{name} must be a float array, got dtype {x.dtype}")
    return x


def _check_ks(ks: Sequence[int]) -> tuple[int, ...]:
    ks = tuple(ks)
    if not ks:
        raise ValueError("ks must name at least one cut-off K")
    for k in ks:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"ks must be positive integers, got {ks!r}")
    # A repeated K would be counted twice in mean_recall.
    return tuple(sorted({int(k) for k in ks}))


def summarise(i2t_ranks: np.ndarray, t2i_ranks: np.ndarray, ks: Sequence[int] = DEFAULT_KS) -> dict[str, float]:
    """The metrics dict (see :func:`retrieval_metrics_indexed`) from host arrays of 1-based ranks."""
    ks = _check_ks(ks)
    metrics: dict[str, float] = {}
    recalls = []
    for direction, ranks in (("i2t", i2t_ranks), ("t2i", t2i_ranks)):
        for k in ks:
            value = float(np.mean(ranks <= k))
            metrics[f"{direction}_recall@{k}"] = value
            recalls.append(value)
        metrics[f"{direction}_median_rank"] = float(np.median(ranks))
    metrics["mean_recall"] = float(np.mean(recalls))
    # From the ranks, not the ks, so the pruning metric exists whatever ks were asked for.
    metrics["r1"] = float((np.mean(i2t_ranks == 1) + np.mean(t2i_ranks == 1)) / 2)
    return metrics


def retrieval_metrics_indexed(
    image_emb,
    text_emb,
    text_image,
    ks: Sequence[int] = DEFAULT_KS,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> dict[str, float]:
    """Image<->text retrieval metrics with one row per unique image.

    Image->text: an image is a hit at K if any of its captions is among the K captions most
    similar to it (all T captions are candidates). Text->image: a caption is a hit at K if its
    image is among the K most similar of the N images. Ranks are 1-based; only strictly more
    similar wrong candidates count, so exact ties are resolved in the query's favour (see the
    module docstring for the one last-bit caveat). K larger than the number of candidates gives
    recall 1.0. Costs one N x T float32 matrix product, done in chunks of images.

    Args:
      image_emb: ``[N, D]`` float array (numpy or JAX, any float dtype), one row per unique
        image. Rows are L2-normalised inside: similarity is cosine.
      text_emb: ``[T, D]`` float array, one row per caption.
      text_image: ``[T]`` integer array; ``text_image[t]`` is the row of ``image_emb`` that
        caption ``t`` describes. Every image must have at least one caption.
      ks: the cut-offs K for Recall@K.
      chunk_size: images per compiled chunk (capped at N); peak extra memory is a few
        ``chunk_size * T * 4``-byte blocks.

    Returns:
      A dict of Python floats: ``i2t_recall@K`` and ``t2i_recall@K`` for each K (fractions in
      [0, 1]), ``i2t_median_rank``, ``t2i_median_rank``, ``mean_recall`` (mean of all the recall
      values above) and ``r1`` = (i2t R@1 + t2i R@1) / 2.

    Raises:
      ValueError: on bad shapes or dtypes, NaN/Inf embeddings (or similarities overflowing
        float32), out-of-range indices, an image without captions, or bad ``ks`` /
        ``chunk_size``.

    Example:
      >>> m = retrieval_metrics_indexed(img_NxD, txt_TxD, text_image_T, ks=(1, 5))
      >>> m["t2i_recall@5"], m["r1"]
    """
    ks = _check_ks(ks)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    chunk_size = int(chunk_size)
    images_NxD = _as_embeddings(image_emb, "image_emb")
    texts_TxD = _as_embeddings(text_emb, "text_emb")
    n, d = images_NxD.shape
    t = texts_TxD.shape[0]
    if texts_TxD.shape[1] != d:
        raise ValueError(
            f"image_emb and text_emb must have the same dim, got {d} and {texts_TxD.shape[1]}"
        )
    if n == 0 or t == 0:
        raise ValueError(f"need at least one image and one caption, got {n} images, {t} captions")
    if t >= _MAX_EXACT_COUNT:
        raise ValueError(f"at most {_MAX_EXACT_COUNT - 1} captions are supported, got {t}")

    labels = np.asarray(text_image)
    if labels.shape != (t,):
        raise ValueError(f"text_image must have shape ({t},) to match text_emb, got {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"text_image must hold integer image indices, got dtype {labels.dtype}")
    if labels.min() < 0 or labels.max() >= n:
        raise ValueError(
            f"text_image values must lie in [0, {n}), got range [{labels.min()}, {labels.max()}]"
        )
    captions_per_image = np.bincount(labels, minlength=n)
    if not captions_per_image.all():
        missing = int(np.sum(captions_per_image == 0))
        raise ValueError(f"{missing} of {n} images have no caption in text_image")
    # One compiled program per shape; a chunk larger than the image count would only add padding.
    i2t, t2i, images_ok, texts_ok = jax.device_get(_ranks_program(
        images_NxD.astype(jnp.float32), texts_TxD.astype(jnp.float32), jnp.asarray(labels, jnp.int32),
        chunk_size=min(chunk_size, n)))
    # NaN similarities compare false everywhere, which would score a diverged model as perfect.
    for ok, name in ((images_ok, "image_emb"), (texts_ok, "text_emb")):
        if not ok:
            raise ValueError(f"{name} contains NaN or Inf values")
    return summarise(i2t, t2i, ks)


def retrieval_metrics(
    image_emb,
    text_emb,
    image_ids,
    ks: Sequence[int] = DEFAULT_KS,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> dict[str, float]:
    """Retrieval metrics from row-level (image, caption) pairs, as embedding sets store them.

    Rows sharing an image id are captions of the same image; images are de-duplicated by id
    (the first row of each id supplies its embedding) before ranking, so an image competes once,
    not once per caption. See :func:`retrieval_metrics_indexed` for the exact semantics.

    Args:
      image_emb: ``[T, D]`` float array, the image embedding of each row (repeated per caption).
      text_emb: ``[T, D]`` float array, the caption embedding of each row.
      image_ids: ``T`` image ids (list or numpy array of ints, strings or other hashables).
      ks: the cut-offs K for Recall@K.
      chunk_size: images per compiled chunk.

    Returns:
      The dict of Python floats described in :func:`retrieval_metrics_indexed`.

    Raises:
      ValueError: if the row counts disagree, or for any reason
        :func:`retrieval_metrics_indexed` raises.
    """
    if not hasattr(image_emb, "shape"):
        image_emb = np.asarray(image_emb)
    if not hasattr(text_emb, "shape"):
        text_emb = np.asarray(text_emb)
    rows = len(image_ids)
    if image_emb.shape[0] != rows or text_emb.shape[0] != rows:
        raise ValueError(
            "image_emb, text_emb and image_ids must have the same number of rows, got "
            f"{image_emb.shape[0]}, {text_emb.shape[0]} and {rows}"
        )
    first_rows, text_image = group_first_occurrence(image_ids)
    unique_image_emb = image_emb[first_rows]
    return retrieval_metrics_indexed(unique_image_emb, text_emb, text_image, ks, chunk_size)


def format_table(metrics: dict[str, float]) -> str:
    """Render retrieval metrics as a small fixed-width table for terminals and logs.

    Args:
      metrics: a dict as returned by :func:`retrieval_metrics`; the R@K columns are the Ks found
        in its ``i2t_recall@K`` keys, shown as percentages.

    Returns:
      A multi-line string: a header, one row each for ``i2t`` and ``t2i`` (R@K columns and MedR),
      and a ``mean recall`` line (plus ``R@1 avg`` when ``r1`` is present).
    """
    ks = sorted(
        int(key.split("@", 1)[1]) for key in metrics if key.startswith("i2t_recall@")
    )
    header = f"{'':<5}" + "".join(f"{'R@' + str(k):>8}" for k in ks) + f"{'MedR':>8}"
    lines = [header]
    for direction in ("i2t", "t2i"):
        cells = "".join(
            f"{100 * metrics.get(f'{direction}_recall@{k}', float('nan')):>8.2f}" for k in ks
        )
        medr = metrics.get(f"{direction}_median_rank", float("nan"))
        lines.append(f"{direction:<5}{cells}{medr:>8.1f}")
    footer = f"mean recall: {100 * metrics.get('mean_recall', float('nan')):.2f}"
    if "r1" in metrics:
        footer += f"   R@1 avg: {100 * metrics['r1']:.2f}"
    lines.append(footer)
    return "\n".join(lines)
