"""The tuning driver's data cache: one copy per content, shared by the studies that read the same files."""

import dataclasses
import shutil

import numpy as np

from tests.conftest import write
from xclip_jax import data
from xclip_jax.tune import Driver
from xclip_jax.tune_config import load_tune_config


def _files(folder):
    sets = data.synthetic_splits(n_images=120, captions_per_image=5, image_dim=16, text_dim=24, val_images=30,
                                 test_images=20, noise=0.5, seed=1)
    for split in ("train", "val", "test"):
        data.save_set(folder, sets[split], split)
    return {"base_data_dir": str(folder),
            "data": {f"{s}_{p}": f"{s}_{p}.npy" if p != "metadata" else f"{s}_metadata.json"
                     for s in ("train", "val", "test") for p in ("image_embeddings", "text_embeddings", "metadata")}}


def test_the_cache_is_named_by_content(tmp_path):
    one = _files(tmp_path / "one")
    shutil.copytree(tmp_path / "one", tmp_path / "two")  # the same content elsewhere, under other times
    cfg = load_tune_config(write(tmp_path, **one))
    other = dataclasses.replace(cfg, base_data_dir=str(tmp_path / "two"))
    root = tmp_path / "cache"
    assert data.cache_dir(cfg.data, cfg.base_data_dir, root) == data.cache_dir(other.data, other.base_data_dir, root)
    ids = np.load(tmp_path / "two" / "val_image_embeddings.npy")
    np.save(tmp_path / "two" / "val_image_embeddings.npy", ids[::-1])
    assert data.cache_dir(cfg.data, cfg.base_data_dir, root) != data.cache_dir(other.data, other.base_data_dir, root)
    assert not root.exists()  # computing a name creates nothing


def test_studies_of_one_output_root_share_one_copy_of_their_data(tmp_path):
    files = _files(tmp_path / "data")
    drivers = []
    for name in ("a", "b"):
        cfg = load_tune_config(write(tmp_path, study_name=name, baselines=False, **files,
                                     output_dir=str(tmp_path / "optuna_results" / name),
                                     checkpoint_dir=str(tmp_path / "checkpoints" / name)))
        driver = Driver(cfg, progress=False)
        driver.prepare()
        driver.pool.close()
        drivers.append(driver)
    assert drivers[0].cache_dir == drivers[1].cache_dir
    assert drivers[0].cache_dir.parent == tmp_path / "optuna_results" / "data_cache"
    assert [p.name for p in (tmp_path / "optuna_results" / "data_cache").iterdir() if p.is_dir()] == \
        [drivers[0].cache_dir.name]
    assert not list((tmp_path / "optuna_results").glob("*/data_cache"))
