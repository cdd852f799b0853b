"""Faults injected into studies: nothing stored is lost and the study can finish."""

import json
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import optuna
import pytest
import yaml
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
from xclip_jax import checkpoint
from xclip_jax import study as st

SECRET = "pw-S3CRET-xyz"
PG_URL = os.environ.get("XCLIP_TEST_POSTGRES", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


def _finished(tmp, storage=None, name="tiny"):
    s = optuna.load_study(study_name=name, storage=storage or f"sqlite:///{tmp}/study.db")
    return st.counts(s)


def test_driver_sigkill_then_same_command_resumes(tmp_path):
    cfg_path = write(tmp_path, n_trials=4)
    proc = driver(tmp_path, cfg_path)
    running = wait_for(lambda: running_with_pid(tmp_path, 1), what="a running trial")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    # the orphaned trial process follows its driver (parent-death signal)
    pid = running[0].user_attrs["pid"]
    wait_for(lambda: not os.path.exists(f"/proc/{pid}") or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2],
             timeout=30, what="the orphaned trial to exit")
    before = load(tmp_path).get_trials()
    again = tune_run(tmp_path, cfg_path, timeout=600)
    assert again.returncode == 0, again.stdout + again.stderr
    c = _finished(tmp_path)
    assert c["finished"] == 4 and c["running"] == 0
    trials = load(tmp_path).get_trials()
    # what was stored before the kill is still there, unchanged
    for old in before:
        if old.state in (TrialState.COMPLETE, TrialState.PRUNED):
            assert trials[old.number].value == old.value and trials[old.number].params == old.params
    # the dead driver's running trials were failed (its pid gone, or heartbeat stale) and retried once
    dead = [t for t in before if t.state == TrialState.RUNNING]
    assert dead
    for t in dead:
        assert trials[t.number].state == TrialState.FAIL
        assert "driver" in trials[t.number].user_attrs["fail_reason"]
        assert [r for r in trials if r.system_attrs.get("failed_trial") == t.number and r.params == t.params]


def test_nan_loss_ends_its_trial_with_the_reason_and_not_its_runner(tmp_path):
    cfg_path = write(tmp_path, n_trials=2, n_jobs=1, fixed={"output_dim": 16, "learning_rate": 1.0e38,
                                                             "batch_size": 64},
                     search_space={"head_type": {"type": "categorical", "choices": ["clip"]}})
    out = tune_run(tmp_path, cfg_path, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    trials = load(tmp_path).get_trials()
    assert len(trials) == 2
    assert all(t.state == TrialState.FAIL and "not finite" in t.user_attrs["fail_reason"] for t in trials)
    assert trials[0].user_attrs["pid"] == trials[1].user_attrs["pid"]  # the runner went on to the next trial


def test_trial_out_of_memory_is_fail_and_study_goes_on(tmp_path):
    cfg_path = write(tmp_path, n_trials=2, trial_memory_limit_gb=0.3, n_jobs=1)
    out = tune_run(tmp_path, cfg_path, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    trials = load(tmp_path).get_trials()
    assert len(trials) == 2 and all(t.state == TrialState.FAIL for t in trials)
    assert all(t.user_attrs["fail_reason"] for t in trials)
    assert "failed" in out.stdout


SAVER = """
import os, signal, sys, threading, time, numpy as np
from pathlib import Path
from xclip_jax import checkpoint
step = int(sys.argv[2])
big = {"w": np.random.default_rng(step).standard_normal((64, 512, 1024), np.float32)}  # 128 MB, incompressible
def written(folder):
    try:
        return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    except FileNotFoundError:  # orbax renamed a sub-folder meanwhile
        return 0
def kill_mid_write():  # SIGKILL this process once the save's temporary folder holds 1 MB of data
    while True:
        if any("tmp" in p.name and written(p) > 2**20 for p in Path(sys.argv[1]).glob("*")):
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(0.0005)
if len(sys.argv) > 3:
    threading.Thread(target=kill_mid_write, daemon=True).start()
checkpoint.save_heads(sys.argv[1], big, {"a": 1}, {"epoch": step}, step=step)
"""


def test_checkpoint_save_killed_mid_write_keeps_the_previous_best(tmp_path):
    ckpt = tmp_path / "ckpt"
    subprocess.run([sys.executable, "-c", SAVER, str(ckpt), "1"], check=True)
    proc = subprocess.run([sys.executable, "-c", SAVER, str(ckpt), "2", "kill"], timeout=120)
    assert proc.returncode == -signal.SIGKILL, "the second save was not killed mid-write"
    assert any("tmp" in p.name for p in ckpt.iterdir())  # its partial write is still there
    assert checkpoint.latest_step(ckpt) == 1
    params, meta = checkpoint.load_raw(ckpt)
    assert meta["epoch"] == 1
    np.testing.assert_array_equal(params["w"], np.random.default_rng(1).standard_normal((64, 512, 1024), np.float32))
    checkpoint.save_heads(ckpt, {"w": np.ones(3, np.float32)}, {"a": 1}, {"epoch": 3}, step=3)
    assert checkpoint.latest_step(ckpt) == 3


def _pg_available():
    try:
        import sqlalchemy as sa

        with sa.create_engine(PG_URL).connect():
            return True
    except Exception:
        return False


requires_pg = pytest.mark.skipif(
    not os.environ.get("XCLIP_REQUIRE_POSTGRES") and not _pg_available(),
    reason=f"no PostgreSQL server answers at {PG_URL} (set XCLIP_TEST_POSTGRES)")


@requires_pg
def test_two_drivers_share_one_postgres_study_and_survive_losing_one(tmp_path):
    """Two 'machines' on one PostgreSQL study of 12 trials; one is lost mid-run."""
    name = f"pg_{uuid.uuid4().hex[:8]}"
    procs = {}
    for machine in ("a", "b"):
        d = tmp_path / machine
        d.mkdir()
        # machine a names a password in its URL (trust auth ignores it): it must appear nowhere
        # (--storage, as the guide's users pass it; trust auth ignores the password)
        url = PG_URL.replace("postgres@", f"postgres:{SECRET}@") if machine == "a" else PG_URL
        cfg_path = write(d, n_trials=12, study_name=name, storage=PG_URL, grace_period=4)
        e = env(d)
        e["XCLIP_HOSTNAME"] = f"machine-{machine}"
        procs[machine] = (d, cfg_path, subprocess.Popen(
            tune_command(cfg_path, "--storage", url), env=e,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True))

    def a_running():
        try:
            s = optuna.load_study(study_name=name, storage=PG_URL)
        except KeyError:  # not created yet
            return None
        return [t for t in s.get_trials(states=(TrialState.RUNNING,))
                if t.user_attrs.get("driver_host") == "machine-a" and "pid" in t.user_attrs]

    lost = wait_for(a_running, timeout=180, what="machine a to run a trial")
    os.kill(procs["a"][2].pid, signal.SIGKILL)  # machine a is lost; its trial processes follow
    out_b, _ = procs["b"][2].communicate(timeout=900)
    procs["a"][2].wait()
    assert procs["b"][2].returncode == 0, out_b

    study = optuna.load_study(study_name=name, storage=PG_URL)
    trials = study.get_trials()
    c = st.counts(study)
    assert c["finished"] == 12 and c["running"] == 0 and c["waiting"] == 0, c
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    lost_numbers = {t.number for t in lost}
    for t in trials:
        if t.number in lost_numbers:
            assert t.state == TrialState.FAIL  # stale: heartbeat stopped
            assert "no heartbeat" in t.user_attrs["fail_reason"]
    retried = {t.system_attrs["failed_trial"]: t for t in trials if "failed_trial" in t.system_attrs}
    assert lost_numbers <= set(retried)
    for n, copy in retried.items():
        assert copy.params == trials[n].params and copy.state != TrialState.RUNNING
    ran = [t for t in trials if "pid" in t.user_attrs and not t.system_attrs.get("xclip_surplus")]
    assert all(t.user_attrs["host"] in ("machine-a", "machine-b") for t in ran)
    assert {t.user_attrs["host"] for t in ran} == {"machine-a", "machine-b"}
    # a runner runs its trials one after another, each once: per process, distinct places in its sequence
    keys = [(t.user_attrs["host"], t.user_attrs["pid"], t.user_attrs.get("runner_trial")) for t in ran]
    assert len(keys) == len(set(keys))
    assert len({t.number for t in trials}) == len(trials)
    out_a, _ = procs["a"][2].communicate()
    assert SECRET not in out_a + out_b
    for f in (tmp_path / "a").rglob("*"):
        assert not f.is_file() or SECRET.encode() not in f.read_bytes(), f
    best = json.loads((procs["b"][0] / "results" / "best_results.json").read_text())
    assert best["best_trial"] == study.best_trial.number
    assert best["best_value"] == pytest.approx(study.best_value)
    best_cfg = yaml.safe_load((procs["b"][0] / "results" / "best_config.yaml").read_text())
    assert best_cfg["model"]["type"] == study.best_params["head_type"]


@pytest.fixture
def small_disk(tmp_path):
    """A 150 KB tmpfs: room for a trial's checkpoint or two, then 'No space left on device'."""
    mnt = tmp_path / "small_disk"
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=150k", "tmpfs", str(mnt)], capture_output=True)
    if done.returncode != 0:
        pytest.skip("needs permission to mount a small tmpfs (root)")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_full_disk_stops_the_study_and_loses_nothing(tmp_path, small_disk):
    cfg_path = write(tmp_path, n_trials=6, checkpoint_dir=str(small_disk))
    full = tune_run(tmp_path, cfg_path, timeout=600)
    assert full.returncode == 2, full.stdout + full.stderr
    err = full.stderr.strip().splitlines()[-1]
    assert err.startswith("error: disk full") and str(small_disk) in err and "rerun the same command" in err
    trials = load(tmp_path).get_trials()
    full_trials = [t for t in trials if t.state == TrialState.FAIL]
    assert full_trials and all("No space left on device" in t.user_attrs["fail_reason"] for t in full_trials)
    waiting = [t for t in trials if t.state == TrialState.WAITING]
    assert {t.system_attrs["failed_trial"] for t in waiting} == {t.number for t in full_trials}
    assert st.counts(load(tmp_path))["finished"] < 6  # no trial budget was burnt on the full disk
    # space freed (here: the checkpoints go elsewhere): the same study resumes and finishes
    write(tmp_path, n_trials=6, checkpoint_dir=str(tmp_path / "checkpoints"))
    again = tune_run(tmp_path, cfg_path, timeout=600)
    assert again.returncode == 0, again.stdout + again.stderr
    c = st.counts(load(tmp_path))
    assert c["finished"] == 6 and c["fail"] == 0 and c["waiting"] == 0
    done = {t.number: t for t in load(tmp_path).get_trials()}
    for t in full_trials:
        retry = [r for r in done.values() if r.system_attrs.get("failed_trial") == t.number]
        assert retry and retry[0].params == t.params and retry[0].state in (TrialState.COMPLETE, TrialState.PRUNED)
