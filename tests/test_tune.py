"""The tuning driver end to end on a tiny synthetic set: processes, faults, pruning, resume, outputs."""

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from optuna.trial import TrialState

from tests.conftest import (
    driver,
    env,
    load,
    running_with_pid,
    tune_command,
    tune_run,
    wait_for,
    write,
)
from xclip_jax import space
from xclip_jax.tune_config import load_tune_config
from xclip_jax import study as st
from xclip_jax.config import load_train_config


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
    cfg_path = write(tmp, n_trials=6, baselines=True)
    proc = driver(tmp, cfg_path)
    victim = wait_for(lambda: _kill_one_early_trial(tmp), what="a running trial to kill")
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    first = load(tmp).get_trials()
    resumed = tune_run(tmp, cfg_path, "--n-trials", "8")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    return tmp, cfg_path, victim.number, out, first, proc.pid


def test_trials_run_in_warm_runner_processes(study_run):
    """n_jobs 2: two runner processes, each running trials one after another; the SIGKILLed one is
    replaced by a fresh runner."""
    tmp, _, victim, _, first, driver_pid = study_run
    pids = [t.user_attrs["pid"] for t in first if "pid" in t.user_attrs]
    assert len(pids) >= 6 and len(set(pids)) <= 3 and len(set(pids)) < len(pids)
    assert driver_pid not in pids and os.getpid() not in pids
    done = [t for t in first if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert all(t.user_attrs["xla_preallocate"] == "false" for t in done)
    assert all(t.user_attrs["startup_seconds"] > 0 and t.user_attrs["train_seconds"] > 0 for t in done)
    assert all({"host", "jax_backend", "compile_seconds", "eval_seconds", "programs_compiled", "compile_cache_hits",
                "runner_trial", "best_epoch"} <= set(t.user_attrs) for t in done)
    # a runner's first trial pays its start-up (spawn -> data on the device); the later ones do not
    first_in_runner = [t.user_attrs["startup_seconds"] for t in done if t.user_attrs["runner_trial"] == 0]
    later = [t.user_attrs["startup_seconds"] for t in done if t.user_attrs["runner_trial"] > 0]
    assert first_in_runner and later and max(later) < min(first_in_runner)


def test_killed_trial_is_fail_and_the_study_goes_on(study_run):
    _, _, victim, out, first, _ = study_run
    assert " over " in out and "best trial " in out  # e.g. best trial 0.531, +0.052 over CCA-16 (0.479)
    t = first[victim]
    assert t.state == TrialState.FAIL
    assert "SIGKILL" in t.user_attrs["fail_reason"]
    assert f"Trial {victim} failed" in out
    finished = [t for t in first if t.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)]
    assert len(finished) == 6
    assert sum(t.state == TrialState.COMPLETE for t in first) >= 1


def test_the_study_ends_with_the_next_step_and_report_finds_its_folder(study_run):
    """The last line is the command to run next (train the best config, or what to change when a linear
    baseline beat it); the study remembers its output_dir, where report writes by default."""
    from xclip_jax.report import recorded_output_dir

    tmp, _, _, out, _, _ = study_run
    last = out.strip().splitlines()[-1]
    assert last.startswith("next: ") and f"python -m xclip_jax.train {tmp}/results/best_config.yaml" in last, last
    assert recorded_output_dir(load(tmp)) == (Path(tmp) / "results").resolve()


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
    # the closed-form baselines, computed once for the study: in the summary, the results, the plot
    names = [b["name"] for b in summary["baselines"]]
    assert names[:2] == ["ridge t→i", "ridge i→t"] and any(n.startswith("CCA-") for n in names)
    assert all(b["val"]["r1"] > 0 and b["test"]["r1"] > 0 for b in summary["baselines"])
    top = max(summary["baselines"], key=lambda b: b["val"]["r1"])
    assert best["best_baseline"] == top["name"]
    assert best["over_best_baseline"] == pytest.approx(best["best_value"] - top["val"]["r1"])
    assert top["name"] in (res / "plots" / "optimization_history.html").read_text()
    assert list((Path(tmp) / "results" / "data_cache").glob("*/baselines.json"))
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
    again = tune_run(tmp_path, cfg_path)
    assert again.returncode == 0, again.stdout + again.stderr
    c = st.counts(load(tmp_path))
    assert c["finished"] == 4 and c["running"] == 0 and c["waiting"] == 0
    retried = [t for t in load(tmp_path).get_trials() if "failed_trial" in t.system_attrs]
    by_number = {t.number: t for t in trials}
    for t in retried:
        assert t.params == by_number[t.system_attrs["failed_trial"]].params
        assert t.state in (TrialState.COMPLETE, TrialState.PRUNED)
    # the same command once n_trials is reached: says so and how to add trials, runs nothing
    done = tune_run(tmp_path, cfg_path)
    assert done.returncode == 0 and "already has 4 finished trials" in done.stdout and "--add-trials" in done.stdout
    # the interrupted run's final line counts its re-queued trials as failed, once: no later run repeats them
    assert f"{len(interrupted)} failed ({len(interrupted)} of them re-queued" in out
    assert "re-queued" not in again.stdout and "re-queued" not in done.stdout
    more = tune_run(tmp_path, cfg_path, "--add-trials", "1")
    assert more.returncode == 0, more.stdout + more.stderr
    assert "adding 1" in more.stdout and st.counts(load(tmp_path))["finished"] == 5


def test_a_seeded_sequential_study_is_reproducible(tmp_path):
    """Same config and seed, n_jobs 1: the same parameters (random start-up, then TPE) and values."""
    runs = []
    for name in ("first", "second"):
        d = tmp_path / name
        d.mkdir()
        cfg_path = write(d, n_trials=3, n_jobs=1, max_epochs=2, pruner={"type": "NopPruner"},
                         sampler={"type": "tpe", "seed": 11, "n_startup_trials": 2})
        done = tune_run(tmp_path, cfg_path)
        assert done.returncode == 0, done.stdout + done.stderr
        runs.append([(t.params, t.value, t.intermediate_values) for t in load(d).get_trials()])
    assert len(runs[0]) == 3
    assert runs[0] == runs[1]


def test_devices_spread_concurrent_trials_over_the_cards(tmp_path):
    """devices: [0, 1] with n_jobs 2: the two trials running at once never share a card. (On this
    CPU machine CUDA_VISIBLE_DEVICES changes nothing else; the assignment is what is checked.)"""
    cfg_path = write(tmp_path, n_trials=4, devices=[0, 1], max_epochs=2)
    done = subprocess.run(tune_command(cfg_path),
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


def test_a_warm_runner_compiles_a_seen_shape_once_and_is_recycled(tmp_path):
    """One point of the search space four times, n_jobs 1, runner_max_trials 3: the first trial
    compiles its programs, the next two in the same process compile nothing, the fourth runs in a
    fresh runner that loads them from the persistent cache. The CCA warm start's own jitted code
    also loads from that cache in the fourth trial; it is not one of the trial's programs."""
    cfg_path = write(tmp_path, n_trials=4, n_jobs=1, runner_max_trials=3, max_epochs=2, pruner={"type": "NopPruner"},
                     search_space={"learning_rate": {"type": "float", "low": 1.0e-3, "high": 1.0e-2, "log": True}},
                     fixed={"output_dim": 16, "head_type": "linear", "init": "cca", "batch_size": 128})
    done = tune_run(tmp_path, cfg_path, env_patch={"XCLIP_JAX_CACHE": str(tmp_path / "fresh_cache")})
    assert done.returncode == 0, done.stdout + done.stderr
    trials = load(tmp_path).get_trials()
    attrs = [t.user_attrs for t in trials]
    assert [a["pid"] for a in attrs[:3]] == [attrs[0]["pid"]] * 3 and attrs[3]["pid"] != attrs[0]["pid"]
    assert [a["runner_trial"] for a in attrs] == [0, 1, 2, 0]
    # init, epoch, validation: the first runner's (some compiled by its study warm-up, counted to it)
    assert attrs[0]["programs_compiled"] == 3 and attrs[0]["compile_cache_hits"] == 0
    assert attrs[1]["programs_compiled"] == attrs[2]["programs_compiled"] == 0
    assert attrs[3]["programs_compiled"] == 3 and attrs[3]["compile_cache_hits"] == 3
    assert attrs[1]["compile_seconds"] < 0.1 < attrs[0]["compile_seconds"]


def test_one_process_per_trial_is_one_config_key(tmp_path):
    cfg_path = write(tmp_path, n_trials=3, n_jobs=1, runner_max_trials=1, max_epochs=1)
    done = tune_run(tmp_path, cfg_path)
    assert done.returncode == 0, done.stdout + done.stderr
    trials = load(tmp_path).get_trials()
    assert len({t.user_attrs["pid"] for t in trials}) == 3
    assert all(t.user_attrs["runner_trial"] == 0 for t in trials)


def test_batched_trials_each_their_own_optuna_trial(tmp_path):
    """batch_trials 3: a lead and two companions with the lead's values of the parameters that decide
    its program and their own learning rates train in one program; each is its own trial (number,
    params, values, attributes with bundle = the lead's number); a SIGKILLed runner fails every member
    of its bundle."""
    cfg_path = write(tmp_path, n_trials=6, n_jobs=1, batch_trials=3, max_epochs=3, pruner={"type": "NopPruner"},
                     compile_ahead=False,  # no bundle queued behind the killed one
                     initial_trials="none")  # enqueued trials run alone: six trials leave room for two bundles
    proc = driver(tmp_path, cfg_path)

    def bundle_running():
        running = running_with_pid(tmp_path, 3)
        if running and all(not t.intermediate_values for t in running) and len({t.user_attrs.get("bundle")
                                                                                 for t in running}) == 1:
            os.kill(running[0].user_attrs["pid"], signal.SIGKILL)
            return running
        return None

    killed = wait_for(bundle_running, timeout=240, what="a bundle of three running")
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    assert "bundle of 3: trials " in out  # the console says which trials train together
    trials = {t.number: t for t in load(tmp_path).get_trials()}
    for t in killed:
        assert trials[t.number].state == TrialState.FAIL and "SIGKILL" in trials[t.number].user_attrs["fail_reason"]
    done = [t for t in trials.values() if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    bundles = {}
    for t in done:
        bundles.setdefault(t.user_attrs.get("bundle", t.number), []).append(t)  # a lead alone has no bundle
    assert any(len(members) == 3 for members in bundles.values())
    for lead, members in bundles.items():
        assert lead in {m.number for m in members}
        # the data parameters (learning rate; init, searched implicitly for siglip) are each member's own
        decides = space.key_params(load_tune_config(cfg_path), (16, 24))
        structural = [{k: v for k, v in m.params.items() if k in decides} for m in members]
        assert all(s == structural[0] for s in structural)
        assert len({m.params["learning_rate"] for m in members}) == len(members)
        assert len({m.user_attrs["pid"] for m in members}) == 1
        assert all(m.user_attrs.get("bundle_size", 1) in (len(members), 3) for m in members)


def test_the_progress_bar_counts_a_trial_queued_for_compiling_apart():
    """At n_jobs 1 with compile_ahead a runner holds its next job (here a bundle of two) while it trains
    one: those trials are RUNNING to Optuna, and the bar counts them as compiling."""
    from types import SimpleNamespace

    from xclip_jax.tune import Driver

    driver = object.__new__(Driver)  # only its pool and jobs matter here
    driver.jobs = {"7": [(7, 3)], "8": [(8, 4), (9, 5)]}
    driver.pool = SimpleNamespace(workers=[SimpleNamespace(jobs=[SimpleNamespace(id="7"), SimpleNamespace(id="8")])])
    assert driver.compiling_ahead() == 2
    driver.pool.workers[0].jobs.pop()
    assert driver.compiling_ahead() == 0


def test_a_second_interrupt_loses_no_configuration(tmp_path):
    """Ctrl-C, resume, Ctrl-C again while a re-queued trial runs, resume: every interrupted trial's
    parameters are queued (however many times), none counts toward n_trials, and the study ends with
    n_trials COMPLETE or PRUNED trials, every interrupted configuration among them."""
    cfg_path = write(tmp_path, n_trials=3, max_epochs=3)
    runs = []
    for wanted in (lambda t: True, lambda t: "failed_trial" in t.system_attrs):  # the second: a retry runs
        proc = driver(tmp_path, cfg_path)
        wait_for(lambda: [t for t in running_with_pid(tmp_path) or [] if wanted(t)], what="a trial to interrupt")
        os.kill(proc.pid, signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 130, out
        assert f"to resume, run the same command: python -m xclip_jax.tune {cfg_path}" in out
        runs.append(out)
    again = tune_run(tmp_path, cfg_path)
    assert again.returncode == 0, again.stdout + again.stderr
    trials = load(tmp_path).get_trials()
    interrupted = [t for t in trials if t.state == TrialState.FAIL and "interrupted" in t.user_attrs["fail_reason"]]
    assert any("failed_trial" in t.system_attrs for t in interrupted)  # a retry was interrupted too
    done = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(done) == 3 and st.counts(load(tmp_path))["finished"] == 3
    ran = [t.params for t in done]
    assert all(t.params in ran for t in interrupted), "an interrupted configuration never ran"


def test_a_time_budget_runs_as_many_trials_as_fit(tmp_path):
    """budget_minutes: trials start while one more fits, whatever n_trials says, and none starts after
    the budget."""
    cfg_path = write(tmp_path, n_trials=2, n_jobs=1, max_epochs=2, pruner={"type": "NopPruner"}, budget_minutes=0.5)
    done = tune_run(tmp_path, cfg_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "a budget of 0.5 minutes: trials start while one more fits" in done.stdout
    trials = [t for t in load(tmp_path).get_trials() if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(trials) > 2, len(trials)  # the budget ended the study, not n_trials
    first = min(t.datetime_start for t in trials)
    assert all((t.datetime_start - first).total_seconds() < 30 for t in trials)


def test_batch_trials_auto_is_the_backends(monkeypatch, tmp_path):
    from xclip_jax import padding

    cfg = load_tune_config(write(tmp_path, batch_trials="auto"))
    monkeypatch.setattr(padding, "expected_backend", lambda: "cpu")
    cpu, line = padding.for_backend(cfg)
    assert (cpu.batch_trials, cpu.padding, line) == (1, padding.CPU_PADDING, "batch_trials: auto -> 1 (a CPU's bundle "
                                                                              "epoch costs K epochs)")
    monkeypatch.setattr(padding, "expected_backend", lambda: "gpu")
    gpu, line = padding.for_backend(cfg)
    assert (gpu.batch_trials, gpu.padding) == (1, "max") and line.endswith("lost search quality (benchmarks/RESULTS.md))")
    assert padding.for_backend(load_tune_config(write(tmp_path, batch_trials=3)))[1] is None
