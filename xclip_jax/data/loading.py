"""The sets a config names, loaded and checked once; and the tuning driver's cache of them.

The driver validates the data once and writes the de-duplicated sets as ``.npy`` files in a cache
folder named by the files' content (one copy per content, shared by the studies that read the same
files); every trial process memory-maps them instead of re-reading and re-validating the files.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np

from xclip_jax.data.files import load_embedding_set, resolve_file
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
    """A folder under ``root`` named by the content of the sets it caches (content-addressed): the
    synthetic section's values, or the SHA-256 of every file the data section reads (by the file
    rule: a converted ``.npy`` wins). Studies that read the same files, whatever their configs call
    them, share one copy; a changed file gets a new folder. A file is read for its hash once: the
    hashes are kept by path, size and time in ``root/hashes.json``."""
    if data_cfg.synthetic is not None:
        desc = json.dumps({"synthetic": dataclasses.asdict(data_cfg.synthetic)}, sort_keys=True, default=str)
    else:
        memo = _Hashes(root / "hashes.json")
        desc = "|".join(f"{split}:" + ",".join(memo.digest(path, by_rule=i < 2) for i, path in enumerate(paths))
                        for split in SPLITS if (paths := data_cfg.paths(split, base_data_dir)) is not None)
        memo.save()
    return root / hashlib.sha256(desc.encode()).hexdigest()[:16]


class _Hashes:
    """SHA-256 of files, remembered by (resolved path, size, mtime) in a JSON file."""

    def __init__(self, path: Path):
        self.path, self.changed = path, False
        try:
            self.known = json.loads(path.read_text())
        except (OSError, ValueError):
            self.known = {}

    def digest(self, named: Path, by_rule: bool) -> str:
        """The hash of the file ``named`` reads (by the embedding files' rule where ``by_rule``)."""
        try:
            path = resolve_file(named) if by_rule else named
        except UserError:  # loading it says what is wrong; nothing is cached for it
            path = named
        if not path.is_file():
            return f"missing {path}"
        st = path.stat()
        key, stamp = str(path.resolve()), [st.st_size, st.st_mtime_ns]
        if self.known.get(key, [None])[:2] != stamp:
            sha = hashlib.sha256()
            with open(path, "rb") as f:
                while chunk := f.read(16 << 20):
                    sha.update(chunk)
            self.known[key], self.changed = [*stamp, sha.hexdigest()], True
        return self.known[key][2]

    def save(self) -> None:
        """Keep the hashes, in a cache root that is there already (a config refused later leaves nothing)."""
        if not self.changed or not self.path.parent.is_dir():
            return
        try:
            tmp = self.path.with_name(f"{self.path.name}.tmp{os.getpid()}")
            tmp.write_text(json.dumps(self.known, indent=0))
            tmp.replace(self.path)
        except OSError:  # a read-only root: the hashes are computed again next time
            pass


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
