"""The fit loop and the training CLI end to end: outputs, checkpoints restored in a fresh process,
resume, the final evaluation's features and pictures, evaluate."""

import json
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
import yaml

from xclip_jax import checkpoint, data, fit, train
from xclip_jax.config import load_train_config
from xclip_jax.evaluate import evaluate_checkpoint
from xclip_jax.metrics import retrieval_metrics_indexed
from xclip_jax.encode import encode
from xclip_jax.errors import UserError
from xclip_jax.spec import RunSpec
from xclip_jax.step import to_device

CONFIG = textwrap.dedent("""\
    experiment_name: tiny
    output_dir: {out}
    seed: 3
    data:
      synthetic: {{images: 600, captions: 5, image_dim: 24, text_dim: 40, val_images: 100, test_images: 80,
                  noise: 0.5, seed: 0}}
    model: {{type: {head}, output_dim: 16, hidden_dim: 32, dropout: 0.1, num_heads: 4, num_layers: 1}}
    training: {{batch_size: 128, learning_rate: 3.0e-3, weight_decay: 1.0e-4, num_epochs: {epochs}, patience: 10}}
    loss: {{type: {loss}, temperature: 0.07, learnable_scale: true, queue_size: 256}}
    evaluation: {{top_k: [1, 5, 10], visualization_samples: 60, tsne_perplexity: 10, save_features: {features}}}
""")


def write_config(tmp_path, name="cfg.yaml", head="clip", loss="softmax_infonce", epochs=3, features=False):
    path = tmp_path / name
    path.write_text(CONFIG.format(out=tmp_path / "out", head=head, loss=loss, epochs=epochs,
                                  features=str(features).lower()))
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("train")
    cfg_path = write_config(tmp, head="attention", loss="queue_infonce", features=True)
    train.main([str(cfg_path), "--no-progress"])
    return tmp, cfg_path, tmp / "out" / "tiny"


def test_cli_writes_every_output(trained):
    _, _, run = trained
    history = json.loads((run / "training_history.json").read_text())
    assert [h["epoch"] for h in history] == [0, 1, 2]
    for h in history:
        assert {"train_loss", "val_loss", "val_r1", "temperature", "epoch_time"} <= set(h)
        assert np.isfinite(h["train_loss"]) and np.isfinite(h["val_loss"])
    png = (run / "training_curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    metrics = json.loads((run / "metrics.json").read_text())
    assert {"test", "val", "best_epoch", "best_val_r1"} <= set(metrics)
    assert set(metrics["test"]) >= {"i2t_recall@1", "t2i_recall@10", "i2t_median_rank", "mean_recall"}
    assert metrics["val"]["r1"] == pytest.approx(metrics["best_val_r1"])
    assert checkpoint.latest_step(run / "checkpoint") == metrics["best_epoch"]
    for picture in ("test_pca.png", "test_tsne.png"):
        assert (run / picture).read_bytes()[:4] == b"\x89PNG" and (run / picture).stat().st_size > 5000


def test_save_features_writes_the_test_projections_and_their_similarity(trained):
    _, _, run = trained
    feats = run / "features"
    zi, zt = np.load(feats / "test_image_features.npy"), np.load(feats / "test_text_features.npy")
    row_image, sim = np.load(feats / "test_row_image.npy"), np.load(feats / "test_similarity.npy")
    heads = checkpoint.restore(run / "checkpoint")
    test = data.load_sets(heads.config.data, heads.config.base_data_dir, splits=("test",), announce=None)["test"]
    assert zi.shape == (test.n_images, 16) and zt.shape == (test.rows, 16) and sim.shape == (test.n_images, test.rows)
    np.testing.assert_allclose(zi, heads.encode_images(test.image), atol=1e-6)
    np.testing.assert_allclose(zt, heads.encode_texts(test.text), atol=1e-6)
    np.testing.assert_array_equal(row_image, test.row_image)
    np.testing.assert_allclose(sim, zi.astype(np.float64) @ zt.T.astype(np.float64), atol=1e-5)
    # the saved features reproduce the saved test metrics
    metrics = json.loads((run / "metrics.json").read_text())["test"]
    assert retrieval_metrics_indexed(zi, zt, row_image, ks=(1, 5, 10)) == pytest.approx(metrics)


def test_pictures_without_scikit_learn_say_so_and_draw_the_pca(tmp_path, monkeypatch):
    from xclip_jax import figures

    monkeypatch.setitem(sys.modules, "sklearn.manifold", None)
    rng = np.random.default_rng(0)
    zi, zt = rng.standard_normal((30, 8)), rng.standard_normal((90, 8))
    said = []
    written = figures.embedding_figures(zi, zt, np.repeat(np.arange(30), 3), samples=40, perplexity=5,
                                        out_dir=tmp_path, prefix="test", announce=said.append)
    assert written == [tmp_path / "test_pca.png"] and (tmp_path / "test_pca.png").stat().st_size > 5000
    assert len(said) == 1 and "scikit-learn" in said[0] and "pip install 'scikit-learn>=1.3'" in said[0]


def test_pca_matches_a_float64_reference():
    from xclip_jax.figures import pca

    rng = np.random.default_rng(1)
    x = rng.standard_normal((200, 6)) @ rng.standard_normal((6, 6)) + 3.0
    projected, ratio = pca(x, 4)
    eigval, eigvec = np.linalg.eigh(np.cov(x.T))
    order = np.argsort(eigval)[::-1]
    np.testing.assert_allclose(ratio, eigval[order][:4] / eigval.sum(), rtol=1e-8)
    ref = (x - x.mean(0)) @ eigvec[:, order[:4]]
    np.testing.assert_allclose(np.abs(projected), np.abs(ref), atol=1e-8)  # up to each axis' sign


def test_device_key(capsys):
    import jax

    assert train.select_device("auto") is None
    assert train.select_device("cpu") == jax.devices("cpu")[0]
    if jax.default_backend() == "cpu":  # no GPU here: cuda falls back to the CPU with one warning line
        with pytest.warns(UserWarning, match="no GPU"):
            assert train.select_device("cuda:0") == jax.devices("cpu")[0]


def test_every_run_says_where_each_split_was_read_from(tmp_path):
    said = []
    cfg = load_train_config(write_config(tmp_path))
    sets = data.load_sets(cfg.data, cfg.base_data_dir, announce=said.append)
    assert [line.split(" <- ")[0] for line in said] == ["data: train", "data: val", "data: test"]
    assert all("synthetic" in line for line in said)
    assert said[0].endswith(f"{sets['train'].rows:,} rows, {sets['train'].n_images:,} images")


def test_restore_in_a_fresh_process_matches_in_process_heads(trained, tmp_path):
    _, cfg_path, run = trained
    rng = np.random.default_rng(0)
    x_img, x_txt = rng.normal(size=(9, 24)).astype(np.float32), rng.normal(size=(7, 40)).astype(np.float32)
    np.save(tmp_path / "img.npy", x_img)
    np.save(tmp_path / "txt.npy", x_txt)
    code = textwrap.dedent(f"""
        import numpy as np
        from xclip_jax.checkpoint import restore
        h = restore({str(run / "checkpoint")!r})
        assert (h.image_dim, h.text_dim) == (24, 40) and h.config.model.type == "attention"
        np.save({str(tmp_path / "zi.npy")!r}, np.asarray(h.encode_images(np.load({str(tmp_path / "img.npy")!r}))))
        np.save({str(tmp_path / "zt.npy")!r}, np.asarray(h.encode_texts(np.load({str(tmp_path / "txt.npy")!r}))))
    """)
    subprocess.run([sys.executable, "-c", code], check=True)
    params, meta = checkpoint.load_raw(run / "checkpoint")
    cfg = load_train_config(cfg_path)
    spec = RunSpec.of(cfg, 24, 40)
    zi = encode(spec, "image", jax.device_put(params["image"]), x_img)
    zt = encode(spec, "text", jax.device_put(params["text"]), x_txt)
    np.testing.assert_allclose(np.load(tmp_path / "zi.npy"), zi, atol=1e-6)
    np.testing.assert_allclose(np.load(tmp_path / "zt.npy"), zt, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(np.load(tmp_path / "zi.npy"), axis=1), 1.0, atol=1e-5)
    assert meta["image_dim"] == 24 and meta["version"]


def test_evaluate_matches_retrieval_metrics(trained):
    _, cfg_path, run = trained
    got = evaluate_checkpoint(run / "checkpoint", "test")
    metrics = json.loads((run / "metrics.json").read_text())
    assert got == pytest.approx(metrics["test"])
    heads = checkpoint.restore(run / "checkpoint")
    test = data.load_sets(heads.config.data, heads.config.base_data_dir, splits=("test",))["test"]
    want = retrieval_metrics_indexed(heads.encode_images(test.image), heads.encode_texts(test.text),
                                     test.row_image, ks=(1, 5, 10))
    assert got == pytest.approx(want)


def test_evaluate_cli(trained, capsys):
    from xclip_jax import evaluate

    _, _, run = trained
    assert evaluate.main([str(run / "checkpoint"), "--set", "val"]) == 0
    assert "i2t" in capsys.readouterr().out
    assert json.loads((run / "checkpoint" / "metrics_val.json").read_text())["r1"] > 0


def _files(d, first_id=0):
    """Small real embedding files (train_tuning, val, test), as `data split` would write them."""
    from xclip_jax import data

    sets = data.synthetic_splits(n_images=120, captions_per_image=5, image_dim=24, text_dim=40, val_images=30,
                                 test_images=30, noise=0.5, seed=2)
    for name, split in (("train_tuning", "train"), ("val", "val"), ("test", "test")):
        data.save_set(d, sets[split], name)
    return d


def test_evaluate_a_trial_checkpoint_over_real_files(tmp_path, capsys):
    """A tuning trial's checkpoint (its config names files, train_tuning_* among them): --set test and
    --set val work, and each checkpoint keeps its own metrics file per set."""
    from xclip_jax import evaluate

    _files(tmp_path / "data")
    raw = yaml.safe_load(write_config(tmp_path, epochs=1).read_text())
    raw["base_data_dir"] = str(tmp_path / "data")
    raw["data"] = {f"{s}_{p}": f"{f}_{p}.{'json' if p == 'metadata' else 'pt'}"
                   for s, f in (("train", "train_tuning"), ("val", "val"), ("test", "test"))
                   for p in ("image_embeddings", "text_embeddings", "metadata")}
    ckpts = []
    for number in (0, 1):
        raw["seed"] = number
        raw["output_dir"] = str(tmp_path / f"run{number}")
        cfg_path = tmp_path / f"trial{number}.yaml"
        cfg_path.write_text(yaml.safe_dump(raw))
        train.main([str(cfg_path), "--no-progress"])
        ckpts.append(tmp_path / f"run{number}" / "tiny" / "checkpoint")
    out = capsys.readouterr().out
    assert "data: train <- " + str(tmp_path / "data" / "train_tuning_image_embeddings.npy") in out  # .pt -> .npy
    for ckpt in ckpts:
        for split in ("test", "val"):
            assert evaluate.main([str(ckpt), "--set", split]) == 0
    files = {ckpt / f"metrics_{split}.json" for ckpt in ckpts for split in ("test", "val")}
    assert len(files) == 4 and all(f.is_file() for f in files)
    m0, m1 = (json.loads((c / "metrics_test.json").read_text()) for c in ckpts)
    assert m0 != m1  # two trials' metrics, neither overwriting the other
    assert m0 == pytest.approx(evaluate_checkpoint(ckpts[0], "test"))


def test_resume_gives_the_same_result(tmp_path, capsys):
    """Two epochs, stop, resume to four == four epochs in one go (same seed)."""
    full = tmp_path / "full"
    full.mkdir()
    train.main([str(write_config(full, epochs=4)), "--no-progress"])
    part = tmp_path / "part"
    part.mkdir()
    train.main([str(write_config(part, epochs=2)), "--no-progress"])
    train.main([str(write_config(part, epochs=2)), "--no-progress", "--resume", "--num-epochs", "4"])
    out = capsys.readouterr().out
    assert "resume: training.num_epochs 2 -> 4 (applied)" in out
    assert "\nresuming from epoch 3 (best so far: epoch " in out  # counted from 1
    # every finished run ends with what to do with its heads
    ckpt = part / "out" / "tiny" / "checkpoint"
    assert out.count(f"\nnext: python -m xclip_jax.export {ckpt} --format safetensors") == 2, out
    assert f"python -m xclip_jax.evaluate {ckpt} --set NAME" in out
    # each run says once, at start, what it trains with (the config's values, the defaults filled in)
    assert out.count("\nsettings: model clip (output_dim 16, hidden_dim 32, dropout 0.1); loss softmax_infonce "
                     "(temperature 0.07, learnable_temp true); training batch_size 128, learning_rate 0.003, "
                     "weight_decay 0.0001, num_epochs ") == 3
    h_full = json.loads((full / "out/tiny/training_history.json").read_text())
    h_part = json.loads((part / "out/tiny/training_history.json").read_text())
    assert [h["epoch"] for h in h_part] == [0, 1, 2, 3]
    np.testing.assert_allclose([h["train_loss"] for h in h_part], [h["train_loss"] for h in h_full], rtol=1e-5)
    np.testing.assert_allclose([h["val_r1"] for h in h_part], [h["val_r1"] for h in h_full])
    p_full, _ = checkpoint.load_raw(full / "out/tiny/checkpoint")
    p_part, _ = checkpoint.load_raw(part / "out/tiny/checkpoint")
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), p_full, p_part)


def test_training_again_into_an_earlier_run_refuses_and_keeps_it(tmp_path):
    """A second run without --resume into a folder holding a run would mix its checkpoints with the
    earlier run's (the newest step wins): it stops in one line before training, and nothing changes."""
    cfg = write_config(tmp_path, epochs=2)
    train.main([str(cfg), "--no-progress"])
    run = tmp_path / "out" / "tiny"
    before, meta = checkpoint.load_raw(run / "checkpoint")
    metrics = (run / "metrics.json").read_text()
    with pytest.raises(UserError, match=r"holds an earlier run's checkpoint; continue it with --resume"):
        train.main([str(cfg), "--no-progress", "--num-epochs", "1"])
    after, meta_after = checkpoint.load_raw(run / "checkpoint")
    assert meta_after == meta and (run / "metrics.json").read_text() == metrics
    jax.tree.map(np.testing.assert_array_equal, before, after)


@pytest.mark.parametrize("change,said", [
    ({"training": {"learning_rate": 1.0e-2}}, "training.learning_rate (0.003 -> 0.01)"),
    ({"model": {"output_dim": 8}}, "model.output_dim (16 -> 8)"),
    ({"model": {"type": "siglip"}, "loss": {"type": "sigmoid_infonce"}}, "loss.type ('softmax_infonce' -> "),
])
def test_resume_with_a_changed_config_is_refused_in_one_line(tmp_path, capsys, change, said):
    from xclip_jax.errors import cli

    path = write_config(tmp_path, epochs=1)
    train.main([str(path), "--no-progress"])
    raw = yaml.safe_load(path.read_text())
    for section, values in change.items():
        raw[section].update(values)
    raw["training"]["num_epochs"] = 3
    path.write_text(yaml.safe_dump(raw))
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        cli(train.main)([str(path), "--no-progress", "--resume"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert "cannot --resume" in err and said in err and "num_epochs" not in err


def test_interrupted_training_says_how_to_resume(capsys):
    from xclip_jax.errors import cli

    def interrupted(argv):
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as e:
        cli(interrupted, interrupted=train.INTERRUPTED)([])
    assert e.value.code == 130 and "--resume" in capsys.readouterr().err


def test_diverged_loss_is_a_clear_error(tmp_path, capsys):
    from xclip_jax.errors import cli

    path = write_config(tmp_path, epochs=2)
    raw = yaml.safe_load(path.read_text())
    raw["training"]["learning_rate"] = 1.0e38  # overflows the params
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(SystemExit) as e:
        cli(train.main)([str(path), "--no-progress"])
    assert e.value.code == 2
    assert "not finite" in capsys.readouterr().err


def _prune_at(epoch):
    def hook(record, fs, state):
        return "pruned" if record["epoch"] == epoch else None

    return hook


# Two combinations (the sigmoid loss's bias, the queue's carried state) at the fit-loop level; every
# head and loss is checked member by member, with a masked member, at the epoch level in test_step.py.
@pytest.mark.parametrize("head,loss", [("siglip", "sigmoid_infonce"), ("mlp", "queue_infonce")])
def test_members_of_a_bundle_report_what_they_would_alone(head, loss):
    """fit_bundle against fit, member by member (same seeds): the same intermediate values to float32
    tolerance; a member pruned at epoch 1 reports no further; one whose loss goes NaN stops as
    diverged while the others go on; the stopped ones are masked in the same program and the live ones
    still report what they would alone."""
    from xclip_jax.model import hparams, stack
    from xclip_jax.padding import program_key
    from xclip_jax.spec import HeadSpec, LossSpec, TrainingSpec
    from xclip_jax.step import create_train_state, fresh_states

    sets = data.synthetic_splits(n_images=400, captions_per_image=5, image_dim=24, text_dim=40, val_images=80,
                                 test_images=10, noise=0.5, seed=0)
    train_d, val_d = to_device(sets["train"]), to_device(sets["val"])

    def spec(lr, temperature, dropout):
        return RunSpec(HeadSpec(head, 16, 32, dropout, 4, 1), LossSpec(loss, temperature, queue_size=256),
                         TrainingSpec(batch_size=128, learning_rate=lr), 24, 40)

    specs = [spec(3e-3, 0.05, 0.1), spec(1e-2, 0.1, 0.0), spec(1e38, 0.07, 0.2), spec(1e-3, 0.2, 0.3)]
    hooks = [(), (_prune_at(1),), (), ()]
    states = fresh_states(program_key(specs[0]), stack([hparams(s, i) for i, s in enumerate(specs)]))
    final, bundled = fit.fit_bundle(states, train_d, val_d, num_epochs=3, patience=3, hooks=hooks, ks=(1, 5))
    # after epoch 1 two of four are live (one diverged, one pruned): they stay in the program of four, masked
    assert jax.tree.leaves(final.hp)[0].shape[0] == 4
    assert bundled[1].stopped == "pruned" and [h["epoch"] for h in bundled[1].history] == [0, 1]
    assert bundled[2].stopped.startswith("diverged") and not bundled[2].history
    for i in (0, 1, 3):
        _, alone = fit.fit(create_train_state(specs[i], seed=i), train_d, val_d, num_epochs=3, patience=3,
                             hooks=hooks[i], ks=(1, 5), progress=False)
        assert [h["epoch"] for h in bundled[i].history] == [h["epoch"] for h in alone.history]
        np.testing.assert_allclose([h["train_loss"] for h in bundled[i].history],
                                   [h["train_loss"] for h in alone.history], rtol=1e-4)
        np.testing.assert_allclose([h["val_r1"] for h in bundled[i].history], [h["val_r1"] for h in alone.history],
                                   atol=0.02)
        assert bundled[i].best_epoch == alone.best_epoch or abs(bundled[i].best_r1 - alone.best_r1) < 0.02
        jax.tree.map(lambda b, a: np.testing.assert_allclose(b, a, rtol=1e-3, atol=1e-4), bundled[i].best_params,
                     alone.best_params)


def test_an_evaluation_error_that_is_not_divergence_reaches_the_caller_as_itself(monkeypatch):
    """Only a non-finite loss or non-finite outputs are divergence ("lower learning_rate"); any other
    error in the evaluation goes up unchanged, so a trial's fail_reason says what it was."""
    from xclip_jax import encode
    from xclip_jax.spec import HeadSpec, LossSpec, RunSpec, TrainingSpec
    from xclip_jax.step import TrainingDiverged, create_train_state

    sets = data.synthetic_splits(n_images=100, captions_per_image=2, image_dim=8, text_dim=12, val_images=20,
                                 test_images=10, seed=0)

    def broken(*args, **kwargs):
        raise ValueError("top_k 60 is more than the 20 images")

    monkeypatch.setattr(encode, "summarise", broken)
    spec = RunSpec(HeadSpec("linear", 8), LossSpec(), TrainingSpec(batch_size=32), 8, 12)
    with pytest.raises(ValueError, match="top_k 60") as e:
        fit.fit(create_train_state(spec, seed=0), to_device(sets["train"]), to_device(sets["val"]), num_epochs=1,
                patience=1, progress=False)
    assert not isinstance(e.value, TrainingDiverged)


def test_num_epochs_below_one_is_refused(tmp_path, capsys):
    from tests.conftest import run_cli

    assert "--num-epochs 0: give a number of epochs >= 1" in run_cli(train.main, [str(write_config(tmp_path)),
                                                                               "--num-epochs", "0"], capsys)
    assert not (tmp_path / "out").exists()


def test_a_save_over_an_interrupted_one_says_nothing(tmp_path, capsys):
    """orbax removes the folder an interrupted save left (``<step>.orbax-checkpoint-tmp``) and logs a
    WARNING about it through absl; the user sees nothing of it."""
    import logging

    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("absl").addHandler(handler)
    try:
        (tmp_path / "3.orbax-checkpoint-tmp").mkdir()
        checkpoint.save_heads(tmp_path, {"w": np.zeros(3, np.float32)}, {}, {"epoch": 3}, step=3)
    finally:
        logging.getLogger("absl").removeHandler(handler)
    assert checkpoint.latest_step(tmp_path) == 3
    assert not [r for r in records if "Removing existing directory" in r.getMessage()], records
    assert "Removing existing directory" not in capsys.readouterr().err


def test_an_epoch_of_a_bundle_waits_on_the_device_once_and_fetches_only_improving_members(monkeypatch):
    """A 4-member bundle: each epoch fetches its metrics and validation in one transfer, then the params
    of the members that improved in one more, their slices only (never the whole bundle's per member);
    no implicit transfer anywhere in the loop, and no hook copies a member's state it does not ask for."""
    from xclip_jax.model import hparams, stack
    from xclip_jax.padding import program_key
    from xclip_jax.spec import HeadSpec, LossSpec, TrainingSpec
    from xclip_jax.step import fresh_states

    sets = data.synthetic_splits(n_images=300, captions_per_image=5, image_dim=24, text_dim=40, val_images=60,
                                 test_images=10, noise=0.5, seed=1)
    train_d, val_d = to_device(sets["train"]), to_device(sets["val"])
    specs = [RunSpec(HeadSpec("clip", 16, 32, 0.1), LossSpec(), TrainingSpec(batch_size=128, learning_rate=lr), 24, 40)
             for lr in (1e-2, 3e-3, 1e-3, 3e-4)]
    states = fresh_states(program_key(specs[0]), stack([hparams(s, i) for i, s in enumerate(specs)]))
    fetched, real = [], jax.device_get

    def counting(tree):
        fetched.append([x.shape[0] for x in jax.tree.leaves(tree)])
        return real(tree)

    monkeypatch.setattr(jax, "device_get", counting)
    asked = []
    hooks = [(lambda record, fs, state, i=i: asked.append(i) if i == 3 and state() is not None else None,)
             for i in range(4)]
    with jax.transfer_guard_device_to_host("disallow"):
        _, fits = fit.fit_bundle(states, train_d, val_d, num_epochs=3, patience=3, hooks=hooks, ks=(1, 5))
    r1 = [[h["val_r1"] for h in fs.history] for fs in fits]
    improved = [sum(e == 0 or r[e] > max(r[:e]) for r in r1) for e in range(3)]
    assert fetched[0] == [4] * len(fetched[0])  # the members' values, once, before the loop
    per_epoch = fetched[1:]
    assert len(per_epoch) == 3 + sum(n > 0 for n in improved), per_epoch  # one fetch, and one of the params
    params = [f for f in per_epoch if len(f) != len(per_epoch[0])]
    assert [set(f) for f in params] == [{n} for n in improved if n], (params, improved)
    assert asked == [3, 3, 3]
