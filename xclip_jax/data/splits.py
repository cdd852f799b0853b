"""Image-level train/test splits and the fixed tuning subset."""

from __future__ import annotations

import numpy as np

from xclip_jax.errors import UserError
from xclip_jax.spec import key_seed

# --------------------------------------------------------------------------------------------
# Splits


def split_train_test(image_ids, test_ratio: float = 0.2, seed: int = 42) -> tuple[np.ndarray, np.ndarray]:
    """Image-level split of rows: every caption of an image lands on the same side.

    Args:
      image_ids: ``[rows]`` image id per row.
      test_ratio: fraction of unique images that go to test (rounded, at least one per side).
      seed: the split depends only on the seed and the set of ids, not on row order.

    Returns:
      (train_row_idx, test_row_idx), each sorted.
    """
    if not 0.0 < test_ratio < 1.0:
        raise UserError(f"test_ratio {test_ratio}: must be between 0 and 1 (exclusive), e.g. 0.2")
    image_ids = np.asarray(image_ids)
    unique = np.unique(image_ids)  # sorted, so the split does not depend on row order
    if unique.size < 2:
        raise UserError(f"the set has {unique.size} distinct image id(s); a train/test split needs at least 2")
    n_test = min(max(1, round(test_ratio * unique.size)), unique.size - 1)
    test_ids = np.random.default_rng(key_seed(seed)).permutation(unique)[:n_test]
    is_test = np.isin(image_ids, test_ids)
    return np.flatnonzero(~is_test), np.flatnonzero(is_test)


def tuning_subset(n_rows: int, size: int = 100_000, seed: int = 42) -> np.ndarray:
    """Sorted indices of a fixed random subset of ``size`` rows (all rows if n_rows <= size)."""
    if size < 1:
        raise UserError(f"tuning subset size {size}: must be at least 1, e.g. 100000")
    if n_rows <= size:
        return np.arange(n_rows)
    return np.sort(np.random.default_rng(key_seed(seed)).choice(n_rows, size=size, replace=False))
