"""A config that names no test set (the original tool's default.yaml names none): training says so
at its end with the command that makes one, and evaluating its checkpoint falls back to val (the
help's promise) instead of crashing. Also what a training run says about its device and epochs."""

import json
import subprocess
import sys

import numpy as np
import yaml

from tests.test_train import _files, write_config
from xclip_jax import train
from xclip_jax.figures import curves_figure


def _train_without_test(tmp_path, capsys, epochs=2):
    _files(tmp_path / "data")
    raw = yaml.safe_load(write_config(tmp_path, epochs=epochs).read_text())
    raw["base_data_dir"] = str(tmp_path / "data")
    raw["evaluation"]["visualization_samples"] = 0
    raw["data"] = {f"{s}_{p}": f"{f}_{p}.npy" if p != "metadata" else f"{f}_metadata.json"
                   for s, f in (("train", "train_tuning"), ("val", "val")) for p in ("image_embeddings",
                                                                                     "text_embeddings", "metadata")}
    raw["data"].update(test_image_embeddings=None, test_text_embeddings=None, test_metadata=None)
    cfg_path = tmp_path / "no_test.yaml"
    cfg_path.write_text(yaml.safe_dump(raw))
    assert train.main([str(cfg_path), "--no-progress"]) == 0
    out = capsys.readouterr()
    return tmp_path / "out" / "tiny", out


def test_training_without_a_test_set_says_so_and_evaluate_falls_back_to_val(tmp_path, capsys):
    run, out = _train_without_test(tmp_path, capsys)
    warnings = [line for line in out.err.splitlines() if line.startswith("warning: no test set")]
    assert len(warnings) == 1 and "python -m xclip_jax.data split" in warnings[0], out.err
    # the crash this replaces: StopIteration from data/loading.py, exit 1
    for extra in ([], ["--set", "test"]):
        done = subprocess.run([sys.executable, "-m", "xclip_jax.evaluate", str(run / "checkpoint"), *extra],
                              capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        assert "Traceback" not in done.stderr
        assert "no test set" in done.stdout and "evaluating on the val set instead" in done.stdout
        assert "\nval:\n" in "\n" + done.stdout
    assert json.loads((run / "checkpoint" / "metrics_val.json").read_text())["r1"] > 0


def test_training_says_its_device_and_speed_and_counts_epochs_from_one(tmp_path, capsys):
    run, out = _train_without_test(tmp_path, capsys, epochs=2)
    lines = out.out.splitlines()
    device = [line for line in lines if line.startswith("device: ")]
    assert len(device) == 1 and " backend, " in device[0] and "GiB memory" in device[0], lines
    history = json.loads((run / "training_history.json").read_text())
    best = max(range(len(history)), key=lambda i: history[i]["val_r1"])
    # the export counts the best epoch from 1; so does the training's own line
    ending = next(line for line in lines if line.startswith("best epoch "))
    assert ending.startswith(f"best epoch {best + 1} of 2 ") and "training rows/s on cpu" in ending, ending
    assert all(h["rows_per_second"] > 0 and h["device"].startswith("cpu backend") for h in history)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["device"]["backend"] == "cpu" and metrics["rows_per_second"] > 0


def test_a_two_epoch_curve_has_whole_epoch_ticks():
    history = [{"epoch": e, "train_loss": 1.0 - e / 4, "val_loss": 1.1 - e / 4, "val_r1": 0.1 * e} for e in (0, 1)]
    fig = curves_figure(history, best_epoch=1)
    fig.canvas.draw()
    for ax in fig.axes:
        ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
        assert ticks and all(float(t).is_integer() for t in ticks), ticks
        assert min(ticks) >= 1  # counted from 1
    assert np.allclose(fig.axes[0].lines[0].get_xdata(), [1, 2])
