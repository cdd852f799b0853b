"""Rows grouped by image id, in first-occurrence order: the one implementation that the data sets and
the metrics share (numpy only)."""

from __future__ import annotations

from collections.abc import Hashable

import numpy as np


def group_first_occurrence(keys) -> tuple[np.ndarray, np.ndarray]:
    """Group equal keys. Returns (the first row of each group, the group index of each row).

    Groups are numbered in order of first occurrence, not in sorted key order, so that de-duplicated
    images follow the data's order. Keys are ints or strings (a numpy array or a list), or any
    hashables (tuples, mixed objects).

    Example:
      >>> group_first_occurrence(np.array([7, 3, 7, 9]))
      (array([0, 1, 3]), array([0, 1, 0, 2], dtype=int32))
    """
    arr = keys if isinstance(keys, np.ndarray) else np.asarray(keys)
    if arr.ndim == 1 and arr.dtype.kind in "iubUS":
        _, first, inverse = np.unique(arr, return_index=True, return_inverse=True)
        order = np.argsort(first, kind="stable")
        rank = np.empty_like(order)
        rank[order] = np.arange(order.size)
        return first[order], rank[inverse.ravel()].astype(np.int32)
    index: dict[Hashable, int] = {}
    first_rows = []
    group = np.empty(len(keys), dtype=np.int32)
    for row, key in enumerate(keys):
        j = index.setdefault(key, len(index))
        if j == len(first_rows):
            first_rows.append(row)
        group[row] = j
    return np.asarray(first_rows, dtype=np.int64), group
