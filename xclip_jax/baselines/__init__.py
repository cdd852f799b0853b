"""Closed-form linear retrieval baselines: ridge, CCA and Procrustes on embedding pairs.

A baseline maps each modality linearly into a shared space; retrieval then ranks by cosine
similarity there (:func:`xclip_jax.metrics.retrieval_metrics_indexed` on L2-normalised rows).
They tell what a trained projection head adds over the best linear map that needs no training.

Training pairs are caption rows: row ``r`` pairs ``image[row_image[r]]`` with ``text[r]``, so an
image with five captions counts five times, as it does when a head trains on the same rows.

Every fit needs only the pair moments (``moments``): one sweep over the training rows, after which
each baseline is a few dense ``D x D`` factorizations (``fits``). No ``rows x rows`` matrix is ever
formed, and every hyperparameter candidate reuses the same moments (and, for CCA, the same SVD);
``search`` chooses each on the validation set and draws the table, ``warm_start`` starts heads from
CCA (``init: cca``), ``cli`` is ``python -m xclip_jax.baselines``.

The numeric core imports only numpy, JAX and :mod:`xclip_jax.metrics` (the command line also reads
configs and data).
"""

from xclip_jax.baselines.fits import (
    DEFAULT_EPS,
    RIDGE_LAMBDAS,
    LinearBaseline,
    fit_cca,
    fit_procrustes,
    fit_ridge,
    score_baseline,
)
from xclip_jax.baselines.search import SUBSPACE_DIMS, best_baseline, compute_baselines, format_baselines
from xclip_jax.baselines.warm_start import CcaStart, apply_cca_start, cca_start, with_head_init

__all__ = [
    "CcaStart",
    "DEFAULT_EPS",
    "RIDGE_LAMBDAS",
    "SUBSPACE_DIMS",
    "LinearBaseline",
    "best_baseline",
    "apply_cca_start",
    "cca_start",
    "compute_baselines",
    "fit_cca",
    "fit_procrustes",
    "fit_ridge",
    "format_baselines",
    "score_baseline",
    "with_head_init",
]
