"""Embedding files: finding them by one rule, reading .npy/.safetensors/.pt, writing .npy sets.

A set named NAME in a data folder is three files: ``NAME_image_embeddings.{npy,
safetensors,pt}`` (float ``[rows, image_dim]``), ``NAME_text_embeddings.{…}`` (float ``[rows,
text_dim]``) and ``NAME_metadata.json`` (``{"image_ids": [one id per row]}``). Rows with the same
image id are captions of one image, so on disk the image array repeats each image once per caption.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np

from xclip_jax.data.sets import (
    EmbeddingSet,
    _build,
    _check_ids,
    _check_matrix,
    _one_line,
    _row_chunks,
    from_rows,
)
from xclip_jax.errors import UserError, install_hint

EXTENSIONS = (".npy", ".safetensors", ".pt")  # in order of preference when several exist
IMAGE_SUFFIX = "_image_embeddings"
TEXT_SUFFIX = "_text_embeddings"
METADATA_SUFFIX = "_metadata.json"

# --------------------------------------------------------------------------------------------
# Reading files


MAKE_IT = ("check the data folder and set name, or create the set with "
           "`python -m xclip_jax.data split` or `python -m xclip_jax.data synth`")


def find_file(data_dir, stem: str, fix: str = MAKE_IT) -> Path:
    """The file that set name ``stem`` reads in ``data_dir`` when no extension is named: by the one
    rule of :func:`resolve_file` (the ``.npy`` first, refused when a source beside it is newer).

    Raises:
      UserError: none of .npy, .safetensors, .pt exists (the message lists what was looked for, then
        ``fix``), or the ``.npy`` is older than a source of the same name.
    """
    return resolve_file(Path(data_dir) / stem, fix)


def resolve_file(path, fix: str = MAKE_IT) -> Path:
    """The file that a configured embedding-file name reads, by one rule for every command.

    The converted ``.npy`` beside the named file wins (memory-mapped, no torch needed), so a config
    written for the original's ``.pt`` files reads what ``convert`` or ``split`` wrote; otherwise
    the named file; otherwise any supported extension of the same name. A ``.npy`` older than the
    named file (or, where no extension is named, than any source of the same name) is refused: it is
    stale, and re-encoded embeddings would be silently ignored.
    """
    path = Path(path)
    named = path.suffix in EXTENSIONS
    stem = path.name[: -len(path.suffix)] if named else path.name
    npy = path.with_name(stem + ".npy")
    sources = [path] if named else [path.with_name(stem + ext) for ext in EXTENSIONS]
    if npy.is_file():
        for source in sources:
            if source != npy and source.is_file() and source.stat().st_mtime > npy.stat().st_mtime:
                raise UserError(f"{source} is newer than its converted {npy.name}, which would be read in its "
                                f"place; convert it again (python -m xclip_jax.data convert {source.parent}) or "
                                f"remove {npy}")
        return npy
    if named and path.is_file():
        return path
    for candidate in (path.with_name(stem + ext) for ext in EXTENSIONS):
        if candidate.is_file():
            return candidate
    data_dir = path.parent
    where = f"in {data_dir}" if data_dir.is_dir() else f"and the folder {data_dir} does not exist"
    raise UserError(f"{data_dir / stem}.*: not found (looked for {', '.join(EXTENSIONS)} {where}); {fix}")


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
            f"`{install_hint('torch')}`, or convert once with `python -m xclip_jax.data convert {path.parent}` "
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
        # One dumps + write, not json.dump's many small writes.
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
