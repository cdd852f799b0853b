"""The tuner end to end on a tiny synthetic set: processes, faults, pruning, resume, outputs."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from xclip_jax import study as st
from xclip_jax.config import load_train_config, load_tune_config
from xclip_jax.errors import UserError

TUNE = textwrap.dedent("""\
    study_name: tiny
    n_trials: {n_trials}
    n_jobs: 2
    storage: sqlite:///{dir}/study.db
    data:
      synthetic: {{images: 300, captions: 5, image_dim: 16, text_dim: 24, val_images: 60, test_images: 20,
                  noise: 0.5, seed: 0}}
    search_space:
      head_type: {{type: categorical, choices: [siglip, clip, mlp]}}
      hidden_dim: {{type: categorical, choices: [16, 32]}}
      loss_type: {{type: categorical, choices: [softmax_infonce, sigmoid_infonce]}}
      learning_rate: {{type: float, low: 1.0e-4, high: 3.0e-2, log: true}}
      batch_size: {{type: categorical, choices: [64, 128]}}
    fixed: {{output_dim: 16}}
    pruner: {{type: SuccessiveHalvingPruner, min_resource: 1, reduction_factor: 2, min_early_stopping_rate: 0}}
    sampler: {{type: tpe, seed: 7, n_startup_trials: 4}}
    max_epochs: 4
    max_patience: 3
    output_dir: {dir}/results
    checkpoint_dir: {dir}/checkpoints
    final_epochs: 2
    heartbeat_interval: 1
    grace_period: 5
""")


def write(tmp, n_trials=6, **patch):
    text = TUNE.format(n_trials=n_trials, dir=tmp)
    raw = yaml.safe_load(text)
    raw.update(patch)
    path = Path(tmp) / "tune.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def env(tmp):
    e = dict(os.environ)
    e.setdefault("XCLIP_JAX_CACHE", str(Path(tmp) / "jax_cache"))
    e["PYTHONUNBUFFERED"] = "1"
    return e


def driver(tmp, cfg_path, *extra):
    return subprocess.Popen([sys.executable, "-m", "xclip_jax.tune", str(cfg_path), "--no-progress", *extra],
                            env=env(tmp), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def load(tmp):
    return optuna.load_study(study_name="tiny", storage=f"sqlite:///{tmp}/study.db")


def wait_for(pred, timeout=120, what="condition"):
    end = time.time() + timeout
    while time.time() < end:
        got = pred()
        if got:
            return got
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def running_with_pid(tmp, n=1):
    try:
        trials = load(tmp).get_trials(states=(TrialState.RUNNING,))
    except Exception:
        return None
    with_pid = [t for t in trials if "pid" in t.user_attrs]
    return with_pid if len(with_pid) >= n else None


def _kill_one_early_trial(tmp):
    """SIGKILL a running trial that has not reported an epoch yet (so it can't finish first)."""
    for t in running_with_pid(tmp) or []:
        if not t.intermediate_values:
            try:
                os.kill(t.user_attrs["pid"], signal.SIGKILL)
            except ProcessLookupError:
                continue
            return t
    return None


@pytest.fixture(scope="module")
def study_run(tmp_path_factory):
    """One study: n_jobs=2, one trial SIGKILLed mid-trial; then resumed to a larger n_trials."""
    tmp = tmp_path_factory.mktemp("tune")
    cfg_path = write(tmp, n_trials=6)
    proc = driver(tmp, cfg_path)
    victim = wait_for(lambda: _kill_one_early_trial(tmp), what="a running trial to kill")
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    first = load(tmp).get_trials()
    resumed = subprocess.run([sys.executable, "-m", "xclip_jax.tune", str(cfg_path), "--no-progress",
                              "--n-trials", "8"], env=env(tmp), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    return tmp, cfg_path, victim.number, out, first, proc.pid


def test_trials_run_in_their_own_processes(study_run):
    tmp, _, _, _, first, driver_pid = study_run
    pids = [t.user_attrs["pid"] for t in first if "pid" in t.user_attrs]
    assert len(set(pids)) == len(pids) >= 6
    assert driver_pid not in pids and os.getpid() not in pids
    done = [t for t in first if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert all(t.user_attrs["xla_preallocate"] == "false" for t in done)
    assert all(t.user_attrs["startup_seconds"] > 0 and t.user_attrs["compile_seconds"] > 0 for t in done)
    assert all({"host", "jax_backend", "train_seconds", "best_epoch"} <= set(t.user_attrs) for t in done)


def test_killed_trial_is_fail_and_the_study_goes_on(study_run):
    _, _, victim, out, first, _ = study_run
    t = first[victim]
    assert t.state == TrialState.FAIL
    assert "SIGKILL" in t.user_attrs["fail_reason"]
    assert f"Trial {victim} failed" in out
    finished = [t for t in first if t.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)]
    assert len(finished) == 6
    assert sum(t.state == TrialState.COMPLETE for t in first) >= 1


def test_resume_reaches_exactly_n_trials_and_pruning_happens(study_run):
    tmp = study_run[0]
    trials = load(tmp).get_trials()
    assert len(trials) == 8
    assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL) for t in trials)
    assert any(t.state == TrialState.PRUNED for t in trials)
    pruned = [t for t in trials if t.state == TrialState.PRUNED]
    # pruned by the configured pruner (first rung at step 1), before max_epochs
    assert all(1 <= max(t.intermediate_values) < 3 for t in pruned)


def test_seeded_trials_differ_and_are_recorded(study_run):
    tmp = study_run[0]
    seeds = set()
    for t in load(tmp).get_trials():
        cfg_file = Path(tmp) / "checkpoints" / f"{t.number:05d}" / "cfg.yaml"
        if cfg_file.exists():
            seeds.add(load_train_config(cfg_file).seed)
    assert len(seeds) >= 6


def test_outputs_exist_and_parse(study_run):
    tmp = study_run[0]
    res = Path(tmp) / "results"
    summary = json.loads((res / "study_summary.json").read_text())
    assert len(summary["trials"]) == 8
    assert all({"number", "state", "params", "intermediate_values", "user_attrs"} <= set(t) for t in summary["trials"])
    best = json.loads((res / "best_results.json").read_text())
    study = load(tmp)
    assert best["best_trial"] == study.best_trial.number
    assert best["best_value"] == pytest.approx(study.best_value)
    assert isinstance(json.loads((res / "importances.json").read_text()), dict)
    assert (res / "plots" / "optimization_history.html").stat().st_size > 1000
    assert (res / "plots" / "optimization_history.png").read_bytes()[:4] == b"\x89PNG"
    ckpt = Path(best["checkpoint"])
    assert (ckpt / "cfg.yaml").exists()
    from xclip_jax.checkpoint import restore

    heads = restore(ckpt)
    assert heads.meta["val_r1"] == pytest.approx(study.best_value)


def test_best_config_trains_through_the_training_cli(study_run, tmp_path):
    from xclip_jax import train

    tmp = study_run[0]
    best_cfg = Path(tmp) / "results" / "best_config.yaml"
    cfg = load_train_config(best_cfg)
    assert cfg.training.num_epochs == 2
    assert train.main([str(best_cfg), "--no-progress", "--output-dir", str(tmp_path)]) == 0
    assert (tmp_path / cfg.experiment_name / "metrics.json").exists()


def test_sigint_stops_cleanly_and_resume_retries_interrupted(tmp_path):
    cfg_path = write(tmp_path, n_trials=4)
    proc = driver(tmp_path, cfg_path)
    seen = wait_for(lambda: running_with_pid(tmp_path, 2), what="two running trials")
    t0 = time.time()
    os.kill(proc.pid, signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    assert time.time() - t0 < 30
    assert proc.returncode == 130, out
    trials = load(tmp_path).get_trials()
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    interrupted = [t for t in trials if t.state == TrialState.FAIL and "interrupted" in t.user_attrs["fail_reason"]]
    assert interrupted
    stopped = {t.number for t in interrupted}
    finished = {t.number for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)}
    # each trial running at the signal was stopped, unless it had just finished on its own
    assert {t.number for t in seen} <= stopped | finished
    assert {t.number for t in trials if t.state == TrialState.FAIL} == stopped
    waiting = [t for t in trials if t.state == TrialState.WAITING]
    assert {t.system_attrs["failed_trial"] for t in waiting} == {t.number for t in interrupted}
    again = subprocess.run([sys.executable, "-m", "xclip_jax.tune", str(cfg_path), "--no-progress"],
                           env=env(tmp_path), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout + again.stderr
    c = st.counts(load(tmp_path))
    assert c["finished"] == 4 and c["running"] == 0 and c["waiting"] == 0
    retried = [t for t in load(tmp_path).get_trials() if "failed_trial" in t.system_attrs]
    by_number = {t.number: t for t in trials}
    for t in retried:
        assert t.params == by_number[t.system_attrs["failed_trial"]].params
        assert t.state in (TrialState.COMPLETE, TrialState.PRUNED)
    # the same command once n_trials is reached: says so and how to add trials, runs nothing
    done = subprocess.run([sys.executable, "-m", "xclip_jax.tune", str(cfg_path), "--no-progress"],
                          env=env(tmp_path), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and "already has 4 finished trials" in done.stdout and "--add-trials" in done.stdout
    # the final line counts the interrupted (re-queued) trials as failed, as the report does
    assert f"{len(interrupted)} failed ({len(interrupted)} of them re-queued" in done.stdout
    more = subprocess.run([sys.executable, "-m", "xclip_jax.tune", str(cfg_path), "--no-progress", "--add-trials", "1"],
                          env=env(tmp_path), capture_output=True, text=True, timeout=600)
    assert more.returncode == 0, more.stdout + more.stderr
    assert "adding 1" in more.stdout and st.counts(load(tmp_path))["finished"] == 5


def test_changed_search_space_is_one_clear_line(tmp_path):
    cfg = load_tune_config(write(tmp_path))
    storage = st.make_storage(cfg.storage, cfg)
    study = optuna.create_study(study_name="tiny", storage=storage, direction="maximize")
    st.store_space(study, cfg)
    changed = load_tune_config(write(tmp_path, search_space={
        **yaml.safe_load(TUNE.format(n_trials=1, dir=tmp_path))["search_space"],
        "hidden_dim": {"type": "categorical", "choices": [16, 64]}}))
    # a study without trials may still change its space (e.g. after fixing what a check refused)
    st.check_space(study, changed)
    st.store_space(study, changed)
    assert study.user_attrs[st.SPACE_ATTR]["hidden_dim"]["choices"] == [16, 64]
    study.add_trial(optuna.trial.create_trial(params={"hidden_dim": 16}, value=0.5, distributions={
        "hidden_dim": optuna.distributions.CategoricalDistribution([16, 64])}))
    with pytest.raises(UserError) as e:
        st.check_space(optuna.load_study(study_name="tiny", storage=storage), cfg)
    msg = str(e.value)
    assert "hidden_dim" in msg and "[16, 32]" in msg and "[16, 64]" in msg and "new study_name" in msg
    assert "\n" not in msg
    st.store_space(study, cfg)  # refused spaces are never stored
    assert study.user_attrs[st.SPACE_ATTR]["hidden_dim"]["choices"] == [16, 64]


def test_pruner_that_never_prunes_is_warned(tmp_path):
    cfg = load_tune_config(write(tmp_path, pruner={"type": "SuccessiveHalvingPruner", "min_resource": 2,
                                                   "reduction_factor": 4, "min_early_stopping_rate": 1},
                                 max_epochs=8))
    msg = st.pruning_warning(cfg)
    assert "= 8" in msg and "steps 0–7" in msg and "never prune" in msg
    assert st.pruning_warning(load_tune_config(write(tmp_path))) is None
    default = load_tune_config(Path(__file__).resolve().parents[1] / "configs" / "default.yaml")
    assert st.pruning_warning(default) is None


def test_conditional_parameters_follow_the_original(tmp_path):
    cfg = load_tune_config(write(tmp_path))
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(20):
        trial = study.ask()
        params = st.sample(trial, cfg)
        assert ("hidden_dim" in params) == (params["head_type"] in ("clip", "mlp"))
        study.tell(trial, 0.0)


def test_a_seeded_sequential_study_is_reproducible(tmp_path):
    """Same config and seed, n_jobs 1: the same parameters (random start-up, then TPE) and values."""
    runs = []
    for name in ("first", "second"):
        d = tmp_path / name
        d.mkdir()
        cfg_path = write(d, n_trials=3, n_jobs=1, max_epochs=2, pruner={"type": "NopPruner"},
                         sampler={"type": "tpe", "seed": 11, "n_startup_trials": 2})
        done = subprocess.run([sys.executable, "-m", "xclip_jax.tune", str(cfg_path), "--no-progress"],
                              env=env(tmp_path), capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stdout + done.stderr
        runs.append([(t.params, t.value, t.intermediate_values) for t in load(d).get_trials()])
    assert len(runs[0]) == 3
    assert runs[0] == runs[1]


def test_devices_spread_concurrent_trials_over_the_cards(tmp_path):
    """devices: [0, 1] with n_jobs 2: the two trials running at once never share a card. (On this
    CPU machine CUDA_VISIBLE_DEVICES changes nothing else; the assignment is what is checked.)"""
    cfg_path = write(tmp_path, n_trials=4, devices=[0, 1], max_epochs=2)
    done = subprocess.run([sys.executable, "-m", "xclip_jax.tune", str(cfg_path), "--no-progress"],
                          env={k: v for k, v in env(tmp_path).items() if k != "CUDA_VISIBLE_DEVICES"},
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    trials = load(tmp_path).get_trials()
    assert {t.user_attrs["cuda_visible_devices"] for t in trials} == {"0", "1"}
    for a in trials:
        for b in trials:
            overlap = a.datetime_start < b.datetime_complete and b.datetime_start < a.datetime_complete
            if a.number < b.number and overlap:
                assert a.user_attrs["cuda_visible_devices"] != b.user_attrs["cuda_visible_devices"]


def _space(tmp_path, **entries):
    raw = yaml.safe_load(TUNE.format(n_trials=4, dir=tmp_path))
    raw["search_space"].update(entries)
    return load_tune_config(write(tmp_path, search_space=raw["search_space"]))


def test_choices_that_can_never_run_are_refused_before_the_study(tmp_path):
    """The guide's num_heads [8, 12, 16, 20] against 1024/4096-dim inputs: 12 and 20 never divide them."""
    cfg = _space(tmp_path, head_type={"type": "categorical", "choices": ["clip", "attention"]},
                 num_heads={"type": "categorical", "choices": [8, 12, 16, 20]})
    with pytest.raises(UserError) as e:
        st.check_combinations(cfg, rows=1500, dims=(1024, 4096))
    msg = str(e.value)
    assert "search_space.num_heads" in msg and "12" in msg and "divid" in msg and "\n" not in msg
    fine = _space(tmp_path, head_type={"type": "categorical", "choices": ["clip", "attention"]},
                  num_heads={"type": "categorical", "choices": [8, 16]})
    assert st.check_combinations(fine, rows=1500, dims=(1024, 4096)) is None
    with pytest.raises(UserError, match="no combination"):  # the only head needs what no choice gives
        st.check_combinations(_space(tmp_path, head_type={"type": "categorical", "choices": ["attention"]},
                                     num_heads={"type": "categorical", "choices": [12, 20]}), 1500, (1024, 4096))


def test_combinations_only_some_draws_hit_are_skipped_when_sampled(tmp_path):
    """queue_size below batch_size: warned up front, then pruned from sampling (no process, no budget)."""
    cfg = _space(tmp_path, loss_type={"type": "categorical", "choices": ["softmax_infonce", "queue_infonce"]},
                 queue_size={"type": "categorical", "choices": [64, 256]})
    warning = st.check_combinations(cfg, rows=1500, dims=(16, 24))
    assert "queue_size 64 is smaller than batch_size 128" in warning and "skipped when sampled" in warning
    cfg = dataclasses.replace(cfg, n_trials=30)
    storage = st.make_storage(cfg.storage, cfg, heartbeat=True)
    study = optuna.create_study(study_name="tiny", storage=storage, direction="maximize",
                                sampler=optuna.samplers.RandomSampler(seed=3))
    ran = []
    for _ in range(30):
        trial = st.ask_trial(study, storage, cfg, (16, 24))
        assert st.combination_problem(trial.params, cfg, (16, 24)) is None
        ran.append(trial.number)
        study.tell(trial, 0.5)
    skipped = [t for t in study.get_trials() if st.SKIPPED_ATTR in t.system_attrs]
    assert skipped and all(t.state == TrialState.PRUNED and "smaller than batch_size" in t.user_attrs["skipped"]
                           for t in skipped)
    c = st.counts(study)
    assert c["finished"] == 30 and c["skipped"] == len(skipped)  # skipped draws count toward nothing


def test_exit_reason_is_the_error_not_the_jax_note():
    """A trial that dies inside jitted code: its log ends with JAX's traceback-filter note."""
    from xclip_jax.tune import _exit_reason

    code = "import jax, jax.numpy as jnp\n@jax.jit\ndef f(x):\n    raise ValueError('shape 7 is wrong')\nf(jnp.ones(3))"
    log = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stderr
    assert "For simplicity, JAX has removed" in log.strip().splitlines()[-1]  # what the log's last line is
    assert _exit_reason(1, log) == "exit status 1: ValueError: shape 7 is wrong"


def test_best_config_trains_on_the_full_set_whatever_the_extensions(tmp_path):
    """A tuning config naming the original's .pt files, data made by `data split` (.npy): the final run
    reads the full train_* set, not the tuning subset; without a full set it says so."""
    from xclip_jax import data
    from xclip_jax.tune import full_training_files

    d = tmp_path / "data"
    img, txt, ids = data.synthesize(20, 2, 4, 6, seed=0)
    for name in ("train_tuning", "train"):
        data.write_embedding_set(d, name, img, txt, ids)
    names = {f"train_{p}": f"train_tuning_{p}.{'json' if p == 'metadata' else 'pt'}"
             for p in ("image_embeddings", "text_embeddings", "metadata")}
    names.update({f"val_{p}": f"train_{p}.{'json' if p == 'metadata' else 'pt'}"
                  for p in ("image_embeddings", "text_embeddings", "metadata")})
    cfg = load_tune_config(write(tmp_path, base_data_dir=str(d), data=names))
    changes, warning = full_training_files(cfg)
    assert warning is None and changes == {"train_image_embeddings": "train_image_embeddings.npy",
                                           "train_text_embeddings": "train_text_embeddings.npy",
                                           "train_metadata": "train_metadata.json"}
    for f in d.glob("train_image_embeddings.*"):
        f.unlink()
    changes, warning = full_training_files(cfg)
    assert changes == {} and "tuning subset" in warning and "data split" in warning
