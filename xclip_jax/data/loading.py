"""The sets a config names, loaded and checked once; and the tuning driver's cache of them.

The driver validates the data once and writes the de-duplicated sets as ``.npy`` files in a cache
folder keyed by the data config (and the files' sizes and times); every trial process memory-maps
them instead of re-reading and re-validating the files.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np

from xclip_jax.data.files import load_embedding_set
from xclip_jax.data.sets import EmbeddingSet, check_disjoint, source_line
from xclip_jax.data.synthetic import synthetic_splits
from xclip_jax.errors import UserError

SPLITS = ("train", "val", "test")


def load_sets(data_cfg, base_data_dir, splits=SPLITS, announce=print) -> dict[str, EmbeddingSet]:
    """The embedding sets of a config's ``data`` section, validated; a split it names no files for
    (an optional test set) is absent.

    ``announce`` gets one line per set saying which files it was read from and its size (None: quiet).
    A validation or test set that shares images with the training set gets a warning.
    """
    if data_cfg.synthetic is not None:
        s = data_cfg.synthetic
        kwargs = {key: value for key, value in (("noise", s.noise), ("nonlinearity", s.nonlinearity)) if value is not None}
        sets = synthetic_splits(n_images=s.images, captions_per_image=s.captions, image_dim=s.image_dim,
                                text_dim=s.text_dim, val_images=s.val_images, test_images=s.test_images,
                                seed=s.seed, latent_dim=s.latent_dim, fold=s.fold, **kwargs)
        out = {k: v for k, v in sets.items() if k in splits}
    else:
        out = {}
        for split in splits:
            paths = data_cfg.paths(split, base_data_dir)
            if paths is not None:
                out[split] = load_embedding_set(*paths, name=split)
    if not out:  # only splits the config names no files for (an optional test set)
        return out
    ref_name, ref = next(iter(out.items()))
    for split, s in out.items():
        if (s.image_dim, s.text_dim) != (ref.image_dim, ref.text_dim):
            raise UserError(f"{split} set has dims image {s.image_dim}/text {s.text_dim} but {ref_name} has "
                            f"{ref.image_dim}/{ref.text_dim}; use embeddings from the same encoders")
    for s in out.values():
        if announce:
            announce(source_line(s))
        if "train" in out and s is not out["train"]:
            check_disjoint(out["train"], s)
    return out


def no_test_set(data_cfg, base_data_dir) -> str | None:
    """The line saying that a config names no test set (so no final test R@1 will exist), with the
    command that makes one; None when it names one (or is synthetic, which always has one)."""
    if data_cfg.synthetic is not None or data_cfg.paths("test", base_data_dir) is not None:
        return None
    return ("no test set: the config's data section names no test_* files, so no final test R@1 will be "
            "measured (the number to hold against the baselines' before shipping a head); make one with "
            "python -m xclip_jax.data split --source-dir DIR --source NAME and set data.test_image_embeddings, "
            "test_text_embeddings and test_metadata to its test_* files")


def cache_dir(data_cfg, base_data_dir, root: Path) -> Path:
    """A folder under ``root`` keyed by the data config (and the files' sizes and times)."""
    desc = json.dumps({"data": dataclasses.asdict(data_cfg), "base": str(Path(base_data_dir).absolute())},
                      sort_keys=True, default=str)
    for split in SPLITS:
        for p in data_cfg.paths(split, base_data_dir) or ():
            if p.exists():
                st = p.stat()
                desc += f"|{p}:{st.st_size}:{st.st_mtime_ns}"
    return root / hashlib.sha256(desc.encode()).hexdigest()[:16]


def write_cache(sets: dict, directory: Path) -> None:
    """Write validated, de-duplicated sets as .npy files (atomically: a folder renamed when done)."""
    if (directory / "done").exists():
        return
    tmp = directory.with_name(directory.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    for split, s in sets.items():
        np.save(tmp / f"{split}_image.npy", s.image)
        np.save(tmp / f"{split}_text.npy", s.text)
        np.save(tmp / f"{split}_row_image.npy", s.row_image)
        np.save(tmp / f"{split}_image_ids.npy", np.asarray([str(i) for i in s.image_ids]))
    (tmp / "sources.txt").write_text("".join(source_line(s) + "\n" for s in sets.values()))
    (tmp / "done").write_text("ok")
    try:
        tmp.rename(directory)
    except OSError:  # another driver on this machine finished first
        shutil.rmtree(tmp, ignore_errors=True)


def cached_splits(directory: Path) -> list[str]:
    """The splits a finished cache holds (empty when it is not finished)."""
    if not (directory / "done").exists():
        return []
    return [s for s in SPLITS if (directory / f"{s}_text.npy").exists()]


def read_cache(directory: Path, splits=("train", "val")) -> dict[str, EmbeddingSet]:
    """Memory-map the cached sets back as EmbeddingSets (no copy, no re-validation)."""
    out = {}
    for split in splits:
        out[split] = EmbeddingSet(
            name=split,
            image=np.load(directory / f"{split}_image.npy", mmap_mode="r"),
            text=np.load(directory / f"{split}_text.npy", mmap_mode="r"),
            row_image=np.load(directory / f"{split}_row_image.npy"),
            image_ids=np.load(directory / f"{split}_image_ids.npy"),
        )
    return out


def cached_sources(directory: Path) -> list[str]:
    """The lines saying where the cached sets were read from (as printed when they were loaded)."""
    path = directory / "sources.txt"
    return path.read_text().splitlines() if path.exists() else []
