"""Embedding sets: loading, validation, splitting and a synthetic COCO-like generator.

An embedding set named NAME in a data folder is three files (SPEC §1):

* ``NAME_image_embeddings.{npy,safetensors,pt}`` — float ``[rows, image_dim]``
* ``NAME_text_embeddings.{npy,safetensors,pt}``  — float ``[rows, text_dim]``
* ``NAME_metadata.json`` — ``{"image_ids": [one id per row]}``

Rows with the same image id are captions of one image, so on disk the image array repeats each
image once per caption. In memory an :class:`EmbeddingSet` keeps every image once and maps rows
to images with ``row_image``; evaluation needs the de-duplicated images anyway, and the training
data shrinks by the captions-per-image factor.

Every problem with the user's files raises :class:`~xclip_jax.errors.UserError` with one line
that names the file, the problem and the fix, before anything is compiled.

Command line (``python -m xclip_jax.data SUBCOMMAND ...``): ``synth``, ``split``, ``convert``,
``check``; see ``--help``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np

from xclip_jax.errors import UserError, cli, warn

EXTENSIONS = (".npy", ".safetensors", ".pt")  # in order of preference when several exist
IMAGE_SUFFIX = "_image_embeddings"
TEXT_SUFFIX = "_text_embeddings"
METADATA_SUFFIX = "_metadata.json"

# Default noise of the synthetic generator. With it a closed-form ridge baseline (text -> image,
# 2,000 train images, 500 held-out images x 5 captions, cosine retrieval) gets image->text R@1
# of about 0.5: learnable, far from both chance and 1.0. tests/test_data.py keeps it there.
DEFAULT_NOISE = 1.75

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
        images_used, row_image = _group_first_occurrence(self.row_image[rows_idx])
        kept = self.row_image[rows_idx][images_used]
        return EmbeddingSet(
            name=name,
            image=self.image[kept],
            text=np.asarray(self.text[rows_idx]),
            row_image=row_image,
            image_ids=self.image_ids[kept],
        )


def _group_first_occurrence(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Group equal keys. Returns (first row of each group, group index of each row).

    Groups are numbered in order of first occurrence, not in sorted key order, so that the
    de-duplicated images follow the file's order.
    """
    _, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
    order = np.argsort(first, kind="stable")
    rank = np.empty_like(order)
    rank[order] = np.arange(order.size)
    return first[order], rank[inverse.ravel()].astype(np.int32)


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

    first, row_image = _group_first_occurrence(image_ids)
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


# --------------------------------------------------------------------------------------------
# Reading files


MAKE_IT = ("check the data folder and set name, or create the set with "
           "`python -m xclip_jax.data split` or `python -m xclip_jax.data synth`")


def find_file(data_dir, stem: str, fix: str = MAKE_IT) -> Path:
    """Return ``data_dir/stem`` plus the first of .npy, .safetensors, .pt that exists.

    Raises:
      UserError: none of them exists (the message lists what was looked for, then ``fix``).
    """
    data_dir = Path(data_dir)
    for ext in EXTENSIONS:
        candidate = data_dir / f"{stem}{ext}"
        if candidate.is_file():
            return candidate
    where = f"in {data_dir}" if data_dir.is_dir() else f"and the folder {data_dir} does not exist"
    raise UserError(f"{data_dir / stem}.*: not found (looked for {', '.join(EXTENSIONS)} {where}); {fix}")


def resolve_file(path, fix: str = MAKE_IT) -> Path:
    """The file that a configured embedding-file name reads, by one rule for every command.

    The converted ``.npy`` beside the named file wins (memory-mapped, no torch needed), so a config
    written for the original's ``.pt`` files reads what ``convert`` or ``split`` wrote; otherwise
    the named file; otherwise any supported extension of the same name.
    """
    path = Path(path)
    stem = path.name[: -len(path.suffix)] if path.suffix in EXTENSIONS else path.name
    npy = path.with_name(stem + ".npy")
    if npy.is_file():
        return npy
    if path.is_file():
        return path
    return find_file(path.parent, stem, fix)


def read_array(path) -> np.ndarray:
    """Read one embedding matrix as float32 ``[rows, dim]``.

    ``.npy`` is memory-mapped (and stays a read-only map when it is already float32);
    ``.safetensors`` must hold exactly one tensor; ``.pt`` needs PyTorch.

    Raises:
      UserError: missing or unreadable file, unknown extension, not 2-D, not floating point,
        a .pt file without PyTorch installed.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: file not found; check the path (supported: {', '.join(EXTENSIONS)})")
    readers = {".npy": _read_npy, ".safetensors": _read_safetensors, ".pt": _read_torch}
    if path.suffix not in readers:
        raise UserError(
            f"{path}: unsupported extension '{path.suffix}'; save embeddings as {', '.join(EXTENSIONS)}"
        )
    array = readers[path.suffix](path)
    if array.dtype.name == "bfloat16":  # safetensors hands bf16 over as an ml_dtypes type
        array = array.astype(np.float32)
    _check_matrix(array, str(path))
    return np.asarray(array, dtype=np.float32)


def _read_npy(path: Path) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise UserError(f"{path}: not a readable .npy array ({_one_line(e)}); re-save it with numpy.save") from e


def _read_safetensors(path: Path) -> np.ndarray:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            keys = list(f.keys())
            if len(keys) != 1:
                raise UserError(
                    f"{path}: holds {len(keys)} tensors ({', '.join(keys) or 'none'}), expected exactly one; "
                    "save the image and text embeddings in separate files, one tensor each"
                )
            return f.get_tensor(keys[0])
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{path}: not a readable safetensors file ({_one_line(e)}); re-export it") from e


def _read_torch(path: Path) -> np.ndarray:
    try:
        import torch
    except ImportError:
        raise UserError(
            f"{path}: reading .pt files needs PyTorch, which is not installed; "
            f"`pip install xclip_jax[torch]`, or convert once with `python -m xclip_jax.data convert {path.parent}` "
            "where torch is installed and use the .npy files"
        ) from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types (pickle, zip, RuntimeError) for bad files
        raise UserError(f"{path}: torch.load failed ({_one_line(e)}); re-save the tensor with torch.save") from e
    if isinstance(obj, dict):
        tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        if len(tensors) != 1:
            raise UserError(
                f"{path}: a dict with {len(tensors)} tensors ({', '.join(map(str, tensors)) or 'none'}), "
                "expected one tensor; save the embeddings alone with torch.save(tensor, path)"
            )
        (obj,) = tensors.values()
    if not isinstance(obj, torch.Tensor):
        raise UserError(
            f"{path}: holds a {type(obj).__name__}, not a tensor; save the embeddings with torch.save(tensor, path)"
        )
    tensor = obj.detach().cpu()
    if tensor.dtype == torch.bfloat16:  # numpy has no bfloat16
        tensor = tensor.float()
    return tensor.numpy()


def read_image_ids(path) -> np.ndarray:
    """Read ``{"image_ids": [...]}`` from a metadata JSON file (other keys are ignored).

    Raises:
      UserError: missing file, malformed JSON, no ``image_ids`` key, ids not a flat list.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(
            f"{path}: metadata file not found; it must be JSON {{\"image_ids\": [one id per row]}} "
            "next to the embedding files"
        )
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(
            f"{path}: not valid JSON ({_one_line(e)}); rewrite it as {{\"image_ids\": [one id per row]}}"
        ) from e
    if not isinstance(meta, dict) or "image_ids" not in meta:
        found = f"keys: {', '.join(map(str, meta))}" if isinstance(meta, dict) else f"a JSON {type(meta).__name__}"
        raise UserError(
            f"{path}: no key 'image_ids' (found {found or 'no keys'}); "
            "the metadata must be {\"image_ids\": [one id per row]}"
        )
    return _check_ids(meta["image_ids"], str(path))


def load_embedding_set(image_path, text_path, metadata_path, name: str | None = None,
                       fix: str = MAKE_IT) -> EmbeddingSet:
    """Load and validate one set from its three files.

    Embedding file names go through :func:`resolve_file`: a converted ``.npy`` beside a named
    ``.pt`` or ``.safetensors`` file is read instead, so a config written for the original's files
    keeps working (memory-mapped) after ``convert``.

    Args:
      image_path, text_path: embedding files (.npy, .safetensors or .pt).
      metadata_path: ``{"image_ids": [...]}`` JSON, one id per row.
      name: set name; defaults to the image file's name without ``_image_embeddings``.
      fix: what a missing-file message tells the user to do.

    Raises:
      UserError: any problem with the files, naming the file, the problem and the fix.
    """
    image_path, text_path = resolve_file(image_path, fix), resolve_file(text_path, fix)
    metadata_path = Path(metadata_path)
    if name is None:
        name = image_path.stem.removesuffix(IMAGE_SUFFIX)
    ids = read_image_ids(metadata_path)
    image_rows = read_array(image_path)
    text_rows = read_array(text_path)
    eset = _build(name, image_rows, text_rows, ids, str(image_path), str(text_path), str(metadata_path))
    return dataclasses.replace(eset, sources=(str(image_path), str(text_path), str(metadata_path)))


def load_named_set(data_dir, name: str, fix: str = MAKE_IT) -> EmbeddingSet:
    """Load set NAME from ``data_dir``: NAME_image_embeddings.*, NAME_text_embeddings.*, NAME_metadata.json."""
    data_dir = Path(data_dir)
    return load_embedding_set(
        find_file(data_dir, name + IMAGE_SUFFIX, fix),
        find_file(data_dir, name + TEXT_SUFFIX, fix),
        data_dir / f"{name}{METADATA_SUFFIX}",
        name=name,
        fix=fix,
    )


def _set_exists(data_dir: Path, name: str) -> bool:
    return any((data_dir / f"{name}{IMAGE_SUFFIX}{ext}").is_file() for ext in EXTENSIONS)


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


# --------------------------------------------------------------------------------------------
# Writing files


def _replace_atomically(path: Path, write) -> None:
    # Write beside the target, then rename: a crash leaves no half-written file, and a process
    # that still memory-maps the old file keeps reading the old contents.
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _write_npy(path: Path, n_rows: int, dim: int, fill) -> None:
    """Write a float32 [n_rows, dim] .npy chunk by chunk; fill(row_slice) returns the rows."""

    def write(tmp):
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(n_rows, dim))
        for chunk in _row_chunks(n_rows, dim):
            out[chunk] = fill(chunk)
        out.flush()
        del out

    _replace_atomically(path, write)


def _write_json(path: Path, obj) -> None:
    def write(tmp):
        # One dumps + write is several times faster than json.dump's many small writes.
        tmp.write_text(json.dumps(obj), encoding="utf-8")

    _replace_atomically(path, write)


def save_set(data_dir, eset: EmbeddingSet, name: str | None = None, rows=None) -> None:
    """Write a set (or only the given row indices of it) as NAME_*.npy + NAME_metadata.json.

    The image file is written row-level (each image repeated per caption), the format that
    :func:`load_named_set` reads. Arrays are streamed, so a memory-mapped set is never copied
    whole into memory.
    """
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    name = eset.name if name is None else name
    rows = np.arange(eset.rows) if rows is None else np.asarray(rows)
    row_image = eset.row_image[rows]
    _write_npy(data_dir / f"{name}{IMAGE_SUFFIX}.npy", rows.size, eset.image_dim, lambda c: eset.image[row_image[c]])
    _write_npy(data_dir / f"{name}{TEXT_SUFFIX}.npy", rows.size, eset.text_dim, lambda c: eset.text[rows[c]])
    _write_json(data_dir / f"{name}{METADATA_SUFFIX}", {"image_ids": eset.image_ids[row_image].tolist()})


def write_embedding_set(data_dir, name: str, image_rows, text_rows, image_ids) -> None:
    """Validate row-level arrays and write them as set NAME in ``data_dir`` (.npy + metadata JSON).

    Writes ``NAME_image_embeddings.npy``, ``NAME_text_embeddings.npy`` (float32) and
    ``NAME_metadata.json`` = ``{"image_ids": [...]}``. Rows of one image are written with that
    image's first row.

    Raises:
      UserError: the same checks as :func:`from_rows`, before anything is written.
    """
    save_set(data_dir, from_rows(name, image_rows, text_rows, image_ids))


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
    test_ids = np.random.default_rng(seed).permutation(unique)[:n_test]
    is_test = np.isin(image_ids, test_ids)
    return np.flatnonzero(~is_test), np.flatnonzero(is_test)


def tuning_subset(n_rows: int, size: int = 100_000, seed: int = 42) -> np.ndarray:
    """Sorted indices of a fixed random subset of ``size`` rows (all rows if n_rows <= size)."""
    if size < 1:
        raise UserError(f"tuning subset size {size}: must be at least 1, e.g. 100000")
    if n_rows <= size:
        return np.arange(n_rows)
    return np.sort(np.random.default_rng(seed).choice(n_rows, size=size, replace=False))


# --------------------------------------------------------------------------------------------
# Synthetic COCO-like data

_MAP_HIDDEN = 256  # hidden width of each random map: richer than the latent, so maps are curved
_MAP_GAIN = 1.5  # pre-activation std: tanh clearly bends, but rarely saturates
_CHUNK_IMAGES = 2048  # images per generation step, which bounds the temporaries


@dataclasses.dataclass(frozen=True, eq=False)
class _RandomMap:
    """x = tanh(z @ w1 + b1) @ w2 + offset, scaled so each output coordinate has signal std 1."""

    w1: np.ndarray
    b1: np.ndarray
    w2: np.ndarray
    offset: np.ndarray

    @classmethod
    def draw(cls, rng: np.random.Generator, latent_dim: int, out_dim: int) -> _RandomMap:
        f32 = np.float32
        w1 = rng.standard_normal((latent_dim, _MAP_HIDDEN), dtype=f32) * f32(_MAP_GAIN / np.sqrt(latent_dim))
        b1 = rng.standard_normal(_MAP_HIDDEN, dtype=f32) * f32(0.5)
        w2 = rng.standard_normal((_MAP_HIDDEN, out_dim), dtype=f32)
        # Unit signal std per coordinate makes `noise` a noise-to-signal ratio.
        probe = np.tanh(rng.standard_normal((4096, latent_dim), dtype=f32) @ w1 + b1)
        w2 /= ((probe - probe.mean(axis=0)) @ w2).std(axis=0)
        # Real embeddings are far from zero-mean (random pairs have clearly positive cosine).
        offset = rng.standard_normal(out_dim, dtype=f32)
        return cls(w1, b1, w2, offset)

    def __call__(self, z: np.ndarray, out: np.ndarray) -> None:
        np.matmul(np.tanh(z @ self.w1 + self.b1), self.w2, out=out)
        out += self.offset


def synthesize(
    n_images: int,
    captions_per_image: int = 5,
    image_dim: int = 768,
    text_dim: int = 1024,
    latent_dim: int = 64,
    noise: float = DEFAULT_NOISE,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Generate a deterministic COCO-like set of (image, caption) rows.

    Each image has a latent ``z ~ N(0, I_latent_dim)``. The image embedding is a random
    non-linear map of ``z`` plus noise; each caption perturbs ``z`` on its own
    (``z + noise * eps``) and goes through a *different* random map, plus noise. The two maps
    are drawn once per seed, so sets from one call share them. Rows are grouped by image:
    rows ``i*c .. i*c+c-1`` belong to image ``i``, whose id is ``i``.

    Args:
      n_images: number of images; rows = n_images * captions_per_image.
      captions_per_image: captions (rows) per image; the image rows repeat identically.
      image_dim, text_dim: embedding widths.
      latent_dim: width of the shared latent.
      noise: caption perturbation of the latent and additive embedding noise, both relative to
        a signal std of 1. The default gives a linear baseline image->text R@1 of about 0.5.
      seed: together with the sizes, determines every value.

    Returns:
      (image_rows ``[rows, image_dim]`` float32, text_rows ``[rows, text_dim]`` float32,
      image_ids ``[rows]`` int64).
    """
    if min(n_images, captions_per_image, image_dim, text_dim, latent_dim) < 1:
        raise UserError("synthesize: images, captions, dims and latent_dim must all be at least 1")
    if noise < 0:
        raise UserError(f"synthesize: noise {noise} must be >= 0")
    f32 = np.float32
    maps_rng = np.random.default_rng([seed, 0])
    image_map = _RandomMap.draw(maps_rng, latent_dim, image_dim)
    text_map = _RandomMap.draw(maps_rng, latent_dim, text_dim)

    c = captions_per_image
    image_rows = np.empty((n_images * c, image_dim), dtype=f32)
    text_rows = np.empty((n_images * c, text_dim), dtype=f32)
    rng = np.random.default_rng([seed, 1])
    for start in range(0, n_images, _CHUNK_IMAGES):
        stop = min(start + _CHUNK_IMAGES, n_images)
        z = rng.standard_normal((stop - start, latent_dim), dtype=f32)

        image = np.empty((stop - start, image_dim), dtype=f32)
        image_map(z, out=image)
        image += f32(noise) * rng.standard_normal(image.shape, dtype=f32)
        image_rows[start * c : stop * c].reshape(stop - start, c, image_dim)[:] = image[:, None, :]

        caption_z = np.repeat(z, c, axis=0)
        caption_z += f32(noise) * rng.standard_normal(caption_z.shape, dtype=f32)
        text = text_rows[start * c : stop * c]
        text_map(caption_z, out=text)
        text += f32(noise) * rng.standard_normal(text.shape, dtype=f32)
    return image_rows, text_rows, np.repeat(np.arange(n_images, dtype=np.int64), c)


def synthetic_splits(
    n_images: int = 20_000,
    captions_per_image: int = 5,
    image_dim: int = 768,
    text_dim: int = 1024,
    val_images: int = 1_000,
    test_images: int = 1_000,
    noise: float = DEFAULT_NOISE,
    seed: int = 0,
    latent_dim: int = 64,
) -> dict[str, EmbeddingSet]:
    """Synthetic ``train`` / ``val`` / ``test`` sets from one :func:`synthesize` call.

    One call means one pair of random maps, so a model fit on train transfers to val and test;
    the three sets hold disjoint images (train ids ``0..n_images-1``, then val, then test).
    """
    total = n_images + val_images + test_images
    image_rows, text_rows, ids = synthesize(
        total, captions_per_image, image_dim, text_dim, latent_dim=latent_dim, noise=noise, seed=seed
    )
    bounds = {"train": (0, n_images), "val": (n_images, n_images + val_images), "test": (n_images + val_images, total)}
    c = captions_per_image
    return {
        name: from_rows(name, image_rows[a * c : b * c], text_rows[a * c : b * c], ids[a * c : b * c])
        for name, (a, b) in bounds.items()
    }


# --------------------------------------------------------------------------------------------
# Command line


def describe(eset: EmbeddingSet) -> str:
    """One line: name, rows, images, captions per image, dims."""
    per_image = np.bincount(eset.row_image, minlength=eset.n_images)
    caps = f"{per_image.min()}" if per_image.min() == per_image.max() else f"{per_image.min()}-{per_image.max()}"
    return (
        f"{eset.name}: {eset.rows:,} rows, {eset.n_images:,} images ({caps} captions each), "
        f"image_dim {eset.image_dim}, text_dim {eset.text_dim}"
    )


def _cmd_synth(args) -> None:
    t0 = time.perf_counter()
    sets = synthetic_splits(
        n_images=args.images,
        captions_per_image=args.captions,
        image_dim=args.image_dim,
        text_dim=args.text_dim,
        val_images=args.val_images,
        test_images=args.test_images,
        noise=args.noise,
        seed=args.seed,
    )
    train = sets["train"]
    sets["train_tuning"] = train.subset_rows(tuning_subset(train.rows, args.tuning_size), "train_tuning")
    for name in ("train", "train_tuning", "val", "test"):
        save_set(args.out, sets[name])
        print(describe(sets[name]))
    seconds = time.perf_counter() - t0
    print(f"wrote synthetic sets (noise {args.noise}, seed {args.seed}) to {args.out} in {seconds:.1f}s")


def _cmd_split(args) -> None:
    source_dir = Path(args.source_dir)
    out = Path(args.out) if args.out is not None else source_dir
    source = load_named_set(source_dir, args.source, fix=(
        f"split reads the source set from --source-dir and --source (here {source_dir} and {args.source!r}): "
        f"point them at the set to split, e.g. --source train2017"))
    print(f"source {describe(source)}")
    row_ids = source.image_ids[source.row_image]
    train_idx, test_idx = split_train_test(row_ids, args.test_ratio, args.seed)
    shared = np.intersect1d(row_ids[train_idx], row_ids[test_idx])
    if shared.size:
        raise UserError(
            f"{source_dir}/{args.source}: leakage check failed, {shared.size} image ids in both train and test "
            f"(e.g. {shared[0]}); nothing was written, please report this as a bug"
        )
    print(
        f"leakage check: 0 shared image ids between train ({np.unique(row_ids[train_idx]).size:,} images) "
        f"and test ({np.unique(row_ids[test_idx]).size:,} images)"
    )
    tuning_idx = train_idx[tuning_subset(train_idx.size, args.tuning_size, args.tuning_seed)]
    for name, rows in (("train", train_idx), ("test", test_idx), ("train_tuning", tuning_idx)):
        save_set(out, source, name, rows)
        n_images = np.unique(source.row_image[rows]).size
        print(f"{name}: {rows.size:,} rows, {n_images:,} images")

    same_files = out.resolve() == source_dir.resolve() and args.val_source == "val"
    if same_files:
        print("val: already in place")
    elif _set_exists(source_dir, args.val_source):
        val = load_named_set(source_dir, args.val_source)
        save_set(out, val, "val")
        print(f"val (from {args.val_source}): {val.rows:,} rows, {val.n_images:,} images")
    else:
        print(f"val: no '{args.val_source}' set in {source_dir}, skipped (choose one with --val-source NAME)")
    print(f"wrote train, test, train_tuning{'' if same_files else ', val'} to {out}")


def _cmd_convert(args) -> None:
    src = Path(args.dir)
    out = Path(args.out) if args.out is not None else src
    if not src.is_dir():
        raise UserError(f"{src}: folder not found; pass the folder that holds the .pt/.safetensors files")
    files = sorted(
        p
        for p in src.iterdir()
        if p.suffix in (".pt", ".safetensors") and p.stem.endswith((IMAGE_SUFFIX, TEXT_SUFFIX))
    )
    if not files:
        raise UserError(
            f"{src}: no NAME_image_embeddings / NAME_text_embeddings .pt or .safetensors files to convert"
        )
    out.mkdir(parents=True, exist_ok=True)
    names = set()
    for path in files:
        array = read_array(path)
        target = out / f"{path.stem}.npy"
        _write_npy(target, array.shape[0], array.shape[1], lambda c: array[c])
        names.add(path.stem.removesuffix(IMAGE_SUFFIX).removesuffix(TEXT_SUFFIX))
        print(f"{path} -> {target} {tuple(array.shape)}")
    for name in sorted(names):
        metadata = src / f"{name}{METADATA_SUFFIX}"
        if out.resolve() != src.resolve() and metadata.is_file():
            shutil.copyfile(metadata, out / metadata.name)
        if (out / metadata.name).is_file():
            print(f"check: {describe(load_named_set(out, name))}")


def _cmd_check(args) -> None:
    print(f"{describe(load_named_set(args.dir, args.name))}; no NaN/Inf; OK")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m xclip_jax.data",
        description="Create, split, convert and check embedding sets (add --debug for tracebacks).",
    )
    debug = argparse.ArgumentParser(add_help=False)
    debug.add_argument("--debug", action="store_true", help="show the traceback of an error")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("synth", parents=[debug], help="write synthetic train, train_tuning, val and test sets")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--images", type=int, default=20_000, help="train images (default 20000)")
    p.add_argument("--captions", type=int, default=5, help="captions per image (default 5)")
    p.add_argument("--image-dim", type=int, default=768)
    p.add_argument("--text-dim", type=int, default=1024)
    p.add_argument("--val-images", type=int, default=1_000)
    p.add_argument("--test-images", type=int, default=1_000)
    p.add_argument(
        "--noise", type=float, default=DEFAULT_NOISE, help=f"noise-to-signal ratio (default {DEFAULT_NOISE})"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tuning-size", type=int, default=100_000, help="rows in train_tuning (default 100000)")
    p.set_defaults(run=_cmd_synth)

    p = sub.add_parser("split", parents=[debug], help="image-level train/test split, tuning subset and val copy")
    p.add_argument("--source-dir", required=True, help="folder holding the source set")
    p.add_argument("--source", default="train2017", help="set to split (default train2017)")
    p.add_argument("--out", default=None, help="output folder (default: --source-dir)")
    p.add_argument("--test-ratio", type=float, default=0.2)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--tuning-size", type=int, default=100_000)
    p.add_argument("--tuning-seed", type=int, default=42)
    p.add_argument("--val-source", default="val2017", help="set copied to 'val' when present (default val2017)")
    p.set_defaults(run=_cmd_split)

    p = sub.add_parser("convert", parents=[debug], help="convert .pt/.safetensors embedding files to .npy")
    p.add_argument("dir", help="folder with NAME_image_embeddings.pt etc.")
    p.add_argument("--out", default=None, help="output folder (default: the same folder)")
    p.set_defaults(run=_cmd_convert)

    p = sub.add_parser("check", parents=[debug], help="load and validate one set")
    p.add_argument("dir", help="data folder")
    p.add_argument("name", help="set name, e.g. train")
    p.set_defaults(run=_cmd_check)
    return parser


@cli
def main(argv=None) -> None:
    """Command-line entry point: ``python -m xclip_jax.data {synth,split,convert,check} ...``."""
    args = _parser().parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    main()
