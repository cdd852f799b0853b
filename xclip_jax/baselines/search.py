"""Choosing each baseline's hyperparameter on the validation set, scoring the choice on the test set,
and the table; one moments pass serves every fit and every candidate."""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from xclip_jax.baselines.fits import (
    DEFAULT_EPS,
    DIRECTIONS,
    RIDGE_LAMBDAS,
    LinearBaseline,
    cca_directions,
    cca_from_moments,
    cca_select,
    eig_descending,
    procrustes_from_moments,
    ridge_from_moments,
    score_baseline,
    timed,
)
from xclip_jax.baselines.moments import DEFAULT_CHUNK_ROWS, cap_dims, pair_moments

# Shared-space sizes tried by CCA and Procrustes, each capped at min(Di, Dt, rows).
SUBSPACE_DIMS = (32, 64, 128, 256)

# ----------------------------------------------------------------------------- search and report


# A choice at an end of its grid may be beaten beyond it: the grid is extended past that end, at most
# this many times, before the choice is reported as sitting at an edge.
MAX_GRID_EXTENSIONS = 3


def _search(
    candidate: Callable[[Any], LinearBaseline],
    refit: Callable[[Any], LinearBaseline],
    values: Sequence,
    val, test, ks, moment_seconds: float,
    beyond: Callable[[list, str], list] | None = None,
) -> dict:
    """Pick the value with the best validation r1; score the winner on val and test.

    While the best value is the first or last tried and ``beyond(values, "low"|"high")`` names
    further values past that end, those are tried too. The result's ``edge`` says at which end of
    what was tried the choice still sits (None inside the grid).
    """
    values, scored = list(values), {}
    for extension in range(MAX_GRID_EXTENSIONS + 1):
        for v in values:
            if v not in scored:
                scored[v] = score_baseline(candidate(v), *val, ks=ks)
        # np.argmax takes the first of equal scores: ties go to the earlier grid value.
        best = int(np.argmax([scored[v]["r1"] for v in values]))
        edge = None if len(values) < 2 else "low" if best == 0 else "high" if best == len(values) - 1 else None
        more = beyond(values, edge) if edge and beyond and extension < MAX_GRID_EXTENSIONS else []
        if not more:
            break
        values = sorted(set(values) | set(more))
    # Timed again from warm moments so the figure is one fit, not the whole search.
    baseline = timed(lambda: refit(values[best]))
    key = next(iter(baseline.param))
    return {
        "name": baseline.name,
        "param": dict(baseline.param),
        "fit_seconds": moment_seconds + baseline.fit_seconds,
        "val": scored[values[best]],
        "test": None if test is None else score_baseline(baseline, *test, ks=ks),
        "search": [{"param": {key: v}, "val_r1": scored[v]["r1"]} for v in values],
        "edge": edge,
    }


def _beyond_lambdas(values: list, end: str) -> list:
    return [values[0] / 10] if end == "low" else [values[-1] * 10]


def _beyond_dims(cap: int):
    def beyond(values: list, end: str) -> list:
        if end == "low":
            return [values[0] // 2] if values[0] > 1 else []
        return [min(values[-1] * 2, cap)] if values[-1] < cap else []

    return beyond


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
    moments = pair_moments(train.image, train.text, train.row_image, chunk_rows)
    jax.block_until_ready(moments[:5])
    moment_seconds = time.perf_counter() - start

    val_set = _device_set(val)
    test_set = None if test is None else _device_set(test)
    lambdas = [float(lam) for lam in ridge_lambdas]
    subspace_dims = cap_dims(dims, moments)
    eig_image = eig_descending(moments.cov_image_DixDi)
    eig_text = eig_descending(moments.cov_text_DtxDt)
    directions = cca_directions(moments.cov_cross_DixDt, eig_image, eig_text, eps)
    dims_beyond = _beyond_dims(cap_dims([2**62], moments)[0])

    def search(candidate, refit, values, beyond):
        return _search(candidate, refit, values, val_set, test_set, ks, moment_seconds, beyond)

    results = []
    for direction in DIRECTIONS:
        ridge = functools.partial(ridge_from_moments, moments, direction)
        results.append(search(ridge, ridge, lambdas, _beyond_lambdas))
    results.append(search(
        lambda k: cca_select(moments, directions, k),
        lambda k: cca_from_moments(moments, k, eps),
        subspace_dims, dims_beyond,
    ))
    results.append(search(
        lambda k: procrustes_from_moments(moments, k, eps, eig_image, eig_text),
        lambda k: procrustes_from_moments(moments, k, eps),
        subspace_dims, dims_beyond,
    ))
    cap = cap_dims([2**62], moments)[0]
    for result in results[2:]:
        if result["edge"] == "high" and result["param"]["k"] == cap:
            result["edge"] = "limit"  # every dimension the data have: nothing beyond to try
    return results


def edge_notes(results: Sequence[dict]) -> list[str]:
    """One line per baseline whose choice sits at an end of the values tried (after extending the
    grid past it), so the reader knows the best may lie beyond."""
    notes = []
    for r in results:
        key, value = next(iter(r["param"].items()))
        tried = [entry["param"][key] for entry in r.get("search", [])]
        if r.get("edge") == "limit":
            notes.append(f"note: {r['name']} uses k = {value:g}, every dimension the data allow (min of the two "
                         "input dims and the rows)")
        elif r.get("edge") in ("low", "high"):
            which = "smallest" if r["edge"] == "low" else "largest"
            notes.append(f"note: {r['name']} chose {key} = {value:g}, the {which} of {', '.join(f'{v:g}' for v in tried)}"
                         " (the grid was extended that way and the choice stayed at its end); a better value may lie "
                         "beyond")
    return notes


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
      for val and test, Recall@K in percent both ways (``-`` where there is no test set); then a
      note for each choice at an edge of its grid (``edge_notes``).

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
    return "\n".join(lines + edge_notes(results))

