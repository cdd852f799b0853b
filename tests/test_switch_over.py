"""A user coming from the original tool, with its files and habits: what the tuner says and refuses.

Each message is one line (a refusal: exit 2, nothing stored changed); the study's own lines name the
device, the metric and the top trials' settings."""

import dataclasses

import optuna
import pytest
import yaml

from tests.conftest import load, run_cli, tune_run, write
from xclip_jax import data, runtime, space, tune, verdict
from xclip_jax.config import ConfigError
from xclip_jax.storage import make_storage
from xclip_jax.tune_config import load_tune_config

optuna.logging.set_verbosity(optuna.logging.WARNING)


def _original_study(storage_url, name="tiny"):
    """A study as the original PyTorch tool leaves it: its trials, none of our attributes."""
    study = optuna.create_study(study_name=name, storage=storage_url, direction="maximize")
    for value in (0.95, 0.80):
        study.add_trial(optuna.trial.create_trial(
            params={"head_type": "clip", "learning_rate": 1e-3}, value=value,
            distributions={"head_type": optuna.distributions.CategoricalDistribution(["siglip", "clip"]),
                           "learning_rate": optuna.distributions.FloatDistribution(1e-5, 1e-2, log=True)}))
    return study


def test_a_study_of_another_tool_is_refused_and_left_as_it_was(tmp_path, capsys):
    path = write(tmp_path)
    _original_study(f"sqlite:///{tmp_path}/study.db")
    before = load(tmp_path)
    err = run_cli(tune.main, [str(path), "--no-progress"], capsys)
    assert err.startswith("error: study 'tiny' in this storage was not written by xclip_jax (2 trials"), err
    assert "another study_name (--study-name NAME)" in err
    after = load(tmp_path)
    assert after.user_attrs == before.user_attrs == {}
    assert [(t.number, t.state, t.value) for t in after.trials] == [(t.number, t.state, t.value)
                                                                   for t in before.trials]
    assert not (tmp_path / "results").exists() and not (tmp_path / "checkpoints").exists()


def test_the_original_asha_pruner_names_successive_halving_and_hyperband(tmp_path, capsys):
    path = write(tmp_path, pruner={"type": "ASHAPruner", "min_resource": 1, "reduction_factor": 2})
    with pytest.raises(ConfigError):
        load_tune_config(path)
    err = run_cli(tune.main, [str(path), "--no-progress"], capsys)
    assert "unknown pruner 'ASHAPruner'" in err and "'SuccessiveHalvingPruner'" in err and "'HyperbandPruner'" in err
    assert "did you mean 'NopPruner'" not in err


def test_n_trials_and_add_trials_together_are_refused(tmp_path, capsys):
    err = run_cli(tune.main, [str(write(tmp_path)), "--n-trials", "9", "--add-trials", "2"], capsys)
    assert err == ("error: --n-trials 9 and --add-trials 2: give one (--n-trials: the study's total; --add-trials: "
                   "that many more than it has finished)")


def test_a_widened_range_is_one_warning_line(tmp_path, capsys):
    cfg = load_tune_config(write(tmp_path))
    study = optuna.create_study(study_name="tiny", storage=make_storage(cfg.storage), direction="maximize")
    space.store_space(study, cfg)
    study.add_trial(optuna.trial.create_trial(params={"head_type": "clip"}, value=0.5, distributions={
        "head_type": optuna.distributions.CategoricalDistribution(["siglip", "clip", "mlp"])}))
    capsys.readouterr()
    wider = dataclasses.replace(cfg, search_space={**cfg.search_space, "learning_rate": dataclasses.replace(
        cfg.search_space["learning_rate"], low=1e-5)})
    space.check_space(study, wider)
    err = capsys.readouterr().err.splitlines()
    assert err == ["warning: search space of learning_rate changed (float 0.0001..0.03 (log) -> float 1e-05..0.03 "
                   "(log)); continuing study 'tiny', whose earlier trials were drawn from the old range"]


def test_n_jobs_above_the_cores_is_warned_on_a_cpu_only(tmp_path, capsys, monkeypatch):
    cfg = dataclasses.replace(load_tune_config(write(tmp_path)), n_jobs=runtime.cores() + 6)
    info = runtime.announce_study(cfg)
    out, err = capsys.readouterr()
    assert info["backend"] == "cpu" and out.startswith("device: cpu backend, ") and "GiB memory" in out
    assert err.splitlines() == [f"warning: n_jobs {cfg.n_jobs} is above this machine's {runtime.cores()} CPU cores: "
                                "the trial processes take turns on them (the same results, every start-up and epoch "
                                f"slower); set n_jobs: {runtime.cores()} (or --n-jobs {runtime.cores()})"]
    monkeypatch.setattr("xclip_jax.padding.expected_backend", lambda: "gpu")
    runtime.announce_study(cfg)  # on a GPU the card's memory bounds n_jobs, not the cores
    out, err = capsys.readouterr()
    assert out.startswith("device: gpu backend, ") and err == ""


def test_the_next_step_never_pairs_n_trials_with_add_trials(tmp_path):
    cfg = load_tune_config(write(tmp_path))
    lost = {"best_value": 0.1, "baselines": [{"name": "CCA-16", "param": 16, "val": {"r1": 0.5}, "test": None,
                                              "fit_seconds": 0.1}], "interrupted": False}
    line = verdict.next_step(cfg, "tune.yaml", lost, {"n_trials": 6, "n_jobs": 1})
    assert "python -m xclip_jax.tune tune.yaml --n-jobs 1 --add-trials 6" in line and "--n-trials" not in line


def test_trials_re_queued_by_an_earlier_run_are_not_said_again(tmp_path):
    cfg = load_tune_config(write(tmp_path))
    counts = {"complete": 3, "pruned": 1, "fail": 0, "retried": 2}
    first = verdict.outcome_line(cfg, {"counts": counts, "counts_before": {**counts, "retried": 0},
                                       "wall_seconds": 5.0})
    assert "2 failed (2 of them re-queued" in first
    later = verdict.outcome_line(cfg, {"counts": counts, "counts_before": counts, "wall_seconds": 5.0})
    assert later.startswith("study tiny: 3 complete, 1 pruned, 0 failed in 5.0 s") and "re-queued" not in later


def test_the_top_trials_table_says_what_each_trial_is(tmp_path):
    cfg = load_tune_config(write(tmp_path))
    top = [{"number": 4, "value": 0.44, "behind_best": 0.0, "params": {"head_type": "clip", "hidden_dim": 32,
                                                                        "loss_type": "softmax_infonce",
                                                                        "learning_rate": 3.2e-4, "batch_size": 64,
                                                                        "learnable_temp": True}},
           {"number": 1, "value": 0.42, "behind_best": -0.02, "params": {"head_type": "siglip",
                                                                         "loss_type": "sigmoid_infonce",
                                                                         "learning_rate": 1e-2, "batch_size": 64}}]
    table = verdict.top_table(top, cfg).splitlines()
    assert table[0].startswith("top trials (validation R@1;")
    assert table[1].split() == ["trial", "value", "gap", "head", "loss", "widths", "learning", "rate", "τ"]
    assert table[2].split() == ["#4", "0.4400", "clip", "softmax_infonce", "16/32", "3.2e-04", "0.070~"]
    assert table[3].split() == ["#1", "0.4200", "-0.020", "siglip", "sigmoid_infonce", "16", "1.0e-02", "0.070"]
    assert verdict.top_table([], cfg) is None


def _files_without_test(tmp_path):
    sets = data.synthetic_splits(n_images=200, captions_per_image=5, image_dim=16, text_dim=24, val_images=40,
                                 test_images=10, noise=0.5, seed=0)
    for split in ("train", "val"):
        data.save_set(tmp_path / "data", sets[split], split)
    return {"base_data_dir": str(tmp_path / "data"),
            "data": {f"{s}_{p}": f"{s}_{p}.npy" if p != "metadata" else f"{s}_metadata.json"
                     for s in ("train", "val") for p in ("image_embeddings", "text_embeddings", "metadata")}}


def test_a_study_says_its_device_metric_top_trials_and_what_it_lacks(tmp_path):
    """One study on files without a test set, more trial processes than cores, then one more trial at
    another max_epochs: each thing said once, in one line."""
    path = write(tmp_path, n_trials=2, n_jobs=runtime.cores() + 1, max_epochs=1, max_patience=1,
                 sampler={"type": "random", "seed": 3}, initial_trials="none", **_files_without_test(tmp_path))
    done = tune_run(tmp_path, path)
    assert done.returncode == 0, done.stdout + done.stderr
    warnings = [line for line in done.stderr.splitlines() if line.startswith("warning: ")]
    assert len([w for w in warnings if w.startswith("warning: n_jobs ")]) == 1, done.stderr
    assert len([w for w in warnings if w.startswith("warning: no test set: ")]) == 1, done.stderr
    lines = done.stdout.splitlines()
    assert len([line for line in lines if line.startswith("device: cpu backend, ")]) == 1, done.stdout
    finished = [line for line in lines if " finished with value: " in line]
    assert finished and all("(validation R@1)" in line for line in finished)
    table = lines.index(next(line for line in lines if line.startswith("top trials (validation R@1;")))
    assert lines[table + 1].split()[:4] == ["trial", "value", "gap", "head"]
    assert lines[table + 2].startswith("  #")
    nxt = next(i for i, line in enumerate(lines) if line.startswith("next: "))
    assert table < nxt
    summary = yaml.safe_load((tmp_path / "results" / "study_summary.json").read_text())
    assert summary["devices"][0]["backend"] == "cpu" and summary["throughput"]["rows_per_second"] > 0
    # another max_epochs in the same study: said once, at start
    more = tune_run(tmp_path, path, "--max-epochs", "2", "--add-trials", "1")
    assert more.returncode == 0, more.stdout + more.stderr
    mixed = [line for line in more.stderr.splitlines() if "max_epochs" in line and line.startswith("warning: ")]
    assert mixed == ["warning: study 'tiny' has trials of max_epochs 1; these train 2, and the sampler and pruner "
                     "compare them all as alike; to keep them apart use a new study_name"], more.stderr


def test_a_changed_max_epochs_is_one_warning_line(tmp_path, capsys):
    cfg = load_tune_config(write(tmp_path, max_epochs=1))
    study = optuna.create_study(study_name="tiny", storage=make_storage(cfg.storage), direction="maximize")
    space.store_space(study, cfg)
    study.add_trial(optuna.trial.create_trial(params={"head_type": "clip"}, value=0.5, distributions={
        "head_type": optuna.distributions.CategoricalDistribution(["siglip", "clip", "mlp"])}))
    space.check_space(study, cfg)  # the same max_epochs: nothing to say
    assert capsys.readouterr().err == ""
    space.check_space(study, dataclasses.replace(cfg, max_epochs=2))
    assert capsys.readouterr().err.splitlines() == [
        "warning: study 'tiny' has trials of max_epochs 1; these train 2, and the sampler and pruner compare them "
        "all as alike; to keep them apart use a new study_name"]


def test_a_study_without_a_test_set_says_so_at_its_start(tmp_path, capsys):
    cfg = load_tune_config(write(tmp_path, **_files_without_test(tmp_path)))
    runtime.announce_study(cfg)
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("warning: no test set: the config's data section names no test_* "
                                               "files") and "python -m xclip_jax.data split" in err[0]
    runtime.announce_study(load_tune_config(write(tmp_path)))  # the synthetic set has a test split
    assert capsys.readouterr().err == ""
