"""A trial runner in this process: how its trials end and what each records, for a single trial and a
bundle alike (the same fit path, the same bookkeeping)."""

import pytest
from optuna.trial import TrialState

from tests.conftest import write
from xclip_jax import checkpoint
from xclip_jax import study as st
from xclip_jax.tune import Driver
from xclip_jax.tune_config import load_tune_config

# What every trial that ran records, however it ended.
TIMINGS = ("startup_seconds", "compile_seconds", "programs_compiled", "train_seconds", "eval_seconds",
           "runner_trial", "best_epoch", "stopped")


def _runner(tmp_path, **patch):
    from xclip_jax.runner import Runner

    cfg = load_tune_config(write(tmp_path, n_jobs=1, max_epochs=3, pruner={"type": "NopPruner"},
                                 fixed={"output_dim": 16, "batch_size": 64},
                                 search_space={"head_type": {"type": "categorical", "choices": ["clip"]},
                                               "learning_rate": {"type": "float", "low": 1e-3, "high": 1e-2}},
                                 **patch))
    driver = Driver(cfg, progress=False)
    driver.prepare()
    return driver, Runner(str(driver.out / "tune_config.yaml"), str(driver.cache_dir))


def _ask(driver, n):
    return [st.ask_trial(driver.study, driver.storage, driver.cfg, driver.dims, driver.rows) for _ in range(n)]


def _diverge_from_epoch(monkeypatch, epoch: int):
    """Every member's training loss is NaN from ``epoch`` on (after a finite best epoch before it)."""
    from xclip_jax import fit

    seen = {"epochs": 0}
    original = fit._Members.run_epoch

    def run_epoch(self, active):
        metrics, ranks = original(self, active)
        seen["epochs"] += 1
        if seen["epochs"] > epoch:
            for m in metrics:
                m["finite"] = False
        return metrics, ranks

    monkeypatch.setattr(fit._Members, "run_epoch", run_epoch)


@pytest.mark.parametrize("size", [1, 2])
def test_a_trial_that_diverges_after_its_best_epoch_is_pruned_and_keeps_its_best(tmp_path, monkeypatch, size):
    """Loss NaN from epoch 1 on: the trial ends PRUNED with epoch 0's validation R@1 reported, its best
    checkpoint and `diverged_at`, and the same timing attributes as any trial, alone or in a bundle."""
    driver, runner = _runner(tmp_path)
    trials = _ask(driver, size)
    _diverge_from_epoch(monkeypatch, 1)
    result = runner.run_job([st.trial_id(t) for t in trials])
    assert result["states"] == ["PRUNED"] * size
    for t in trials:
        done = driver.study.get_trials()[t.number]
        assert done.state == TrialState.PRUNED and list(done.intermediate_values) == [0]
        assert done.user_attrs["diverged_at"] == 1 and done.user_attrs["stopped"] == "diverged at epoch 1"
        assert set(TIMINGS) <= set(done.user_attrs)
        assert checkpoint.latest_step(done.user_attrs["checkpoint"]) == 0


def test_a_trial_that_diverges_at_once_fails_with_the_reason_and_its_timings(tmp_path, monkeypatch):
    driver, runner = _runner(tmp_path)
    (trial,) = _ask(driver, 1)
    _diverge_from_epoch(monkeypatch, 0)
    assert runner.run_job([st.trial_id(trial)])["states"] == ["FAIL"]
    done = driver.study.get_trials()[trial.number]
    assert "not finite" in done.user_attrs["fail_reason"] and done.user_attrs["diverged_at"] == 0
    assert set(TIMINGS) <= set(done.user_attrs)
    assert runner.trials_run == 1  # the runner's bookkeeping ran: it goes on to its next trial


def test_a_trial_out_of_device_memory_fails_with_the_plans_figure(tmp_path, monkeypatch):
    """A job the device cannot hold fails every member with one line: the plan's figure for it and the
    device's own (none on a CPU), and the fix."""
    from xclip_jax import fit

    driver, runner = _runner(tmp_path)
    trials = _ask(driver, 1)

    def run_epoch(self, active):
        raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 8589934592 bytes.")

    monkeypatch.setattr(fit._Members, "run_epoch", run_epoch)
    with pytest.raises(SystemExit):
        runner.run_job([st.trial_id(t) for t in trials])
    trial = driver.study.get_trials()[0]
    reason = trial.user_attrs["fail_reason"]
    assert trial.state == TrialState.FAIL and "\n" not in reason
    assert reason.startswith("out of device memory: the plan gave this bundle of 1 ") and " GiB; " in reason
    assert "fewer n_jobs" in reason and "RESOURCE_EXHAUSTED" in reason
