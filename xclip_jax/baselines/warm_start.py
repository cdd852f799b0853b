"""The heads' warm start (``init: cca``): a linear or siglip head pair whose projections start from the
CCA solution of the training pairs. It writes into the heads' parameters by their layer names
(``Dense_0``, ``LayerNorm_0``), so it lives apart from the fits it uses.

The CCA solution of a training set is deterministic: :func:`cca_start` computes it once per (head
type, output dim), and a caller may keep it for every later trial. :func:`apply_cca_start` writes it
into one trial's own freshly initialised params, whose other values (the columns past the CCA
directions, the linear head's bias there) stay that trial's own random draws.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from xclip_jax.baselines.fits import DEFAULT_EPS, cca_directions, cca_select, eig_descending
from xclip_jax.baselines.moments import DEFAULT_CHUNK_ROWS, cap_dims, pair_moments


@dataclasses.dataclass(frozen=True)
class CcaStart:
    """What ``init: cca`` writes into a head pair: per side the first ``k`` output columns of the
    projection (the scaled canonical directions) and what the head subtracts (a linear head's
    bias, a siglip head's LayerNorm bias).

    Attributes:
      head_type: ``linear`` or ``siglip``. k: the columns written.
      maps: ``{"image": [Di, k], "text": [Dt, k]}``. shifts: ``{"image": [k] or [Di], "text": …}``:
        the linear head's bias of those columns, or the siglip head's LayerNorm bias.
    """

    head_type: str
    k: int
    maps: dict
    shifts: dict


def cca_start(head_type: str, output_dim: int, image, text, row_image, *, eps: float = DEFAULT_EPS,
              chunk_rows: int = DEFAULT_CHUNK_ROWS) -> CcaStart:
    """The CCA warm start of a ``linear`` or ``siglip`` head pair of ``output_dim`` on a training set.

    The first ``k = min(output_dim, Di, Dt)`` output columns are the top canonical directions, each
    side scaled by the correlations as in :func:`fit_cca`, then all together to the size of the
    default (PyTorch) initialisation, which keeps the first steps' gradients where they would be.
    The linear head's bias subtracts the training mean; the siglip head works on LayerNorm'd rows,
    so its CCA is fitted on standardized rows and its LayerNorm bias subtracts their mean.

    Args:
      head_type: ``linear`` or ``siglip``. output_dim: the head's output size.
      image, text, row_image: the training set (as for :func:`fit_cca`).
    """
    if head_type not in ("linear", "siglip"):
        raise ValueError(f"init cca is for linear and siglip heads, not {head_type!r}")
    moments = pair_moments(image, text, row_image, chunk_rows, standardize_rows=head_type == "siglip")
    k = cap_dims([output_dim], moments)[0]
    directions = cca_directions(moments.cov_cross_DixDt, eig_descending(moments.cov_image_DixDi),
                                 eig_descending(moments.cov_text_DtxDt), eps)
    cca = cca_select(moments, directions, k)
    maps, shifts = {}, {}
    for side, mean_D, map_DxK in (("image", cca.image_mean, cca.image_map), ("text", cca.text_mean, cca.text_map)):
        map_DxK = np.array(map_DxK, np.float32)
        # The default init draws U(±1/√in) per weight: a column's expected squared norm is 1/3.
        map_DxK *= np.sqrt(k / 3.0) / max(float(np.linalg.norm(map_DxK)), 1e-12)
        mean_D = np.asarray(mean_D, np.float32)
        maps[side] = map_DxK
        shifts[side] = -mean_D @ map_DxK if head_type == "linear" else -mean_D
    return CcaStart(head_type, k, maps, shifts)


def apply_cca_start(start: CcaStart, default_params: dict) -> dict:
    """One head pair's params ``{"image": …, "text": …}`` (host or device arrays) with the CCA start
    written in; every other value is the pair's own. Returns numpy arrays of the same structure."""
    out = jax.tree.map(lambda x: np.array(x, dtype=np.float32), default_params)
    for side in ("image", "text"):
        dense = out[side]["Dense_0"]
        dense["kernel"][:, : start.k] = start.maps[side]
        if start.head_type == "linear":
            dense["bias"][: start.k] = start.shifts[side]
        else:
            out[side]["LayerNorm_0"]["bias"][:] = start.shifts[side]
    return out



def with_head_init(state, heads: list, train_set, cache: dict | None = None):
    """A fresh train state (one trial, or a bundle's stacked states with one HeadSpec per member) with
    each member whose head says ``init: cca`` starting from the CCA solution of the training set
    (:func:`cca_start`), written into that member's own initial params: everything else (the columns
    past the CCA directions, a bias there) stays the member's own random draw. ``cache`` keeps the
    solutions, which are deterministic, by (head type, output dim)."""
    use = [h.init == "cca" for h in heads]
    if not any(use):
        return state
    stacked = np.ndim(state.step) == 1
    default = jax.device_get({"image": state.params["image"], "text": state.params["text"]})
    members = [jax.tree.map(lambda x, i=i: x[i], default) for i in range(len(heads))] if stacked else [default]
    cache = {} if cache is None else cache
    for i, head in enumerate(heads):
        if not use[i]:
            continue
        key = (head.type, head.output_dim)
        if key not in cache:
            cache[key] = cca_start(head.type, head.output_dim, train_set.image, train_set.text, train_set.row_image)
        members[i] = apply_cca_start(cache[key], members[i])
    params = jax.tree.map(lambda *m: np.stack(m), *members) if stacked else members[0]
    return state.replace(params={**state.params, **jax.device_put(params)})
