"""Closed-form linear retrieval baselines: ridge, CCA and Procrustes on embedding pairs.

A baseline maps each modality linearly into a shared space; retrieval then ranks by cosine
similarity there (:func:`xclip_jax.metrics.retrieval_metrics_indexed` on L2-normalised rows).
They tell what a trained projection head adds over the best linear map that needs no training.

Training pairs are caption rows: row ``r`` pairs ``image[row_image[r]]`` with ``text[r]``, so an
image with five captions counts five times, as it does when a head trains on the same rows.

Every fit needs only the pair moments: the two means, the two covariances and the cross
covariance. They are accumulated in one sweep over fixed-size row chunks (memory-mapped arrays
are read once, one chunk at a time, and never gathered whole), after which each baseline is a
few dense ``D x D`` factorizations: Cholesky solves for ridge, symmetric eigendecompositions and
one SVD for CCA and Procrustes. No ``rows x rows`` matrix is ever formed, and every
hyperparameter candidate reuses the same moments (and, for CCA, the same SVD).

Its numeric core imports only numpy, JAX and :mod:`xclip_jax.metrics` (the command line also reads
configs and data). It is longer than most modules: three fits sharing one moments pass and one
search, the table, the heads' warm start and the command line belong together.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from xclip_jax.metrics import retrieval_metrics_indexed

# Relative ridge strengths: lambda = value * trace(X^T X) / D, i.e. in units of the mean
# eigenvalue, so one grid fits embeddings of any scale or dimension.
RIDGE_LAMBDAS = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)
# Shared-space sizes tried by CCA and Procrustes, each capped at min(Di, Dt, rows).
SUBSPACE_DIMS = (32, 64, 128, 256)
# Covariance ridge for CCA and the whitening floor for Procrustes, in units of the mean eigenvalue.
DEFAULT_EPS = 1e-3
DEFAULT_CHUNK_ROWS = 8192

__all__ = [
    "DEFAULT_EPS",
    "RIDGE_LAMBDAS",
    "SUBSPACE_DIMS",
    "LinearBaseline",
    "best_baseline",
    "compute_baselines",
    "fit_cca",
    "fit_procrustes",
    "fit_ridge",
    "format_baselines",
    "score_baseline",
]

_HIGHEST = jax.lax.Precision.HIGHEST
_DIRECTIONS = {"t2i": "ridge t→i", "i2t": "ridge i→t"}


# ----------------------------------------------------------------------------- fitted maps


def _project(x_NxD, mean_D, map_DxK):
    centred_NxD = jnp.asarray(x_NxD, jnp.float32) - mean_D
    if map_DxK is None:
        return centred_NxD
    return jnp.matmul(centred_NxD, map_DxK, precision=_HIGHEST)


_project_jit = jax.jit(_project)


# eq=False: identity equality and hashing, since the fields hold device arrays.
@dataclasses.dataclass(frozen=True, eq=False)
class LinearBaseline:
    """A fitted linear map of images and captions into one shared space.

    Attributes:
      name: e.g. ``"ridge t→i"``, ``"CCA-128"``, ``"Procrustes-64"``.
      param: the hyperparameter it was fitted with, ``{"lambda": ...}`` (relative ridge
        strength, see :func:`fit_ridge`) or ``{"k": ...}`` (shared-space size).
      fit_seconds: wall time of the fit, from raw arrays to the maps on the device.
      image_mean: ``[Di]`` training mean subtracted from images.
      text_mean: ``[Dt]`` training mean subtracted from captions.
      image_map: ``[Di, D]`` projection of centred images, or None for the identity.
      text_map: ``[Dt, D]`` projection of centred captions, or None for the identity.
      correlations: ``[k]`` regularised canonical correlations, descending (CCA only).
    """

    name: str
    param: dict[str, float]
    fit_seconds: float
    image_mean: jax.Array
    text_mean: jax.Array
    image_map: jax.Array | None
    text_map: jax.Array | None
    correlations: jax.Array | None = None

    def project_images(self, image_NxDi) -> jax.Array:
        """Map ``[N, Di]`` images to ``[N, D]`` shared-space rows (not normalised)."""
        return _project_jit(image_NxDi, self.image_mean, self.image_map)

    def project_texts(self, text_RxDt) -> jax.Array:
        """Map ``[R, Dt]`` captions to ``[R, D]`` shared-space rows (not normalised)."""
        return _project_jit(text_RxDt, self.text_mean, self.text_map)


@jax.jit
def _unit_rows(x_NxD):
    norm_N1 = jnp.linalg.norm(x_NxD, axis=1, keepdims=True)
    # A zero row stays zero instead of turning into NaNs that the metrics would reject.
    return x_NxD / jnp.maximum(norm_N1, jnp.finfo(jnp.float32).tiny)


def score_baseline(baseline: LinearBaseline, image, text, row_image, ks=(1, 5, 10)) -> dict:
    """Retrieval metrics of a fitted baseline on a held-out set, by cosine similarity.

    Args:
      baseline: a fitted :class:`LinearBaseline`.
      image: ``[N, Di]`` float array, one row per unique image.
      text: ``[R, Dt]`` float array, one row per caption.
      row_image: ``[R]`` integer array, the row of ``image`` each caption describes.
      ks: the cut-offs K for Recall@K.

    Returns:
      The dict of :func:`xclip_jax.metrics.retrieval_metrics_indexed` (``i2t_recall@K``,
      ``t2i_recall@K``, median ranks, ``mean_recall``, ``r1``).

    Example:
      >>> b = fit_cca(train_img, train_txt, train_row_image, k=64)
      >>> score_baseline(b, val_img, val_txt, val_row_image)["r1"]
    """
    image_NxD = _unit_rows(baseline.project_images(image))
    text_RxD = _unit_rows(baseline.project_texts(text))
    return retrieval_metrics_indexed(image_NxD, text_RxD, np.asarray(row_image), ks=ks)


# ----------------------------------------------------------------------------- pair moments


class _Sums(NamedTuple):
    image_Di: jax.Array
    text_Dt: jax.Array
    image_DixDi: jax.Array
    text_DtxDt: jax.Array
    cross_DixDt: jax.Array


class _Moments(NamedTuple):
    mean_image_Di: jax.Array
    mean_text_Dt: jax.Array
    cov_image_DixDi: jax.Array
    cov_text_DtxDt: jax.Array
    cov_cross_DixDt: jax.Array
    rows: int


def _gram(a_CxD, b_CxE):
    return jax.lax.dot_general(
        a_CxD, b_CxE, (((0,), (0,)), ((), ())), precision=_HIGHEST,
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


def _standardize_rows(x_CxD):
    # What a LayerNorm (eps 1e-5) without its scale and bias does to each row.
    centred = x_CxD - x_CxD.mean(axis=1, keepdims=True)
    return centred / np.sqrt((centred**2).mean(axis=1, keepdims=True) + 1e-5)


def _pair_moments(image, text, row_image, chunk_rows=DEFAULT_CHUNK_ROWS, standardize_rows=False) -> _Moments:
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
            x_CxDi, y_CxDt = _standardize_rows(x_CxDi), _standardize_rows(y_CxDt)
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
    moments = _Moments(*_finish(sums, shift_image_Di, shift_text_Dt, jnp.float32(rows)), rows)
    for side, cov in (("image", moments.cov_image_DixDi), ("text", moments.cov_text_DtxDt)):
        trace = float(jnp.trace(cov))
        if not np.isfinite(trace):
            raise ValueError(f"training {side} embeddings contain NaN or Inf values")
        if trace <= 0:
            raise ValueError(f"training {side} embeddings are constant; nothing to fit")
    return moments


def _cap_dims(dims: Sequence[int], moments: _Moments) -> list[int]:
    cap = min(moments.cov_image_DixDi.shape[0], moments.cov_text_DtxDt.shape[0], moments.rows)
    return sorted({max(1, min(int(k), cap)) for k in dims})


# ----------------------------------------------------------------------------- ridge


@jax.jit
def _ridge_solve(cov_xx_DxD, cov_xy_DxE, lam):
    d = cov_xx_DxD.shape[0]
    scaled = lam * jnp.trace(cov_xx_DxD) / d
    # The regularised covariance is positive definite: Cholesky is the cheap, stable solve.
    factor = jax.scipy.linalg.cho_factor(cov_xx_DxD + scaled * jnp.eye(d, dtype=jnp.float32))
    return jax.scipy.linalg.cho_solve(factor, cov_xy_DxE)


def _ridge_from_moments(moments: _Moments, direction: str, lam: float) -> LinearBaseline:
    if direction == "t2i":
        weights_DtxDi = _ridge_solve(moments.cov_text_DtxDt, moments.cov_cross_DixDt.T, lam)
        image_map, text_map = None, weights_DtxDi
    elif direction == "i2t":
        weights_DixDt = _ridge_solve(moments.cov_image_DixDi, moments.cov_cross_DixDt, lam)
        image_map, text_map = weights_DixDt, None
    else:
        raise ValueError(f"direction must be 't2i' or 'i2t', got {direction!r}")
    return LinearBaseline(
        _DIRECTIONS[direction], {"lambda": float(lam)}, 0.0,
        moments.mean_image_Di, moments.mean_text_Dt, image_map, text_map,
    )


def _timed(fit: Callable[[], LinearBaseline]) -> LinearBaseline:
    start = time.perf_counter()
    baseline = fit()
    jax.block_until_ready((baseline.image_map, baseline.text_map, baseline.image_mean))
    return dataclasses.replace(baseline, fit_seconds=time.perf_counter() - start)


def fit_ridge(
    image, text, row_image, *, direction: str = "t2i", lam: float = 1e-2,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
) -> LinearBaseline:
    """Closed-form ridge regression from one modality onto the other.

    Both sides are centred with the training means. ``"t2i"`` regresses images on captions,
    ``W = (XᵀX + λ'I)⁻¹ XᵀY`` with ``X`` the centred captions and ``Y`` the centred images, and
    scores in image space (the image side is the identity); ``"i2t"`` swaps the roles. The
    regulariser is relative: ``λ' = lam * trace(XᵀX) / D``, so ``lam`` means the same at any
    embedding scale or dimension.

    Args:
      image: ``[N, Di]`` float array (numpy, JAX or memory-mapped), one row per unique image.
      text: ``[R, Dt]`` float array, one row per caption; the training pairs are its rows.
      row_image: ``[R]`` integer array; caption ``r`` is paired with ``image[row_image[r]]``.
      direction: ``"t2i"`` (captions mapped to image space) or ``"i2t"``.
      lam: relative ridge strength, in units of the mean eigenvalue of ``XᵀX``.
      chunk_rows: caption rows per accumulation chunk (bounds host and device memory).

    Returns:
      A :class:`LinearBaseline` named ``"ridge t→i"`` or ``"ridge i→t"``.

    Example:
      >>> b = fit_ridge(img_NxDi, txt_RxDt, row_image_R, direction="t2i", lam=1e-2)
      >>> b.project_texts(val_txt).shape  # [R_val, Di]
    """
    if direction not in _DIRECTIONS:
        raise ValueError(f"direction must be 't2i' or 'i2t', got {direction!r}")
    return _timed(lambda: _ridge_from_moments(
        _pair_moments(image, text, row_image, chunk_rows), direction, lam))


# ----------------------------------------------------------------------------- CCA, Procrustes


class _Eig(NamedTuple):
    values_D: jax.Array  # descending, clipped at 0
    vectors_DxD: jax.Array  # columns match values_D


@jax.jit
def _eig_descending(cov_DxD):
    values_D, vectors_DxD = jnp.linalg.eigh(cov_DxD)
    # float32 eigh can return tiny negative eigenvalues for a rank-deficient covariance.
    return _Eig(jnp.maximum(values_D[::-1], 0.0), vectors_DxD[:, ::-1])


def _whitener(eig: _Eig, eps, k=None):
    """Columns ``v_j / sqrt(e_j + eps * mean(e))``: whitens the ridged covariance (first k)."""
    floor = eps * jnp.mean(eig.values_D)
    values, vectors = eig.values_D[:k], eig.vectors_DxD[:, :k]
    return vectors / jnp.sqrt(values + floor)


@jax.jit
def _cca_directions(cov_cross_DixDt, eig_image, eig_text, eps):
    """All canonical directions (columns) and their regularised correlations, descending."""
    white_image_DixDi = _whitener(eig_image, eps)
    white_text_DtxDt = _whitener(eig_text, eps)
    whitened_cross_DixDt = jnp.matmul(
        jnp.matmul(white_image_DixDi.T, cov_cross_DixDt, precision=_HIGHEST),
        white_text_DtxDt, precision=_HIGHEST,
    )
    u_DixM, corr_M, vt_MxDt = jnp.linalg.svd(whitened_cross_DixDt, full_matrices=False)
    dirs_image_DixM = jnp.matmul(white_image_DixDi, u_DixM, precision=_HIGHEST)
    dirs_text_DtxM = jnp.matmul(white_text_DtxDt, vt_MxDt.T, precision=_HIGHEST)
    return dirs_image_DixM, dirs_text_DtxM, corr_M


def _cca_select(moments: _Moments, directions, k: int) -> LinearBaseline:
    dirs_image_DixM, dirs_text_DtxM, corr_M = directions
    # Each side is scaled by rho_j, so cosine scores weigh direction j by rho_j**2, the share of
    # its variance that the other side explains. Unscaled, weakly correlated (often spurious)
    # directions count as much as strong ones, and recall collapses once k overshoots the
    # shared dimension. On synthetic data, rho per side was best or within 0.01 r1 of the best
    # at every k tried, against 1, sqrt(rho), rho**2 and rho**4.
    scale_k = corr_M[:k]
    return LinearBaseline(
        f"CCA-{k}", {"k": int(k)}, 0.0, moments.mean_image_Di, moments.mean_text_Dt,
        dirs_image_DixM[:, :k] * scale_k, dirs_text_DtxM[:, :k] * scale_k, corr_M[:k],
    )


def _cca_from_moments(moments: _Moments, k: int, eps: float) -> LinearBaseline:
    directions = _cca_directions(
        moments.cov_cross_DixDt, _eig_descending(moments.cov_image_DixDi),
        _eig_descending(moments.cov_text_DtxDt), eps,
    )
    return _cca_select(moments, directions, k)


def fit_cca(
    image, text, row_image, *, k: int = 64, eps: float = DEFAULT_EPS,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
) -> LinearBaseline:
    """Regularised canonical correlation analysis, keeping the top ``k`` directions.

    Each covariance is ridged, ``Cxx + εI`` with ``ε = eps * trace(Cxx) / Dx`` (likewise for
    ``Cyy``); both sides are whitened with their eigendecompositions and the SVD of the whitened
    cross covariance gives the canonical directions and correlations ``ρ``. Each side is projected
    onto its first ``k`` directions, scaled by ``ρ`` so cosine scores favour strongly correlated
    directions.

    Args:
      image: ``[N, Di]`` float array (numpy, JAX or memory-mapped), one row per unique image.
      text: ``[R, Dt]`` float array, one row per caption; the training pairs are its rows.
      row_image: ``[R]`` integer array; caption ``r`` is paired with ``image[row_image[r]]``.
      k: number of canonical directions; capped at ``min(Di, Dt, R)``.
      eps: relative covariance ridge, in units of each side's mean eigenvalue.
      chunk_rows: caption rows per accumulation chunk.

    Returns:
      A :class:`LinearBaseline` named ``"CCA-<k>"``; ``correlations`` holds the ``k``
      regularised canonical correlations, descending.

    Example:
      >>> b = fit_cca(img_NxDi, txt_RxDt, row_image_R, k=128)
      >>> b.correlations[:4]
    """

    def fit():
        moments = _pair_moments(image, text, row_image, chunk_rows)
        return _cca_from_moments(moments, _cap_dims([k], moments)[0], eps)

    return _timed(fit)


@functools.partial(jax.jit, static_argnames=("k",))
def _procrustes_maps(cov_cross_DixDt, eig_image, eig_text, eps, *, k):
    pca_image_Dixk = _whitener(eig_image, eps, k)
    pca_text_Dtxk = _whitener(eig_text, eps, k)
    cross_kxk = jnp.matmul(
        jnp.matmul(pca_image_Dixk.T, cov_cross_DixDt, precision=_HIGHEST),
        pca_text_Dtxk, precision=_HIGHEST,
    )
    # argmin over orthogonal R of ||X R - Y|| maximises trace(Rᵀ XᵀY): R = U Vᵀ.
    u_kxk, _, vt_kxk = jnp.linalg.svd(cross_kxk)
    rotation_kxk = jnp.matmul(u_kxk, vt_kxk, precision=_HIGHEST)
    return jnp.matmul(pca_image_Dixk, rotation_kxk, precision=_HIGHEST), pca_text_Dtxk


def _procrustes_from_moments(moments, k, eps, eig_image=None, eig_text=None) -> LinearBaseline:
    if eig_image is None:
        eig_image = _eig_descending(moments.cov_image_DixDi)
        eig_text = _eig_descending(moments.cov_text_DtxDt)
    image_map, text_map = _procrustes_maps(moments.cov_cross_DixDt, eig_image, eig_text, eps, k=k)
    return LinearBaseline(
        f"Procrustes-{k}", {"k": int(k)}, 0.0, moments.mean_image_Di, moments.mean_text_Dt,
        image_map, text_map,
    )


def fit_procrustes(
    image, text, row_image, *, k: int = 64, eps: float = DEFAULT_EPS,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
) -> LinearBaseline:
    """Orthogonal Procrustes between the whitened top-``k`` PCA spaces of the two sides.

    Each side is centred, projected onto its top ``k`` principal axes and whitened (eigenvalues
    floored by ``eps * mean eigenvalue``). The orthogonal ``R`` minimising ``‖X R − Y‖`` over the
    training pairs (``X`` images, ``Y`` captions, both whitened) is ``U Vᵀ`` from the SVD of
    ``XᵀY``. The shared space is the captions' whitened PCA space: images are mapped by the PCA,
    whitening and ``R``; captions by their PCA and whitening only.

    Args:
      image: ``[N, Di]`` float array (numpy, JAX or memory-mapped), one row per unique image.
      text: ``[R, Dt]`` float array, one row per caption; the training pairs are its rows.
      row_image: ``[R]`` integer array; caption ``r`` is paired with ``image[row_image[r]]``.
      k: PCA dimension of both sides; capped at ``min(Di, Dt, R)``.
      eps: whitening floor, in units of each side's mean eigenvalue.
      chunk_rows: caption rows per accumulation chunk.

    Returns:
      A :class:`LinearBaseline` named ``"Procrustes-<k>"``.

    Example:
      >>> b = fit_procrustes(img_NxDi, txt_RxDt, row_image_R, k=64)
      >>> b.project_images(val_img).shape  # [N_val, 64]
    """

    def fit():
        moments = _pair_moments(image, text, row_image, chunk_rows)
        return _procrustes_from_moments(moments, _cap_dims([k], moments)[0], eps)

    return _timed(fit)


# ----------------------------------------------------------------------------- search and report


def _search(
    candidate: Callable[[Any], LinearBaseline],
    refit: Callable[[Any], LinearBaseline],
    values: Sequence,
    val, test, ks, moment_seconds: float,
) -> dict:
    """Pick the value with the best validation r1; score the winner on val and test."""
    val_metrics = [score_baseline(candidate(v), *val, ks=ks) for v in values]
    # np.argmax takes the first of equal scores: ties go to the earlier grid value.
    best = int(np.argmax([m["r1"] for m in val_metrics]))
    # Timed again from warm moments so the figure is one fit, not the whole search.
    baseline = _timed(lambda: refit(values[best]))
    key = next(iter(baseline.param))
    return {
        "name": baseline.name,
        "param": dict(baseline.param),
        "fit_seconds": moment_seconds + baseline.fit_seconds,
        "val": val_metrics[best],
        "test": None if test is None else score_baseline(baseline, *test, ks=ks),
        "search": [{"param": {key: v}, "val_r1": m["r1"]} for v, m in zip(values, val_metrics)],
    }


def _device_set(split):
    return (
        jnp.asarray(split.image, dtype=jnp.float32),
        jnp.asarray(split.text, dtype=jnp.float32),
        np.asarray(split.row_image),
    )


def compute_baselines(
    train, val, test=None, ks: Sequence[int] = (1, 5, 10), *,
    ridge_lambdas: Sequence[float] = RIDGE_LAMBDAS,
    dims: Sequence[int] = SUBSPACE_DIMS,
    eps: float = DEFAULT_EPS,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
) -> list[dict]:
    """Fit every closed-form baseline on ``train``, tune it on ``val``, score it on ``test``.

    Baselines: ridge in both directions (``lambda`` from ``ridge_lambdas``), CCA and Procrustes
    (``k`` from ``dims``, capped at ``min(Di, Dt, train rows)``). Hyperparameters are chosen by
    validation ``r1`` only; the test set is scored once, with the chosen value. The training
    moments are computed once and shared by every fit.

    Args:
      train: any object with attributes ``image`` ``[N, Di]``, ``text`` ``[R, Dt]`` and
        ``row_image`` ``[R]`` (arrays may be memory-mapped).
      val: the same kind of object, used to choose hyperparameters.
      test: optional, the same kind of object, scored with the chosen hyperparameters.
      ks: the cut-offs K for Recall@K.
      ridge_lambdas: relative ridge strengths to try (see :func:`fit_ridge`).
      dims: shared-space sizes to try for CCA and Procrustes.
      eps: relative covariance ridge / whitening floor for CCA and Procrustes.
      chunk_rows: caption rows per accumulation chunk.

    Returns:
      One dict per baseline, in the order ridge t→i, ridge i→t, CCA, Procrustes::

        {"name": "CCA-128", "param": {"k": 128}, "fit_seconds": float,
         "val": metrics dict, "test": metrics dict or None,
         "search": [{"param": {"k": 32}, "val_r1": float}, ...]}

      ``fit_seconds`` is the wall time of one fit with the chosen value: the shared moment
      sweep (including its one-off compilation) plus that baseline's own factorizations.

    Example:
      >>> results = compute_baselines(train_set, val_set, test_set)
      >>> print(format_baselines(results))
    """
    start = time.perf_counter()
    moments = _pair_moments(train.image, train.text, train.row_image, chunk_rows)
    jax.block_until_ready(moments[:5])
    moment_seconds = time.perf_counter() - start

    val_set = _device_set(val)
    test_set = None if test is None else _device_set(test)
    lambdas = [float(lam) for lam in ridge_lambdas]
    subspace_dims = _cap_dims(dims, moments)
    eig_image = _eig_descending(moments.cov_image_DixDi)
    eig_text = _eig_descending(moments.cov_text_DtxDt)
    cca_directions = _cca_directions(moments.cov_cross_DixDt, eig_image, eig_text, eps)

    def search(candidate, refit, values):
        return _search(candidate, refit, values, val_set, test_set, ks, moment_seconds)

    results = []
    for direction in _DIRECTIONS:
        ridge = functools.partial(_ridge_from_moments, moments, direction)
        results.append(search(ridge, ridge, lambdas))
    results.append(search(
        lambda k: _cca_select(moments, cca_directions, k),
        lambda k: _cca_from_moments(moments, k, eps),
        subspace_dims,
    ))
    results.append(search(
        lambda k: _procrustes_from_moments(moments, k, eps, eig_image, eig_text),
        lambda k: _procrustes_from_moments(moments, k, eps),
        subspace_dims,
    ))
    return results


def best_baseline(results: Sequence[dict]) -> dict:
    """The result with the highest validation ``r1`` (the first one on a tie).

    Args:
      results: the list returned by :func:`compute_baselines`.

    Returns:
      One of its dicts.

    Example:
      >>> best_baseline(compute_baselines(train_set, val_set))["name"]
    """
    if not results:
        raise ValueError("no baseline results to choose from")
    return max(results, key=lambda r: r["val"]["r1"])


def _param_text(param: dict) -> str:
    return ", ".join(f"{key}={value:g}" for key, value in param.items())


def format_baselines(results: Sequence[dict]) -> str:
    """Render baseline results as a fixed-width table for terminals and logs.

    Args:
      results: the list returned by :func:`compute_baselines`.

    Returns:
      Two header lines, then one line per baseline: name, chosen parameter, fit wall time and,
      for val and test, Recall@K in percent both ways (``-`` where there is no test set).

    Example:
      >>> print(format_baselines(results))
    """
    ks = sorted(
        {int(key.split("@", 1)[1]) for r in results for key in r["val"]
         if key.startswith("i2t_recall@")}
    )
    width = 6
    block = width * len(ks)

    def cells(metrics, direction):
        if metrics is None:
            return "".join(f"{'-':>{width}}" for _ in ks)
        return "".join(f"{100 * metrics[f'{direction}_recall@{k}']:>{width}.1f}" for k in ks)

    groups = "".join(
        f" |{split + ' ' + direction:>{block}}"
        for split in ("val", "test") for direction in ("i2t", "t2i")
    )
    recall_names = "".join(f"{'R@' + str(k):>{width}}" for k in ks)
    lines = [
        f"{'':<16}{'':<16}{'':>8}{groups}",
        f"{'baseline':<16}{'param':<16}{'fit s':>8}" + f" |{recall_names}" * 4,
    ]
    for r in results:
        row = f"{r['name']:<16}{_param_text(r['param']):<16}{r['fit_seconds']:>8.2f}"
        for split in ("val", "test"):
            for direction in ("i2t", "t2i"):
                row += " |" + cells(r[split], direction)
        lines.append(row)
    return "\n".join(lines)


# ----------------------------------------------------------------------------- a warm start for heads


def cca_head_params(head_type: str, output_dim: int, image, text, row_image, default_params: dict, *,
                    eps: float = DEFAULT_EPS, chunk_rows: int = DEFAULT_CHUNK_ROWS) -> dict:
    """The parameters of a ``linear`` or ``siglip`` head pair whose projections start from the CCA
    solution of the training pairs (``init: cca``), so that epoch 0 already ranks as CCA does.

    The first ``min(output_dim, Di, Dt)`` output columns are the top canonical directions, each
    side scaled by the correlations as in :func:`fit_cca`, then all together to the size of the
    default (PyTorch) initialisation, which keeps the first steps' gradients where they would be;
    further columns keep their default values. The linear head's bias subtracts the training
    mean; the siglip head works on LayerNorm'd rows, so its CCA is fitted on standardized rows and
    its LayerNorm bias subtracts their mean.

    Args:
      head_type: ``linear`` or ``siglip``. output_dim: the head's output size.
      image, text, row_image: the training set (as for :func:`fit_cca`).
      default_params: ``{"image": …, "text": …}`` freshly initialised params of the pair (host arrays).

    Returns:
      ``{"image": …, "text": …}`` with the same structure, as numpy arrays.
    """
    if head_type not in ("linear", "siglip"):
        raise ValueError(f"init cca is for linear and siglip heads, not {head_type!r}")
    moments = _pair_moments(image, text, row_image, chunk_rows, standardize_rows=head_type == "siglip")
    k = _cap_dims([output_dim], moments)[0]
    directions = _cca_directions(moments.cov_cross_DixDt, _eig_descending(moments.cov_image_DixDi),
                                 _eig_descending(moments.cov_text_DtxDt), eps)
    cca = _cca_select(moments, directions, k)
    out = jax.tree.map(lambda x: np.array(x, dtype=np.float32), default_params)
    for side, mean_D, map_DxK in (("image", cca.image_mean, cca.image_map), ("text", cca.text_mean, cca.text_map)):
        map_DxK = np.array(map_DxK, np.float32)
        # The default init draws U(±1/√in) per weight: a column's expected squared norm is 1/3.
        map_DxK *= np.sqrt(k / 3.0) / max(float(np.linalg.norm(map_DxK)), 1e-12)
        dense = out[side]["Dense_0"]
        dense["kernel"][:, :k] = map_DxK
        mean_D = np.asarray(mean_D, np.float32)
        if head_type == "linear":
            dense["bias"][:k] = -mean_D @ map_DxK
        else:
            out[side]["LayerNorm_0"]["bias"][:] = -mean_D
    return out


# ----------------------------------------------------------------------------- command line


def _load_config(path):
    from xclip_jax.config import load_train_config, read_yaml
    from xclip_jax.tune_config import load_tune_config

    raw = read_yaml(path)
    return load_tune_config(path) if {"search_space", "study_name", "n_trials"} & set(raw) else load_train_config(path)


def main(argv=None):
    """``python -m xclip_jax.baselines CONFIG`` (a training or tuning config) prints the baselines'
    table; ``--cache DIR --out FILE`` (what a tuning study runs) reads a driver's data cache and
    writes the results as JSON."""
    import argparse
    import json
    from pathlib import Path

    from xclip_jax import data

    parser = argparse.ArgumentParser(prog="python -m xclip_jax.baselines", description=main.__doc__.split("\n")[0])
    parser.add_argument("config", nargs="?", help="a training or tuning YAML (its data section is used)")
    parser.add_argument("--cache", help="a tuning driver's data cache folder, instead of a config")
    parser.add_argument("--out", help="also write the results as JSON here")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    args = parser.parse_args(argv)
    if args.cache:
        splits = data.cached_splits(Path(args.cache))
        sets = data.read_cache(Path(args.cache), splits=splits)
    elif args.config:
        cfg = _load_config(args.config)
        sets = data.load_sets(cfg.data, cfg.base_data_dir)
    else:
        parser.error("give a config, or --cache DIR")
    results = compute_baselines(sets["train"], sets["val"], sets.get("test"))
    print(format_baselines(results))
    if args.out:
        tmp = Path(args.out).with_suffix(".tmp")
        tmp.write_text(json.dumps(jax.tree.map(lambda x: float(x) if isinstance(x, np.floating) else x, results),
                                  indent=2))
        tmp.replace(args.out)
    return 0


if __name__ == "__main__":
    from xclip_jax.errors import cli

    raise SystemExit(cli(main)())
