"""The closed-form fits: ridge in both directions, CCA and orthogonal Procrustes after whitening,
each a few dense ``D x D`` factorizations of the pair moments (Cholesky solves for ridge, symmetric
eigendecompositions and one SVD for CCA and Procrustes), and the fitted map's retrieval score."""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from xclip_jax.baselines.moments import DEFAULT_CHUNK_ROWS, HIGHEST, Moments, cap_dims, pair_moments
from xclip_jax.metrics import retrieval_metrics_indexed

# Relative ridge strengths: lambda = value * trace(X^T X) / D, i.e. in units of the mean
# eigenvalue, so one grid fits embeddings of any scale or dimension.
RIDGE_LAMBDAS = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)
# Covariance ridge for CCA and the whitening floor for Procrustes, in units of the mean eigenvalue.
DEFAULT_EPS = 1e-3
DIRECTIONS = {"t2i": "ridge t→i", "i2t": "ridge i→t"}


# ----------------------------------------------------------------------------- fitted maps


def _project(x_NxD, mean_D, map_DxK):
    centred_NxD = jnp.asarray(x_NxD, jnp.float32) - mean_D
    if map_DxK is None:
        return centred_NxD
    return jnp.matmul(centred_NxD, map_DxK, precision=HIGHEST)


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


# ----------------------------------------------------------------------------- ridge


@jax.jit
def _ridge_solve(cov_xx_DxD, cov_xy_DxE, lam):
    d = cov_xx_DxD.shape[0]
    scaled = lam * jnp.trace(cov_xx_DxD) / d
    # The regularised covariance is positive definite: Cholesky is the cheap, stable solve.
    factor = jax.scipy.linalg.cho_factor(cov_xx_DxD + scaled * jnp.eye(d, dtype=jnp.float32))
    return jax.scipy.linalg.cho_solve(factor, cov_xy_DxE)


def ridge_from_moments(moments: Moments, direction: str, lam: float) -> LinearBaseline:
    if direction == "t2i":
        weights_DtxDi = _ridge_solve(moments.cov_text_DtxDt, moments.cov_cross_DixDt.T, lam)
        image_map, text_map = None, weights_DtxDi
    elif direction == "i2t":
        weights_DixDt = _ridge_solve(moments.cov_image_DixDi, moments.cov_cross_DixDt, lam)
        image_map, text_map = weights_DixDt, None
    else:
        raise ValueError(f"direction must be 't2i' or 'i2t', got {direction!r}")
    return LinearBaseline(
        DIRECTIONS[direction], {"lambda": float(lam)}, 0.0,
        moments.mean_image_Di, moments.mean_text_Dt, image_map, text_map,
    )


def timed(fit: Callable[[], LinearBaseline]) -> LinearBaseline:
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
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be 't2i' or 'i2t', got {direction!r}")
    return timed(lambda: ridge_from_moments(
        pair_moments(image, text, row_image, chunk_rows), direction, lam))


# ----------------------------------------------------------------------------- CCA, Procrustes


class _Eig(NamedTuple):
    values_D: jax.Array  # descending, clipped at 0
    vectors_DxD: jax.Array  # columns match values_D


@jax.jit
def eig_descending(cov_DxD):
    values_D, vectors_DxD = jnp.linalg.eigh(cov_DxD)
    # float32 eigh can return tiny negative eigenvalues for a rank-deficient covariance.
    return _Eig(jnp.maximum(values_D[::-1], 0.0), vectors_DxD[:, ::-1])


def _whitener(eig: _Eig, eps, k=None):
    """Columns ``v_j / sqrt(e_j + eps * mean(e))``: whitens the ridged covariance (first k)."""
    floor = eps * jnp.mean(eig.values_D)
    values, vectors = eig.values_D[:k], eig.vectors_DxD[:, :k]
    return vectors / jnp.sqrt(values + floor)


@jax.jit
def cca_directions(cov_cross_DixDt, eig_image, eig_text, eps):
    """All canonical directions (columns) and their regularised correlations, descending."""
    white_image_DixDi = _whitener(eig_image, eps)
    white_text_DtxDt = _whitener(eig_text, eps)
    whitened_cross_DixDt = jnp.matmul(
        jnp.matmul(white_image_DixDi.T, cov_cross_DixDt, precision=HIGHEST),
        white_text_DtxDt, precision=HIGHEST,
    )
    u_DixM, corr_M, vt_MxDt = jnp.linalg.svd(whitened_cross_DixDt, full_matrices=False)
    dirs_image_DixM = jnp.matmul(white_image_DixDi, u_DixM, precision=HIGHEST)
    dirs_text_DtxM = jnp.matmul(white_text_DtxDt, vt_MxDt.T, precision=HIGHEST)
    return dirs_image_DixM, dirs_text_DtxM, corr_M


def cca_select(moments: Moments, directions, k: int) -> LinearBaseline:
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


def cca_from_moments(moments: Moments, k: int, eps: float) -> LinearBaseline:
    directions = cca_directions(
        moments.cov_cross_DixDt, eig_descending(moments.cov_image_DixDi),
        eig_descending(moments.cov_text_DtxDt), eps,
    )
    return cca_select(moments, directions, k)


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
        moments = pair_moments(image, text, row_image, chunk_rows)
        return cca_from_moments(moments, cap_dims([k], moments)[0], eps)

    return timed(fit)


@functools.partial(jax.jit, static_argnames=("k",))
def _procrustes_maps(cov_cross_DixDt, eig_image, eig_text, eps, *, k):
    pca_image_Dixk = _whitener(eig_image, eps, k)
    pca_text_Dtxk = _whitener(eig_text, eps, k)
    cross_kxk = jnp.matmul(
        jnp.matmul(pca_image_Dixk.T, cov_cross_DixDt, precision=HIGHEST),
        pca_text_Dtxk, precision=HIGHEST,
    )
    # argmin over orthogonal R of ||X R - Y|| maximises trace(Rᵀ XᵀY): R = U Vᵀ.
    u_kxk, _, vt_kxk = jnp.linalg.svd(cross_kxk)
    rotation_kxk = jnp.matmul(u_kxk, vt_kxk, precision=HIGHEST)
    return jnp.matmul(pca_image_Dixk, rotation_kxk, precision=HIGHEST), pca_text_Dtxk


def procrustes_from_moments(moments, k, eps, eig_image=None, eig_text=None) -> LinearBaseline:
    if eig_image is None:
        eig_image = eig_descending(moments.cov_image_DixDi)
        eig_text = eig_descending(moments.cov_text_DtxDt)
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
        moments = pair_moments(image, text, row_image, chunk_rows)
        return procrustes_from_moments(moments, cap_dims([k], moments)[0], eps)

    return timed(fit)

