"""Tests for xclip_jax.data: reading, validation messages, splits, the generator and the CLI."""

import dataclasses
import json
import os
import subprocess
import sys
import types

import numpy as np
import pytest
from safetensors.numpy import save_file

from xclip_jax import data
from xclip_jax.errors import UserError


def _rows(n_images=6, captions=3, image_dim=8, text_dim=5, seed=0, shuffle=True):
    """Row-level arrays with string ids, rows of one image scattered when shuffle=True."""
    rng = np.random.default_rng(seed)
    images = rng.standard_normal((n_images, image_dim)).astype(np.float32)
    owner = np.repeat(np.arange(n_images), captions)
    if shuffle:
        owner = rng.permutation(owner)
    text = rng.standard_normal((owner.size, text_dim)).astype(np.float32)
    ids = np.array([f"img{i:03d}" for i in owner])
    return images[owner], text, ids


def _write_set(directory, name, image_rows, text_rows, ids, ext=".npy"):
    """Write a set's files directly (bypassing validation) so that bad data can be written too."""
    directory.mkdir(parents=True, exist_ok=True)
    for kind, array in (("image", image_rows), ("text", text_rows)):
        path = directory / f"{name}_{kind}_embeddings{ext}"
        if ext == ".npy":
            np.save(path, array)
        else:
            save_file({"embeddings": np.ascontiguousarray(array)}, str(path))
    ids = ids.tolist() if isinstance(ids, np.ndarray) else ids
    (directory / f"{name}_metadata.json").write_text(json.dumps({"image_ids": ids}))


def _assert_one_line(error, *words):
    message = str(error.value)
    assert "\n" not in message
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"


# ---------------------------------------------------------------------------------------------
# Round trips and de-duplication


def _assert_same_rows(eset, image_rows, text_rows, ids):
    np.testing.assert_array_equal(eset.image_rows(), image_rows)
    np.testing.assert_array_equal(eset.text, text_rows)
    np.testing.assert_array_equal(eset.image_ids[eset.row_image], ids)
    # One stored image per id, in first-occurrence order.
    _, first = np.unique(ids, return_index=True)
    np.testing.assert_array_equal(eset.image_ids, ids[np.sort(first)])
    assert eset.image.dtype == np.float32 and eset.text.dtype == np.float32
    assert eset.row_image.dtype == np.int32


def test_write_then_load_npy_deduplicates(tmp_path):
    image_rows, text_rows, ids = _rows()
    data.write_embedding_set(tmp_path, "toy", image_rows, text_rows, ids)
    for suffix in ("_image_embeddings.npy", "_text_embeddings.npy", "_metadata.json"):
        assert (tmp_path / f"toy{suffix}").is_file()

    eset = data.load_named_set(tmp_path, "toy")
    assert (eset.name, eset.rows, eset.n_images, eset.image_dim, eset.text_dim) == ("toy", 18, 6, 8, 5)
    _assert_same_rows(eset, image_rows, text_rows, ids)


def test_load_safetensors_float16_and_int_ids(tmp_path):
    image_rows, text_rows, _ = _rows(captions=2, shuffle=False)
    ids = [int(i) for i in np.repeat([30, 10, 20, 40, 60, 50], 2)]
    _write_set(tmp_path, "st", image_rows.astype(np.float16), text_rows.astype(np.float16), ids, ".safetensors")

    eset = data.load_named_set(tmp_path, "st")
    assert eset.image_ids.dtype.kind == "i"
    np.testing.assert_array_equal(eset.image_ids, [30, 10, 20, 40, 60, 50])
    _assert_same_rows(eset, image_rows.astype(np.float16).astype(np.float32),
                      text_rows.astype(np.float16).astype(np.float32), np.array(ids))


def test_config_naming_pt_finds_converted_npy(tmp_path):
    image_rows, text_rows, ids = _rows()
    data.write_embedding_set(tmp_path, "train", image_rows, text_rows, ids)
    eset = data.load_embedding_set(
        tmp_path / "train_image_embeddings.pt",
        tmp_path / "train_text_embeddings.pt",
        tmp_path / "train_metadata.json",
    )
    assert eset.name == "train" and eset.rows == 18


def test_a_named_pt_file_reads_its_converted_npy_beside_it(tmp_path, monkeypatch):
    """One rule for every command: after `convert`, the .npy beside a named .pt is what is read (even
    though the .pt is still there, and with torch importable), memory-mapped."""
    image_rows, text_rows, ids = _rows()
    data.write_embedding_set(tmp_path, "train", image_rows, text_rows, ids)
    for kind in ("image", "text"):
        pt = tmp_path / f"train_{kind}_embeddings.pt"
        pt.write_bytes(b"the original's file")
        npy = tmp_path / f"train_{kind}_embeddings.npy"
        os.utime(pt, (npy.stat().st_mtime - 60,) * 2)  # converted after it was written

    def no_torch_load(*args, **kwargs):
        raise AssertionError("read the .pt although its .npy sits beside it")

    monkeypatch.setitem(sys.modules, "torch", types.SimpleNamespace(load=no_torch_load))
    eset = data.load_embedding_set(tmp_path / "train_image_embeddings.pt", tmp_path / "train_text_embeddings.pt",
                                   tmp_path / "train_metadata.json", name="train")
    assert eset.sources[:2] == (str(tmp_path / "train_image_embeddings.npy"), str(tmp_path / "train_text_embeddings.npy"))
    assert data.source_line(eset).startswith(f"data: train <- {tmp_path / 'train_image_embeddings.npy'}")
    assert data.source_line(eset).endswith("18 rows, 6 images")


def test_a_source_newer_than_its_converted_npy_is_refused(tmp_path):
    """Re-encoded embeddings written over the source after a convert: the stale .npy must not win
    silently. One line names both files and the command; after it, the new rows are read."""
    image_rows, text_rows, ids = _rows()
    data.write_embedding_set(tmp_path, "train", image_rows, text_rows, ids)
    for kind, rows in (("image", image_rows), ("text", text_rows)):
        save_file({"embeddings": (rows * 2).astype(np.float32)}, tmp_path / f"train_{kind}_embeddings.safetensors")
        npy = tmp_path / f"train_{kind}_embeddings.npy"
        os.utime(npy, (npy.stat().st_mtime - 60,) * 2)  # the source was written after the conversion
    named = [tmp_path / f"train_{kind}_embeddings.safetensors" for kind in ("image", "text")]
    with pytest.raises(UserError) as e:
        data.load_embedding_set(*named, tmp_path / "train_metadata.json")
    msg = str(e.value)
    assert "train_image_embeddings.safetensors is newer" in msg and "train_image_embeddings.npy" in msg
    assert "python -m xclip_jax.data convert" in msg and "\n" not in msg
    subprocess.run([sys.executable, "-m", "xclip_jax.data", "convert", str(tmp_path)], check=True, capture_output=True)
    eset = data.load_embedding_set(*named, tmp_path / "train_metadata.json")
    np.testing.assert_allclose(np.asarray(eset.text), text_rows * 2, rtol=1e-6)


def test_npy_float32_stays_memory_mapped(tmp_path):
    image_rows, text_rows, ids = _rows()
    data.write_embedding_set(tmp_path, "toy", image_rows, text_rows, ids)
    text = data.read_array(tmp_path / "toy_text_embeddings.npy")
    assert isinstance(text.base, np.memmap) or isinstance(text, np.memmap)


def test_subset_rows_rededuplicates():
    image_rows, text_rows, ids = _rows()
    eset = data.from_rows("all", image_rows, text_rows, ids)
    keep = np.flatnonzero(np.isin(ids, ["img004", "img001"]))[::-1]
    sub = eset.subset_rows(keep, "sub")
    assert sub.name == "sub" and sub.n_images == 2 and sub.rows == keep.size
    _assert_same_rows(sub, image_rows[keep], text_rows[keep], ids[keep])
    # A boolean mask selects the same rows.
    mask = np.isin(ids, ["img004", "img001"])
    assert eset.subset_rows(mask, "m").n_images == 2


def test_differing_image_rows_of_one_id_warn_and_keep_first():
    image_rows, text_rows, ids = _rows(shuffle=False)
    image_rows[1] += 1.0  # second caption of img000 disagrees with the first
    with pytest.warns(UserWarning, match="1 rows differ"):
        eset = data.from_rows("w", image_rows, text_rows, ids)
    np.testing.assert_array_equal(eset.image[0], image_rows[0])


def test_save_set_writes_selected_rows(tmp_path):
    image_rows, text_rows, ids = _rows()
    eset = data.from_rows("all", image_rows, text_rows, ids)
    rows = np.array([5, 0, 7])
    data.save_set(tmp_path, eset, "part", rows)
    part = data.load_named_set(tmp_path, "part")
    _assert_same_rows(part, image_rows[rows], text_rows[rows], ids[rows])


# ---------------------------------------------------------------------------------------------
# Error messages: one line, naming the file, the problem and the fix


def test_missing_file_lists_extensions(tmp_path):
    with pytest.raises(UserError) as e:
        data.load_named_set(tmp_path, "val")
    _assert_one_line(e, "val_image_embeddings", ".npy", ".safetensors", ".pt", str(tmp_path))


def test_missing_metadata(tmp_path):
    image_rows, text_rows, ids = _rows()
    _write_set(tmp_path, "val", image_rows, text_rows, ids)
    (tmp_path / "val_metadata.json").unlink()
    with pytest.raises(UserError) as e:
        data.load_named_set(tmp_path, "val")
    _assert_one_line(e, "val_metadata.json", "not found", "image_ids")


def test_row_count_mismatch_names_both_files(tmp_path):
    image_rows, text_rows, ids = _rows()
    _write_set(tmp_path, "val", image_rows, text_rows[:-2], ids)
    with pytest.raises(UserError) as e:
        data.load_named_set(tmp_path, "val")
    _assert_one_line(e, "val_text_embeddings.npy", "16 rows", "val_image_embeddings.npy", "has 18", "re-export")


def test_not_two_dimensional(tmp_path):
    image_rows, text_rows, ids = _rows()
    _write_set(tmp_path, "val", image_rows, text_rows[:, 0], ids)
    with pytest.raises(UserError) as e:
        data.load_named_set(tmp_path, "val")
    _assert_one_line(e, "val_text_embeddings.npy", "2-D", "(18,)")


def test_non_float_dtype(tmp_path):
    image_rows, text_rows, ids = _rows()
    _write_set(tmp_path, "val", image_rows.astype(np.int64), text_rows, ids)
    with pytest.raises(UserError) as e:
        data.load_named_set(tmp_path, "val")
    _assert_one_line(e, "val_image_embeddings.npy", "int64", "floating point")


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_or_inf_rows_counted_with_first_index(tmp_path, bad):
    image_rows, text_rows, ids = _rows()
    text_rows[[7, 3], 1] = bad
    _write_set(tmp_path, "val", image_rows, text_rows, ids)
    with pytest.raises(UserError) as e:
        data.load_named_set(tmp_path, "val")
    _assert_one_line(e, "val_text_embeddings.npy", "2 rows", "NaN or Inf", "first at row 3")


def test_ids_length_mismatch(tmp_path):
    image_rows, text_rows, ids = _rows()
    _write_set(tmp_path, "val", image_rows, text_rows, ids[:-1])
    with pytest.raises(UserError) as e:
        data.load_named_set(tmp_path, "val")
    _assert_one_line(e, "val_metadata.json", "17 image_ids", "18 rows")


def test_metadata_without_image_ids_key(tmp_path):
    image_rows, text_rows, ids = _rows()
    _write_set(tmp_path, "val", image_rows, text_rows, ids)
    (tmp_path / "val_metadata.json").write_text(json.dumps({"ids": ids.tolist()}))
    with pytest.raises(UserError) as e:
        data.load_named_set(tmp_path, "val")
    _assert_one_line(e, "val_metadata.json", "no key 'image_ids'", "found keys: ids")


def test_metadata_malformed_json(tmp_path):
    image_rows, text_rows, ids = _rows()
    _write_set(tmp_path, "val", image_rows, text_rows, ids)
    (tmp_path / "val_metadata.json").write_text('{"image_ids": [1, 2,\n')
    with pytest.raises(UserError) as e:
        data.load_named_set(tmp_path, "val")
    _assert_one_line(e, "val_metadata.json", "not valid JSON", "image_ids")


def test_metadata_nested_ids(tmp_path):
    path = tmp_path / "m_metadata.json"
    path.write_text(json.dumps({"image_ids": [[1, 2], [3, 4]]}))
    with pytest.raises(UserError) as e:
        data.read_image_ids(path)
    _assert_one_line(e, "m_metadata.json", "flat list")


def test_safetensors_with_two_tensors(tmp_path):
    path = tmp_path / "x_image_embeddings.safetensors"
    save_file({"a": np.ones((2, 3), np.float32), "b": np.ones((2, 3), np.float32)}, str(path))
    with pytest.raises(UserError) as e:
        data.read_array(path)
    _assert_one_line(e, path.name, "2 tensors", "a, b", "exactly one")


def test_corrupt_npy(tmp_path):
    path = tmp_path / "x_image_embeddings.npy"
    path.write_bytes(b"not an array")
    with pytest.raises(UserError) as e:
        data.read_array(path)
    _assert_one_line(e, path.name, "not a readable .npy")


def test_from_rows_messages_use_set_name():
    image_rows, text_rows, ids = _rows()
    with pytest.raises(UserError) as e:
        data.from_rows("train", image_rows, text_rows[:4], ids)
    _assert_one_line(e, "set 'train' text rows", "4 rows", "has 18")


def test_pt_without_torch_says_how_to_fix(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # makes `import torch` raise ImportError
    path = tmp_path / "train_image_embeddings.pt"
    path.write_bytes(b"whatever")
    with pytest.raises(UserError) as e:
        data.read_array(path)
    _assert_one_line(e, path.name, "pip install 'torch>=2.1'", f"python -m xclip_jax.data convert {tmp_path}")


def _fake_torch(arrays):
    """A stand-in for torch with just what data._read_torch uses; load() returns arrays[path.name]."""

    class Tensor:
        def __init__(self, array):
            self.array = array
            self.dtype = array.dtype

        def detach(self):
            return self

        def cpu(self):
            return self

        def float(self):
            return Tensor(self.array.astype(np.float32))

        def numpy(self):
            return self.array

    def load(path, map_location=None, weights_only=None):
        assert map_location == "cpu" and weights_only is True
        value = arrays[path.name]
        if isinstance(value, dict):
            return {k: Tensor(v) if isinstance(v, np.ndarray) else v for k, v in value.items()}
        return Tensor(value)

    return types.SimpleNamespace(Tensor=Tensor, load=load, bfloat16=object())


def test_pt_read_and_convert_with_torch(tmp_path, monkeypatch, capsys):
    image_rows, text_rows, ids = _rows()
    monkeypatch.setitem(
        sys.modules,
        "torch",
        _fake_torch({
            "train_image_embeddings.pt": image_rows.astype(np.float64),
            "train_text_embeddings.pt": {"embeddings": text_rows, "note": "from the original tool"},
        }),
    )
    for kind in ("image", "text"):
        (tmp_path / f"train_{kind}_embeddings.pt").write_bytes(b"fake")
    (tmp_path / "train_metadata.json").write_text(json.dumps({"image_ids": ids.tolist()}))

    out = tmp_path / "converted"
    data.main(["convert", str(tmp_path), "--out", str(out)])
    assert "check: train: 18 rows, 6 images" in capsys.readouterr().out
    monkeypatch.delitem(sys.modules, "torch")
    _assert_same_rows(data.load_named_set(out, "train"), image_rows, text_rows, ids)


# ---------------------------------------------------------------------------------------------
# Splits and the tuning subset


def test_split_is_image_level_without_leakage():
    ids = np.repeat(np.arange(1000), np.random.default_rng(0).integers(4, 8, size=1000))
    ids = np.random.default_rng(1).permutation(ids)
    train, test = data.split_train_test(ids, test_ratio=0.2, seed=42)

    assert np.intersect1d(ids[train], ids[test]).size == 0
    np.testing.assert_array_equal(np.sort(np.concatenate([train, test])), np.arange(ids.size))
    assert np.unique(ids[test]).size == 200
    assert abs(test.size / ids.size - 0.2) < 0.03
    # Deterministic, and another seed gives another split.
    np.testing.assert_array_equal(data.split_train_test(ids, 0.2, 42)[1], test)
    assert not np.array_equal(data.split_train_test(ids, 0.2, 7)[1], test)


def test_split_rejects_bad_ratio():
    with pytest.raises(UserError, match="test_ratio"):
        data.split_train_test(np.arange(10), test_ratio=1.0)


def test_tuning_subset():
    idx = data.tuning_subset(1000, size=100, seed=42)
    assert idx.size == 100 and np.unique(idx).size == 100
    assert np.all(np.diff(idx) > 0) and idx.max() < 1000
    np.testing.assert_array_equal(idx, data.tuning_subset(1000, size=100, seed=42))
    assert not np.array_equal(idx, data.tuning_subset(1000, size=100, seed=1))
    np.testing.assert_array_equal(data.tuning_subset(50, size=100), np.arange(50))


# ---------------------------------------------------------------------------------------------
# Synthetic data


def test_synthesize_shapes_determinism_and_repeated_images():
    image_rows, text_rows, ids = data.synthesize(40, captions_per_image=3, image_dim=16, text_dim=24, seed=3)
    assert image_rows.shape == (120, 16) and text_rows.shape == (120, 24) and ids.shape == (120,)
    assert image_rows.dtype == np.float32 and text_rows.dtype == np.float32
    np.testing.assert_array_equal(ids, np.repeat(np.arange(40), 3))
    grouped = image_rows.reshape(40, 3, 16)
    np.testing.assert_array_equal(grouped, np.broadcast_to(grouped[:, :1], grouped.shape))
    # Captions of one image differ from each other.
    assert not np.allclose(text_rows[0], text_rows[1])

    again = data.synthesize(40, captions_per_image=3, image_dim=16, text_dim=24, seed=3)
    for a, b in zip((image_rows, text_rows, ids), again):
        np.testing.assert_array_equal(a, b)
    other = data.synthesize(40, captions_per_image=3, image_dim=16, text_dim=24, seed=4)
    assert not np.allclose(image_rows, other[0]) and not np.allclose(text_rows, other[1])


def _canonical_correlations(a_NxD, b_NxE):
    """Float64 CCA by whitening both sides and taking the singular values of the cross product."""
    def whiten(x):
        x = x.astype(np.float64) - x.mean(axis=0)
        eigval, eigvec = np.linalg.eigh(x.T @ x / len(x))
        return x @ eigvec / np.sqrt(eigval)
    return np.linalg.svd(whiten(a_NxD).T @ whiten(b_NxE) / len(a_NxD), compute_uv=False)


@pytest.mark.parametrize("fold, linear_dims", [(0.0, 8), (0.5, 4), (1.0, 0)])
def test_fold_hides_latent_coordinates_from_every_linear_map(fold, linear_dims):
    # Low noise, 8 latent coordinates: each one a linear map can see gives a canonical correlation
    # near 1; a folded one (seen by the captions only by magnitude) gives none above 0.7.
    image, text, _ = data.synthesize(3000, 1, 32, 48, latent_dim=8, noise=0.1, seed=3, fold=fold)
    rho = _canonical_correlations(image, text)
    assert np.sum(rho > 0.9) == linear_dims, rho[:10]
    assert np.all(rho[linear_dims:] < 0.7), rho[:10]
    with pytest.raises(UserError, match="fold"):
        data.synthesize(10, 1, 4, 4, fold=1.5)


def test_synthetic_splits_are_disjoint_slices_of_one_draw():
    sets = data.synthetic_splits(n_images=30, captions_per_image=2, image_dim=8, text_dim=6,
                                 val_images=5, test_images=7, seed=1)
    assert set(sets) == {"train", "val", "test"}
    assert [sets[k].n_images for k in ("train", "val", "test")] == [30, 5, 7]
    assert [sets[k].rows for k in ("train", "val", "test")] == [60, 10, 14]
    all_ids = np.concatenate([s.image_ids for s in sets.values()])
    assert np.unique(all_ids).size == all_ids.size
    # Same maps: test is exactly the tail of one 42-image draw.
    image_rows, text_rows, _ = data.synthesize(42, 2, 8, 6, seed=1)
    np.testing.assert_array_equal(sets["test"].text, text_rows[-14:])
    np.testing.assert_array_equal(sets["test"].image_rows(), image_rows[-14:])


def _recall_at_1(images, captions, caption_image):
    """Cosine image->text and text->image R@1 (an image hits if any caption is its top-1)."""
    images = images / np.linalg.norm(images, axis=1, keepdims=True)
    captions = captions / np.linalg.norm(captions, axis=1, keepdims=True)
    sim = images @ captions.T
    i2t = np.mean(caption_image[sim.argmax(axis=1)] == np.arange(len(images)))
    t2i = np.mean(sim.argmax(axis=0) == caption_image)
    return i2t, t2i


def test_default_noise_is_learnable_but_not_trivial():
    """Ridge regression text->image (a closed-form linear baseline) fit on 2,000 images and
    scored on 500 new images x 5 captions must land between chance and trivial."""
    n_train, c = 2000, 5
    image_rows, text_rows, ids = data.synthesize(n_train + 500, c, 768, 1024, seed=0)
    fit, held_out = ids < n_train, ids >= n_train
    t_mean, i_mean = text_rows[fit].mean(0), image_rows[fit].mean(0)
    tc, ic = text_rows[fit] - t_mean, image_rows[fit] - i_mean
    # lambda 1e5 is what selection on held-out train images picks for this noise level.
    gram = (tc.T @ tc).astype(np.float64) + 1e5 * np.eye(tc.shape[1])
    w = np.linalg.solve(gram, (tc.T @ ic).astype(np.float64)).astype(np.float32)

    i2t, t2i = _recall_at_1(image_rows[held_out][::c] - i_mean, (text_rows[held_out] - t_mean) @ w,
                            ids[held_out] - n_train)
    assert 0.3 <= i2t <= 0.75, i2t
    assert 0.1 <= t2i <= i2t, t2i  # chance is 1/500


# ---------------------------------------------------------------------------------------------
# Command line

SMALL = ["--images", "40", "--captions", "3", "--image-dim", "16", "--text-dim", "12",
         "--val-images", "8", "--test-images", "6", "--tuning-size", "50"]


def test_cli_synth_then_check(tmp_path, capsys):
    data.main(["synth", "--out", str(tmp_path), *SMALL])
    for name in ("train", "train_tuning", "val", "test"):
        for suffix in ("_image_embeddings.npy", "_text_embeddings.npy", "_metadata.json"):
            assert (tmp_path / f"{name}{suffix}").is_file()
    assert data.load_named_set(tmp_path, "train_tuning").rows == 50
    capsys.readouterr()

    data.main(["check", str(tmp_path), "val"])
    out = capsys.readouterr().out
    assert "val: 24 rows, 8 images (3 captions each), image_dim 16, text_dim 12" in out


def test_cli_split(tmp_path, capsys):
    image_rows, text_rows, ids = data.synthesize(50, 4, 6, 5, seed=2)
    data.write_embedding_set(tmp_path, "train2017", image_rows, text_rows, ids)
    data.write_embedding_set(tmp_path, "val2017", image_rows[:20], text_rows[:20], ids[:20])
    out = tmp_path / "split"
    data.main(["split", "--source-dir", str(tmp_path), "--out", str(out), "--tuning-size", "30"])
    printed = capsys.readouterr().out
    assert "leakage check: 0 shared image ids" in printed

    sets = {n: data.load_named_set(out, n) for n in ("train", "test", "train_tuning", "val")}
    assert (sets["train"].n_images, sets["test"].n_images) == (40, 10)
    assert np.intersect1d(sets["train"].image_ids, sets["test"].image_ids).size == 0
    assert sets["train_tuning"].rows == 30
    assert np.isin(sets["train_tuning"].image_ids, sets["train"].image_ids).all()
    assert sets["val"].rows == 20


def test_cli_bad_input_exits_2_with_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        data.main(["check", str(tmp_path), "nope"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "nope_image_embeddings" in err


def test_cli_split_without_its_source_points_at_the_flags(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        data.main(["split", "--source-dir", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "\n" not in err
    assert "--source-dir" in err and "--source" in err and "data split`" not in err  # not "run split" again


def test_warnings_are_one_line_without_python_source(tmp_path):
    """A CLI's warning is one `warning: ...` line (Python's default shows the source line too)."""
    image_rows, text_rows, ids = _rows()
    image_rows = image_rows.copy()
    image_rows[np.flatnonzero(ids == ids[0])[-1]] += 1.0  # one image's rows now differ
    _write_set(tmp_path, "train", image_rows, text_rows, ids)
    done = subprocess.run([sys.executable, "-m", "xclip_jax.data", "check", str(tmp_path), "train"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("warning: ") and "rows differ" in lines[0], done.stderr


def test_validation_set_sharing_the_training_images_is_warned(tmp_path):
    image_rows, text_rows, ids = _rows()
    data.write_embedding_set(tmp_path, "train", image_rows, text_rows, ids)
    train = data.load_named_set(tmp_path, "train")
    with pytest.warns(UserWarning, match="the val set is the training set"):
        data.check_disjoint(train, dataclasses.replace(data.load_named_set(tmp_path, "train"), name="val"))
    other = train.subset_rows(np.arange(6), "val")
    with pytest.warns(UserWarning, match=f"shares {other.n_images} of its {other.n_images} images"):
        data.check_disjoint(train, other)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        data.check_disjoint(train, data.from_rows("val", image_rows, text_rows, np.char.add("new", ids)))


def test_cli_convert_without_inputs_exits_2(tmp_path):
    with pytest.raises(SystemExit) as e:
        data.main(["convert", str(tmp_path)])
    assert e.value.code == 2


def test_python_dash_m_entry_point(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "xclip_jax.data", "check", str(tmp_path), "train"],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2
    assert "train_image_embeddings" in result.stderr and "Traceback" not in result.stderr


def test_data_check_refuses_a_stale_npy_where_no_file_is_named(tmp_path, capsys):
    """`data check DIR NAME` names no file: the same rule as a named one. A .npy older than the .pt or
    .safetensors of the same name (here re-encoded with a NaN row) is refused, not checked as OK."""
    from tests.conftest import run_cli

    image_rows, text_rows, ids = _rows()
    data.write_embedding_set(tmp_path, "train", image_rows, text_rows, ids)
    fresh = text_rows.astype(np.float32).copy()
    fresh[3] = np.nan
    save_file({"embeddings": fresh}, tmp_path / "train_text_embeddings.safetensors")
    npy = tmp_path / "train_text_embeddings.npy"
    os.utime(npy, (npy.stat().st_mtime - 60,) * 2)
    err = run_cli(data.main, ["check", str(tmp_path), "train"], capsys)
    assert "train_text_embeddings.safetensors is newer than its converted train_text_embeddings.npy" in err
    assert "python -m xclip_jax.data convert" in err
