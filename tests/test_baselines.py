"""Closed-form baselines against float64 textbook references on small random data."""

import subprocess
import sys
import types

import numpy as np
import pytest

from xclip_jax import baselines
from xclip_jax.baselines import cli as _baselines_cli  # noqa: F401 - baselines.cli.main below
from xclip_jax.baselines import (
    best_baseline,
    compute_baselines,
    fit_cca,
    fit_procrustes,
    fit_ridge,
    format_baselines,
    score_baseline,
)

DIM_IMAGE, DIM_TEXT, CAPTIONS = 12, 16, 3


def make_split(seed, num_images, noise=1.0, image_offset=0.0, text_offset=0.0):
    """Images and captions sharing a 6-dim linear signal; captions in shuffled order."""
    mixing = np.random.default_rng(1234)  # the same relation in every split
    to_image = mixing.standard_normal((6, DIM_IMAGE))
    to_text = mixing.standard_normal((6, DIM_TEXT))
    rng = np.random.default_rng(seed)
    latent = rng.standard_normal((num_images, 6))
    row_image = rng.permutation(np.repeat(np.arange(num_images), CAPTIONS)).astype(np.int32)
    image = latent @ to_image + noise * rng.standard_normal((num_images, DIM_IMAGE))
    text = latent[row_image] @ to_text + noise * rng.standard_normal((row_image.size, DIM_TEXT))
    return types.SimpleNamespace(
        image=(image + image_offset).astype(np.float32),
        text=(text + text_offset).astype(np.float32),
        row_image=row_image,
    )


@pytest.fixture(scope="module")
def train():
    # Offsets far above the spread: centring must not cancel away the covariance in float32.
    return make_split(0, 300, image_offset=100.0, text_offset=-30.0)


def centred_pairs64(split):
    x = split.image[split.row_image].astype(np.float64)
    y = split.text.astype(np.float64)
    return x - x.mean(0), y - y.mean(0), x.mean(0), y.mean(0)


def assert_close(got, want, rel=2e-4):
    """Equal up to float32 error, measured against the largest entry."""
    got = np.asarray(got, dtype=np.float64)
    np.testing.assert_allclose(got, want, rtol=0, atol=rel * np.abs(want).max())


@pytest.mark.parametrize("direction", ["t2i", "i2t"])
def test_ridge_matches_float64_solve(train, direction):
    xc, yc, mean_x, mean_y = centred_pairs64(train)
    if direction == "t2i":
        xc, yc = yc, xc
    lam = 0.05
    gram = xc.T @ xc
    want = np.linalg.solve(gram + lam * np.trace(gram) / gram.shape[0] * np.eye(gram.shape[0]),
                           xc.T @ yc)

    fitted = fit_ridge(train.image, train.text, train.row_image, direction=direction, lam=lam)

    assert fitted.name == {"t2i": "ridge t→i", "i2t": "ridge i→t"}[direction]
    assert fitted.param == {"lambda": lam} and fitted.fit_seconds > 0
    weights, identity_side = (
        (fitted.text_map, fitted.image_map) if direction == "t2i"
        else (fitted.image_map, fitted.text_map)
    )
    assert identity_side is None
    assert_close(weights, want)
    assert_close(fitted.image_mean, mean_x)
    assert_close(fitted.text_mean, mean_y)
    # Fitted values on the training rows: the regression's own output, centring included.
    fitted_values = (
        fitted.project_texts(train.text) if direction == "t2i"
        else fitted.project_images(train.image)[train.row_image]
    )
    assert_close(fitted_values, xc @ want)


def cca_reference(xc, yc, eps):
    """Regularised CCA from the eigenproblem Cxx⁻¹ Cxy Cyy⁻¹ Cyx a = ρ² a, in float64."""
    rows = xc.shape[0]
    cxx, cyy, cxy = xc.T @ xc / rows, yc.T @ yc / rows, xc.T @ yc / rows
    cxx += eps * np.trace(cxx) / cxx.shape[0] * np.eye(cxx.shape[0])
    cyy += eps * np.trace(cyy) / cyy.shape[0] * np.eye(cyy.shape[0])
    values, vectors = np.linalg.eig(np.linalg.solve(cxx, cxy) @ np.linalg.solve(cyy, cxy.T))
    order = np.argsort(-values.real)
    rho = np.sqrt(np.clip(values.real[order], 0, None))
    a = vectors.real[:, order]
    a /= np.sqrt(np.einsum("dj,de,ej->j", a, cxx, a))  # aᵀ Cxx a = 1
    b = np.linalg.solve(cyy, cxy.T @ a) / rho  # paired with a, so bᵀ Cyy b = 1
    return rho, a, b, cxx, cyy, cxy


def test_cca_matches_float64_eigenproblem(train):
    xc, yc, _, _ = centred_pairs64(train)
    k, eps = 8, 1e-2
    rho, a, b, cxx, _, cxy = cca_reference(xc, yc, eps)
    assert rho[k - 1] - rho[k] > 1e-2  # a gap, so the top-k subspace is well defined

    fitted = fit_cca(train.image, train.text, train.row_image, k=k, eps=eps)

    assert fitted.name == f"CCA-{k}" and fitted.param == {"k": k}
    assert_close(fitted.correlations, rho[:k], rel=1e-5)
    # Each side is scaled by ρ: undo it, then the directions must satisfy the CCA constraints.
    dirs_x = np.asarray(fitted.image_map, np.float64) / rho[:k]
    dirs_y = np.asarray(fitted.text_map, np.float64) / rho[:k]
    assert_close(dirs_x.T @ cxx @ dirs_x, np.eye(k), rel=1e-4)
    assert_close(dirs_x.T @ cxy @ dirs_y, np.diag(rho[:k]), rel=1e-4)
    # The score's bilinear form Σ ρ_j² a_j b_jᵀ does not depend on the directions' signs.
    assert_close(fitted.image_map @ fitted.text_map.T, (a[:, :k] * rho[:k] ** 2) @ b[:, :k].T)


def test_procrustes_matches_float64_svd(train):
    xc, yc, _, _ = centred_pairs64(train)
    k, eps = 6, 1e-2

    def whitened_pca(c):
        values, vectors = np.linalg.eigh(c.T @ c / c.shape[0])
        values, vectors = values[::-1], vectors[:, ::-1]
        return vectors[:, :k] / np.sqrt(values[:k] + eps * values.mean()), values

    pca_x, _ = whitened_pca(xc)
    pca_y, values_y = whitened_pca(yc)
    u, _, vt = np.linalg.svd((xc @ pca_x).T @ (yc @ pca_y))
    rotation = u @ vt

    fitted = fit_procrustes(train.image, train.text, train.row_image, k=k, eps=eps)

    assert fitted.name == f"Procrustes-{k}" and fitted.param == {"k": k}
    # PCA axes are defined up to sign; the bilinear form image_map @ text_mapᵀ is not.
    assert_close(fitted.image_map @ fitted.text_map.T, pca_x @ rotation @ pca_y.T)
    # The shared space is the captions' whitened PCA space.
    text_map = np.asarray(fitted.text_map, np.float64)
    floor = eps * values_y.mean()
    assert_close(text_map.T @ (yc.T @ yc / yc.shape[0]) @ text_map,
                 np.diag(values_y[:k] / (values_y[:k] + floor)), rel=1e-4)
    # The fitted rotation beats a random orthogonal one on the Procrustes objective.
    image_map = np.asarray(fitted.image_map, np.float64)
    loss = np.linalg.norm(xc @ image_map - yc @ text_map)
    random_q = np.linalg.qr(np.random.default_rng(5).standard_normal((k, k)))[0]
    assert loss < np.linalg.norm(xc @ pca_x @ random_q - yc @ pca_y)


def test_cca_recovers_planted_relation():
    rng = np.random.default_rng(7)
    latent_dim, num_images = 4, 400
    to_x = rng.standard_normal((latent_dim, 8))
    to_y = rng.standard_normal((latent_dim, 10))

    def sample(n):
        z = rng.standard_normal((n, latent_dim))
        row_image = rng.permutation(np.repeat(np.arange(n), CAPTIONS)).astype(np.int32)
        x = z @ to_x + 0.01 * rng.standard_normal((n, 8))
        y = z[row_image] @ to_y + 0.01 * rng.standard_normal((row_image.size, 10))
        # Pure-noise dimensions: independent between the two sides, as loud as the signal.
        x = np.hstack([x, 2 * rng.standard_normal((n, DIM_IMAGE - 8))]) + 3.0
        y = np.hstack([y, 2 * rng.standard_normal((row_image.size, DIM_TEXT - 10))]) - 1.0
        return x.astype(np.float32), y.astype(np.float32), row_image

    fitted_all = fit_cca(*sample(num_images), k=DIM_IMAGE, eps=1e-4)
    rho = np.asarray(fitted_all.correlations)
    assert np.all(rho[:latent_dim] > 0.99), rho
    assert np.all(rho[latent_dim:] < 0.3), rho

    fitted = fit_cca(*sample(num_images), k=latent_dim, eps=1e-4)
    held_out = score_baseline(fitted, *sample(200), ks=(1, 5))
    assert held_out["r1"] > 0.9, held_out


def test_chunked_memory_mapped_moments_match_in_memory(train, tmp_path):
    paths = {}
    for name in ("image", "text", "row_image"):
        paths[name] = tmp_path / f"{name}.npy"
        np.save(paths[name], getattr(train, name))
    mapped = {name: np.load(path, mmap_mode="r") for name, path in paths.items()}
    # 64 does not divide 900 rows: the last chunk is padded and masked.
    chunked = fit_ridge(mapped["image"], mapped["text"], mapped["row_image"], chunk_rows=64)
    whole = fit_ridge(train.image, train.text, train.row_image, chunk_rows=10_000)
    assert_close(chunked.text_map, np.asarray(whole.text_map), rel=1e-5)
    assert_close(chunked.image_mean, np.asarray(whole.image_mean), rel=1e-6)


@pytest.fixture(scope="module")
def splits():
    # Few rows per dimension and loud noise, so the hyperparameters actually matter.
    return make_split(10, 40, noise=2.0), make_split(11, 60, noise=2.0), make_split(12, 60, noise=2.0)


GRID = dict(ridge_lambdas=(1e-3, 1e-1, 1.0, 10.0), dims=(2, 4, 8, 64))


def test_compute_baselines_tunes_on_val(splits):
    train_split, val, test = splits
    results = compute_baselines(train_split, val, test, ks=(1, 5), **GRID)

    assert [r["name"].split("-")[0] for r in results] == [
        "ridge t→i", "ridge i→t", "CCA", "Procrustes"
    ]
    for r in results:
        assert set(r) >= {"name", "param", "fit_seconds", "val", "test"}
        assert r["fit_seconds"] > 0
        for split in ("val", "test"):
            assert {"i2t_recall@1", "i2t_recall@5", "t2i_recall@1", "t2i_recall@5", "r1"} <= set(
                r[split]
            )

    def val_r1(fitted):
        return score_baseline(fitted, val.image, val.text, val.row_image, ks=(1, 5))["r1"]

    fits = {
        "ridge t→i": ("lambda", GRID["ridge_lambdas"],
                      lambda v: fit_ridge(train_split.image, train_split.text,
                                          train_split.row_image, direction="t2i", lam=v)),
        "ridge i→t": ("lambda", GRID["ridge_lambdas"],
                      lambda v: fit_ridge(train_split.image, train_split.text,
                                          train_split.row_image, direction="i2t", lam=v)),
        # 64 is capped at min(Di, Dt, rows) = 12.
        "CCA": ("k", (2, 4, 8, 12),
                lambda v: fit_cca(train_split.image, train_split.text, train_split.row_image, k=v)),
        "Procrustes": ("k", (2, 4, 8, 12),
                       lambda v: fit_procrustes(train_split.image, train_split.text,
                                                train_split.row_image, k=v)),
    }
    for r in results:
        key, grid, fit = fits[r["name"].split("-")[0]]
        tried = [entry["param"][key] for entry in r["search"]]
        assert set(grid) <= set(tried)  # the grid, extended past an end where the choice sat
        scores = [val_r1(fit(v)) for v in tried]
        assert len(set(scores)) > 1, (r["name"], scores)  # otherwise the choice proves nothing
        assert r["param"] == {key: tried[int(np.argmax(scores))]}, (r["name"], scores)
        assert r["val"]["r1"] == pytest.approx(max(scores), abs=1e-12)
        assert [s["val_r1"] for s in r["search"]] == pytest.approx(scores, abs=1e-12)
        chosen = fit(r["param"][key])
        test_metrics = score_baseline(chosen, test.image, test.text, test.row_image, ks=(1, 5))
        assert r["test"]["r1"] == pytest.approx(test_metrics["r1"], abs=1e-12)

    best = best_baseline(results)
    assert best["val"]["r1"] == max(r["val"]["r1"] for r in results)

    lines = [line for line in format_baselines(results).splitlines() if not line.startswith("note: ")]
    assert len(lines) == 2 + len(results)  # two header lines, one line per baseline
    for r in results:
        assert sum(line.startswith(r["name"] + " ") for line in lines) == 1
    assert len({len(line) for line in lines}) == 1  # fixed width


def test_a_choice_at_the_edge_of_its_grid_extends_it_or_is_noted(splits):
    """Ridge's smallest λ (or CCA's largest k) wins: the grid goes on past that end until the choice
    is inside it; a choice that stays at an end is noted under the table."""
    train_split, val, test = splits
    results = compute_baselines(train_split, val, test, ks=(1, 5), ridge_lambdas=(1.0, 10.0, 100.0), dims=(2, 4))
    ridge = results[0]
    tried = [entry["param"]["lambda"] for entry in ridge["search"]]
    assert min(tried) < 1.0  # the best of 1, 10, 100 was 1: smaller values were tried
    if ridge["edge"] is None:
        assert tried.index(ridge["param"]["lambda"]) not in (0, len(tried) - 1)
    cca = results[2]
    assert cca["param"]["k"] > 4 or cca["edge"] is None  # extended past k = 4 where the choice sat
    noted = {r["name"] for r in results if r["edge"]}
    notes = [line for line in format_baselines(results).splitlines() if line.startswith("note: ")]
    assert len(notes) == len(noted) and all(any(name in n for n in notes) for name in noted)
    limit = [r for r in results if r["edge"] == "limit"]
    assert all("every dimension the data allow" in n for n in notes if any(r["name"] in n for r in limit))


def test_compute_baselines_without_test_set(splits):
    train_split, val, _ = splits
    results = compute_baselines(train_split, val, **GRID)
    assert all(r["test"] is None and r["val"]["r1"] > 0 for r in results)
    body = [line for line in format_baselines(results).splitlines()[2:] if not line.startswith("note: ")]
    assert len(body) == len(results)
    assert all(line.rstrip().endswith("-") for line in body)
    with pytest.raises(ValueError):
        best_baseline([])


def test_rejects_bad_training_data(train):
    with pytest.raises(ValueError, match="row_image"):
        fit_ridge(train.image, train.text, train.row_image + 1000)
    constant = np.ones_like(train.image)
    with pytest.raises(ValueError, match="constant"):
        fit_cca(constant, train.text, train.row_image, k=4)


def test_module_imports_only_core():
    code = (
        "import sys, xclip_jax.baselines\n"
        "bad = [m for m in ('optuna', 'xclip_jax.config', 'xclip_jax.data') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    assert set(baselines.__all__) >= {
        "fit_ridge", "fit_cca", "fit_procrustes", "compute_baselines", "best_baseline",
        "format_baselines",
    }


def test_a_linear_head_started_from_cca_ranks_as_the_cca_baseline():
    """init: cca: epoch 0 of a linear head is already the CCA baseline (same directions, same scaling
    up to one factor, which cosine ranking ignores); a siglip head's outputs are CCA's on its
    LayerNorm'd rows."""
    import jax

    from xclip_jax import data
    from xclip_jax.spec import HeadSpec, LossSpec, TrainingSpec
    from xclip_jax.baselines import with_head_init
    from xclip_jax.metrics import retrieval_metrics_indexed
    from xclip_jax.encode import project
    from xclip_jax.spec import RunSpec
    from xclip_jax.step import create_train_state, to_device

    def evaluate(params, spec, data, ks):
        return retrieval_metrics_indexed(*project(params, spec, data), data.row_image_R, ks=ks)

    sets = data.synthetic_splits(n_images=300, captions_per_image=3, image_dim=12, text_dim=16, val_images=80,
                                 test_images=10, noise=0.5, seed=3)
    train, val = sets["train"], sets["val"]
    cca = baselines.fit_cca(train.image, train.text, train.row_image, k=8)
    want = baselines.score_baseline(cca, val.image, val.text, val.row_image, ks=(1, 5, 10))
    for head in ("linear", "siglip"):
        spec = RunSpec(HeadSpec(head, 8, init="cca"), LossSpec(), TrainingSpec(batch_size=64), 12, 16)
        fresh = create_train_state(spec, seed=0)
        started = with_head_init(fresh, [spec.head], train)
        got = evaluate(started.params, spec, to_device(val), ks=(1, 5, 10))
        if head == "linear":
            assert got == pytest.approx(want, abs=1e-9)
            default = evaluate(create_train_state(spec, seed=0).params, spec, to_device(val), ks=(1, 5, 10))
            assert got["r1"] > 2 * default["r1"], (got["r1"], default["r1"])
        else:
            standardized = [baselines.moments.standardize(np.asarray(x)) for x in (train.image, train.text, val.image)]
            cca_ln = baselines.fit_cca(standardized[0], standardized[1], train.row_image, k=8)
            zi = np.asarray(project(started.params, spec, to_device(val))[0])
            ref = np.asarray(cca_ln.project_images(standardized[2]))
            np.testing.assert_allclose(zi, ref / np.linalg.norm(ref, axis=1, keepdims=True), atol=1e-5)
        jax.tree.map(np.testing.assert_array_equal, started.params["loss"], fresh.params["loss"])


def test_cli_prints_the_table_for_a_config(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("data: {synthetic: {images: 200, captions: 3, image_dim: 12, text_dim: 16, val_images: 60, "
                    "test_images: 40, seed: 1}}\n")
    assert baselines.cli.main([str(path), "--out", str(tmp_path / "b.json")]) == 0
    out = capsys.readouterr().out
    assert "CCA-" in out and "Procrustes-" in out and "ridge t→i" in out
    import json

    assert [r["name"] for r in json.loads((tmp_path / "b.json").read_text())][:2] == ["ridge t→i", "ridge i→t"]


def test_the_warm_start_cache_keeps_only_the_cca_solution():
    """A runner's cache serves the CCA solution to every later trial; the columns past the CCA
    directions and the linear bias there stay each trial's own (its seed's), in a bundle too: what a
    trial starts from never depends on what its runner ran before."""
    import jax

    from xclip_jax import data
    from xclip_jax.spec import HeadSpec, LossSpec, TrainingSpec
    from xclip_jax.baselines import with_head_init
    from xclip_jax.programs import Programs
    from xclip_jax.model import hparams, stack
    from xclip_jax.padding import program_key
    from xclip_jax.spec import RunSpec
    from xclip_jax.step import create_train_state, fresh_states

    train = data.synthetic_splits(n_images=200, captions_per_image=3, image_dim=12, text_dim=16, val_images=20,
                                  test_images=10, noise=0.5, seed=3)["train"]
    spec = RunSpec(HeadSpec("linear", 24, init="cca"), LossSpec(), TrainingSpec(batch_size=64), 12, 16)
    cache = {}
    first = with_head_init(create_train_state(spec, seed=0), [spec.head], train, cache)
    assert list(cache) == [("linear", 24)]
    served = with_head_init(create_train_state(spec, seed=1), [spec.head], train, cache)
    fresh = with_head_init(create_train_state(spec, seed=1), [spec.head], train)  # a new process: no cache
    jax.tree.map(np.testing.assert_array_equal, served.params, fresh.params)
    k = 12  # min(output 24, dims 12, 16): the columns past it are the seed's own draws
    a, b = (np.asarray(s.params["image"]["Dense_0"]["kernel"]) for s in (first, served))
    np.testing.assert_array_equal(a[:, :k], b[:, :k])
    assert not np.allclose(a[:, k:], b[:, k:])
    assert not np.allclose(first.params["text"]["Dense_0"]["bias"][k:], served.params["text"]["Dense_0"]["bias"][k:])
    key = program_key(spec)
    bundle = fresh_states(key, stack([hparams(spec, 0), hparams(spec, 1)]), Programs().init_fn(key, 2))
    bundle = with_head_init(bundle, [spec.head] * 2, train, cache)
    for i, alone in enumerate((first, fresh)):
        # the runner's init program is compiled with fewer optimisations: the same draws, to the last bit or two
        jax.tree.map(lambda m, x: np.testing.assert_allclose(m[i], x, rtol=1e-6, atol=1e-7), bundle.params, alone.params)
