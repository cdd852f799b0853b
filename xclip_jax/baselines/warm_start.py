"""The heads' warm start (``init: cca``): a linear or siglip head pair whose projections start from the
CCA solution of the training pairs. It writes into the heads' parameters by Flax's automatic layer
names (``Dense_0``, ``LayerNorm_0``), so it lives apart from the fits it uses."""

from __future__ import annotations

import jax
import numpy as np

from xclip_jax.baselines.fits import DEFAULT_EPS, cca_directions, cca_select, eig_descending
from xclip_jax.baselines.moments import DEFAULT_CHUNK_ROWS, cap_dims, pair_moments


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
    moments = pair_moments(image, text, row_image, chunk_rows, standardize_rows=head_type == "siglip")
    k = cap_dims([output_dim], moments)[0]
    directions = cca_directions(moments.cov_cross_DixDt, eig_descending(moments.cov_image_DixDi),
                                 eig_descending(moments.cov_text_DtxDt), eps)
    cca = cca_select(moments, directions, k)
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

