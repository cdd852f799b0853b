"""The training CLI end to end, checkpoints restored in a fresh process, resume, evaluate."""

import json
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
import yaml

from xclip_jax import checkpoint, train
from xclip_jax.config import load_train_config
from xclip_jax.evaluate import evaluate_checkpoint
from xclip_jax.metrics import retrieval_metrics_indexed

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
    evaluation: {{top_k: [1, 5, 10]}}
""")


def write_config(tmp_path, name="cfg.yaml", head="clip", loss="softmax_infonce", epochs=3):
    path = tmp_path / name
    path.write_text(CONFIG.format(out=tmp_path / "out", head=head, loss=loss, epochs=epochs))
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("train")
    cfg_path = write_config(tmp, head="attention", loss="queue_infonce")
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
    spec = train.spec_from_config(cfg, 24, 40)
    zi = train.encode(spec, "image", jax.device_put(params["image"]), x_img)
    zt = train.encode(spec, "text", jax.device_put(params["text"]), x_txt)
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
    test = train.load_sets(heads.config, splits=("test",))["test"]
    want = retrieval_metrics_indexed(heads.encode_images(test.image), heads.encode_texts(test.text),
                                     test.row_image, ks=(1, 5, 10))
    assert got == pytest.approx(want)


def test_evaluate_cli(trained, capsys):
    from xclip_jax import evaluate

    _, _, run = trained
    assert evaluate.main([str(run / "checkpoint"), "--set", "val"]) == 0
    assert "i2t" in capsys.readouterr().out
    assert json.loads((run / "metrics_val.json").read_text())["r1"] > 0


def test_resume_gives_the_same_result(tmp_path):
    """Two epochs, stop, resume to four == four epochs in one go (same seed)."""
    full = tmp_path / "full"
    full.mkdir()
    train.main([str(write_config(full, epochs=4)), "--no-progress"])
    part = tmp_path / "part"
    part.mkdir()
    train.main([str(write_config(part, epochs=2)), "--no-progress"])
    train.main([str(write_config(part, epochs=4)), "--no-progress", "--resume"])
    h_full = json.loads((full / "out/tiny/training_history.json").read_text())
    h_part = json.loads((part / "out/tiny/training_history.json").read_text())
    assert [h["epoch"] for h in h_part] == [0, 1, 2, 3]
    np.testing.assert_allclose([h["train_loss"] for h in h_part], [h["train_loss"] for h in h_full], rtol=1e-5)
    np.testing.assert_allclose([h["val_r1"] for h in h_part], [h["val_r1"] for h in h_full])
    p_full, _ = checkpoint.load_raw(full / "out/tiny/checkpoint")
    p_part, _ = checkpoint.load_raw(part / "out/tiny/checkpoint")
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), p_full, p_part)


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
