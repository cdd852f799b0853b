"""The in-memory embedding set: each image once, rows mapped to images, validated on the way in.

An embedding set keeps every image once and maps rows to images with ``row_image``; evaluation
needs the de-duplicated images anyway, and the training data shrink by the captions-per-image
factor. Every problem with the user's data raises :class:`~xclip_jax.errors.UserError` with one
line that names the data, the problem and the fix.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from xclip_jax.errors import UserError, warn
from xclip_jax.ids import group_first_occurrence

# Scans and copies go through arrays this many bytes at a time, so a memory-mapped 10 GB file
# never turns into a 10 GB temporary.
_CHUNK_BYTES = 64 << 20


def _row_chunks(n_rows: int, dim: int):
    """Yield slices that cover n_rows rows of width dim, each at most about _CHUNK_BYTES."""
    step = max(1, _CHUNK_BYTES // max(1, 4 * dim))
    for start in range(0, n_rows, step):
        yield slice(start, min(start + step, n_rows))


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text or type(error).__name__


# --------------------------------------------------------------------------------------------
# The in-memory set


@dataclasses.dataclass(frozen=True, eq=False)
class EmbeddingSet:
    """One embedding set with each image stored once.

    Attributes:
      name: set name, used in messages (``train``, ``val2017``, ...).
      image: ``[n_images, image_dim]`` float32, one row per unique image, in order of first
        occurrence among the rows.
      text: ``[rows, text_dim]`` float32, one row per caption. May be a read-only memory map.
      row_image: ``[rows]`` int32 index into ``image`` for each row. It doubles as a compact
        per-row image id for losses (equal value = same image = positive pair).
      image_ids: ``[n_images]`` the original ids from the metadata (int or str array).
      sources: the files it was read from (image, text, metadata), empty when built in memory.

    Build one with :func:`from_rows`, :func:`load_embedding_set` or :func:`load_named_set`;
    they validate the data. (``eq=False``: comparing sets array-by-array is never meant.)
    """

    name: str
    image: np.ndarray
    text: np.ndarray
    row_image: np.ndarray
    image_ids: np.ndarray
    sources: tuple[str, ...] = ()

    def __post_init__(self):
        # Internal invariants only; user data is validated (with friendly messages) by from_rows.
        if self.text.shape[0] != self.row_image.shape[0]:
            raise ValueError(f"{self.name}: {self.text.shape[0]} text rows, {self.row_image.shape[0]} row_image")
        if self.image.shape[0] != self.image_ids.shape[0]:
            raise ValueError(f"{self.name}: {self.image.shape[0]} images, {self.image_ids.shape[0]} image_ids")

    @property
    def rows(self) -> int:
        """Number of (image, caption) rows."""
        return int(self.text.shape[0])

    @property
    def n_images(self) -> int:
        """Number of unique images."""
        return int(self.image.shape[0])

    @property
    def image_dim(self) -> int:
        """Width of the image embeddings."""
        return int(self.image.shape[1])

    @property
    def text_dim(self) -> int:
        """Width of the text embeddings."""
        return int(self.text.shape[1])

    def image_rows(self) -> np.ndarray:
        """The row-level image array ``[rows, image_dim]`` (``image[row_image]``), as on disk."""
        return self.image[self.row_image]

    def subset_rows(self, rows_idx, name: str) -> EmbeddingSet:
        """A new set holding only the given rows (int indices or a boolean mask).

        Images that no selected row refers to are dropped; the rest keep their
        first-occurrence order within the subset.
        """
        rows_idx = np.asarray(rows_idx)
        if rows_idx.dtype == bool:
            rows_idx = np.flatnonzero(rows_idx)
        images_used, row_image = group_first_occurrence(self.row_image[rows_idx])
        kept = self.row_image[rows_idx][images_used]
        return EmbeddingSet(
            name=name,
            image=self.image[kept],
            text=np.asarray(self.text[rows_idx]),
            row_image=row_image,
            image_ids=self.image_ids[kept],
        )


# --------------------------------------------------------------------------------------------
# Validation (labels are file names when reading files, "set 'NAME' ..." otherwise)


def _check_matrix(array: np.ndarray, label: str) -> None:
    """2-D, non-empty, floating point: the checks that need no pass over the data."""
    if array.ndim != 2:
        raise UserError(
            f"{label}: expected a 2-D array [rows, dim], got shape {tuple(array.shape)}; "
            "save one embedding per row"
        )
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise UserError(f"{label}: empty array of shape {tuple(array.shape)}; re-export the embeddings")
    if not np.issubdtype(array.dtype, np.floating):
        raise UserError(
            f"{label}: dtype {array.dtype} is not floating point; embeddings must be float16/32/64 "
            "(were ids or tokens saved instead of embeddings?)"
        )


def _check_finite(array: np.ndarray, label: str) -> None:
    """Raise if any row holds NaN or Inf, saying how many rows and where the first one is."""
    bad_rows = []
    for chunk in _row_chunks(array.shape[0], array.shape[1]):
        bad = ~np.isfinite(array[chunk]).all(axis=1)
        if bad.any():
            bad_rows.append(np.flatnonzero(bad) + chunk.start)
    if bad_rows:
        bad_rows = np.concatenate(bad_rows)
        raise UserError(
            f"{label}: {bad_rows.size} rows contain NaN or Inf (first at row {bad_rows[0]}); "
            "re-export them, or drop those rows from the image, text and image_ids together"
        )


def _check_ids(ids, label: str) -> np.ndarray:
    """Turn a list of ids into a flat int or str numpy array, or raise."""
    array = np.asarray(ids)
    if array.ndim != 1 or array.dtype.kind not in "iuU":
        raise UserError(
            f"{label}: image_ids must be a flat list of integer or string ids, "
            f"got {array.ndim}-D {array.dtype} data; write one id per row"
        )
    return array


def _build(name, image_rows, text_rows, image_ids, image_label, text_label, ids_label) -> EmbeddingSet:
    """Validate row-level arrays and ids, then de-duplicate the images by id."""
    _check_matrix(image_rows, image_label)
    _check_matrix(text_rows, text_label)
    image_ids = _check_ids(image_ids, ids_label)
    n_image, n_text = image_rows.shape[0], text_rows.shape[0]
    if n_text != n_image:
        raise UserError(
            f"{text_label}: {n_text} rows but {image_label} has {n_image}; re-export both from the same run"
        )
    if image_ids.shape[0] != n_image:
        raise UserError(
            f"{ids_label}: {image_ids.shape[0]} image_ids but {image_label} has {n_image} rows; "
            "the metadata must list one image id per embedding row, in row order"
        )
    _check_finite(image_rows, image_label)
    _check_finite(text_rows, text_label)

    first, row_image = group_first_occurrence(image_ids)
    image = np.asarray(image_rows[first], dtype=np.float32)
    _warn_if_captions_disagree(image_rows, image, row_image, image_label)
    return EmbeddingSet(
        name=name,
        image=image,
        text=np.asarray(text_rows, dtype=np.float32),
        row_image=row_image,
        image_ids=image_ids[first],
    )


def _warn_if_captions_disagree(image_rows, image, row_image, label) -> None:
    # Only the first row of each image is kept; a warning (not an error) because differing rows
    # usually mean harmless float noise from re-encoding the same image.
    differing = 0
    for chunk in _row_chunks(image_rows.shape[0], image_rows.shape[1]):
        rows = np.asarray(image_rows[chunk], dtype=np.float32)
        differing += int(np.any(rows != image[row_image[chunk]], axis=1).sum())
    if differing:
        warn(f"{label}: {differing} rows differ from the first row with the same image id; "
             "using the first row of each image")


def from_rows(name: str, image_rows, text_rows, image_ids) -> EmbeddingSet:
    """Build a validated set from row-level arrays (one row per caption).

    Args:
      name: set name, used in error messages.
      image_rows: ``[rows, image_dim]`` float array; rows of the same image should be equal.
      text_rows: ``[rows, text_dim]`` float array.
      image_ids: ``[rows]`` int or str ids; equal ids mark captions of the same image.

    Returns:
      An :class:`EmbeddingSet` that keeps the first image row of each id.

    Raises:
      UserError: wrong shapes or dtypes, mismatched row counts, NaN/Inf rows.

    Example::

      s = from_rows("toy", np.ones((4, 8)), np.zeros((4, 6)), [7, 7, 9, 9])
      s.n_images, s.row_image   # 2, array([0, 0, 1, 1])
    """
    return _build(
        name,
        np.asarray(image_rows),
        np.asarray(text_rows),
        image_ids,
        f"set '{name}' image rows",
        f"set '{name}' text rows",
        f"set '{name}' image_ids",
    )


def source_line(eset: EmbeddingSet) -> str:
    """Where a set was read from, and its size: the line every command prints once per split."""
    origin = ", ".join(eset.sources) if eset.sources else "the built-in synthetic generator"
    return f"data: {eset.name} <- {origin}: {eset.rows:,} rows, {eset.n_images:,} images"


def check_disjoint(train: EmbeddingSet, other: EmbeddingSet) -> None:
    """Warn when ``other`` (a validation or test set) shares images with the training set."""
    if train.sources and train.sources == other.sources:
        warn(f"the {other.name} set is the training set (the same files: {train.sources[0]} ...): "
             f"{other.name} R@1 will be optimistic and early stopping meaningless; name other files")
        return
    shared = np.intersect1d(train.image_ids.astype(str), other.image_ids.astype(str)).size
    if shared:
        warn(f"the {other.name} set shares {shared:,} of its {other.n_images:,} images with the training set: "
             f"{other.name} R@1 will be optimistic; split at the image level (python -m xclip_jax.data split)")


def describe(eset: EmbeddingSet) -> str:
    """One line: name, rows, images, captions per image, dims."""
    per_image = np.bincount(eset.row_image, minlength=eset.n_images)
    caps = f"{per_image.min()}" if per_image.min() == per_image.max() else f"{per_image.min()}-{per_image.max()}"
    return (
        f"{eset.name}: {eset.rows:,} rows, {eset.n_images:,} images ({caps} captions each), "
        f"image_dim {eset.image_dim}, text_dim {eset.text_dim}"
    )
