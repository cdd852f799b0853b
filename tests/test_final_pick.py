"""The final pick: the top trials trained again with fresh seeds, the best mean handed over, every
candidate's figures kept."""

import json

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import TrialState, create_trial

from tests.conftest import load, tune_run, write
from xclip_jax import final_pick
from xclip_jax import study as st
from xclip_jax.tune_config import load_tune_config, trial_config


def _study(values, heads=None):
    study = optuna.create_study(direction="maximize")
    for i, value in enumerate(values):
        params = {"learning_rate": 1e-3 * (i + 1), "head_type": (heads or ["clip"] * len(values))[i]}
        study.add_trial(create_trial(state=TrialState.COMPLETE, value=value, params=params,
                                     distributions={"learning_rate": FloatDistribution(1e-4, 1e-1, log=True),
                                                    "head_type": CategoricalDistribution(["clip", "siglip"])}))
    study.add_trial(create_trial(state=TrialState.PRUNED, params={"learning_rate": 0.05, "head_type": "clip"},
                                 distributions=study.trials[0].distributions))
    return study


def test_the_pick_is_the_best_mean_of_the_fresh_runs(tmp_path):
    """Trial 1 ran best once (0.50) but its fresh runs average 0.41; trial 0's average 0.46: 0 is
    picked. A run that was lost or diverged counts 0, so trial 2, best in its one finished run, loses."""
    cfg = load_tune_config(write(tmp_path, final_pick="rerun", final_pick_trials=3, final_pick_seeds=2))
    study = _study([0.48, 0.50, 0.47, 0.30])
    runs = [{"number": 0, "seed": 1, "value": 0.45}, {"number": 0, "seed": 2, "value": 0.47},
            {"number": 1, "seed": 3, "value": 0.40}, {"number": 1, "seed": 4, "value": 0.42},
            {"number": 2, "seed": 5, "value": 0.55}, {"number": 2, "seed": 6, "value": None}]
    pick = final_pick.record(study, cfg, runs)
    means = {row["number"]: row["mean"] for row in pick["candidates"]}
    assert means == pytest.approx({0: 0.46, 1: 0.41, 2: 0.275})
    assert [row["number"] for row in pick["candidates"]] == [1, 0, 2]  # the top 3 by value; trial 3 is 4th
    assert pick["picked"] == 0 and pick["best_single_run"] == 1
    assert final_pick.picked_trial(study).number == 0 and study.best_trial.number == 1
    assert final_pick.pick_line(pick) == ("final pick: trial 0 (mean val R@1 0.460 over 2 fresh runs; trial 1, the "
                                          "best single run, 0.410)")
    # without a record, the best value's trial
    assert final_pick.picked_trial(_study([0.48, 0.50])).number == 1


def test_the_runs_are_planned_per_program_key_with_fresh_seeds(tmp_path):
    cfg = load_tune_config(write(tmp_path, final_pick="rerun", final_pick_trials=3, final_pick_seeds=2))
    study = _study([0.48, 0.50, 0.47], heads=["clip", "siglip", "clip"])
    jobs = final_pick.plan(study, cfg, (16, 24), members=lambda key: 4)
    assert sorted(sorted(n for n, _ in job) for job in jobs) == [[0, 0, 2, 2], [1, 1]]  # clip apart from siglip
    # bundles of at most the plan's member count per program: one member each by default
    assert sorted(len(job) for job in final_pick.plan(study, cfg, (16, 24), members=lambda key: 3)) == [1, 2, 3]
    assert [len(job) for job in final_pick.plan(study, cfg, (16, 24))] == [1] * 6
    seeds = [seed for job in jobs for _, seed in job]
    own = {trial_config(cfg, t.params, trial_number=t.number).seed for t in study.trials}
    assert len(set(seeds)) == 6 and not set(seeds) & own
    assert final_pick.plan(study, load_tune_config(write(tmp_path)), (16, 24)) == []  # final_pick: best
    assert final_pick.candidates(_study([0.5]), cfg) == []  # nothing to choose among


def test_a_rerun_trains_the_trial_again_as_training_it_with_that_seed_would(tmp_path):
    """The runner's rerun of a finished trial with another seed gives that seed's training of the
    trial's configuration: the same best validation R@1 as fit on it directly."""
    import dataclasses

    from xclip_jax.fit import fit
    from xclip_jax.runner import Runner
    from xclip_jax.spec import RunSpec
    from xclip_jax.step import create_train_state
    from xclip_jax.tune import Driver

    cfg = load_tune_config(write(tmp_path, n_jobs=1, max_epochs=2, pruner={"type": "NopPruner"},
                                 fixed={"output_dim": 16, "batch_size": 64, "head_type": "clip"},
                                 search_space={"learning_rate": {"type": "float", "low": 1e-3, "high": 1e-2}}))
    driver = Driver(cfg, progress=False)
    driver.prepare()
    runner = Runner(str(driver.out / "tune_config.yaml"), str(driver.cache_dir))
    trial = st.ask_trial(driver.study, driver.storage, driver.cfg, driver.dims, driver.rows)
    assert runner.run_job([st.trial_id(trial)])["states"] == ["COMPLETE"]
    (got,) = runner.run_reruns([[trial.number, 12345]])["reruns"]
    tc = dataclasses.replace(trial_config(cfg, trial.params, trial_number=trial.number), seed=12345)
    _, fs = fit(create_train_state(RunSpec.of(tc, *driver.dims), seed=12345), runner.train_data, runner.val_data,
                num_epochs=2, patience=cfg.max_patience, ks=tuple(tc.evaluation.top_k), progress=False)
    assert got == {"number": trial.number, "seed": 12345, "value": pytest.approx(fs.best_r1, abs=1e-9),
                   "best_epoch": fs.best_epoch, "stopped": fs.stopped}
    assert got["value"] != driver.study.trials[trial.number].value  # another seed, another run


def test_a_study_with_final_pick_rerun_hands_over_the_pick(tmp_path):
    cfg_path = write(tmp_path, n_trials=4, n_jobs=1, max_epochs=2, pruner={"type": "NopPruner"},
                     final_pick="rerun", final_pick_trials=2, final_pick_seeds=2)
    done = tune_run(tmp_path, cfg_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "final pick: training the top 2 trials again with 2 fresh seeds each (4 runs)" in done.stdout
    results = json.loads((tmp_path / "results" / "best_results.json").read_text())
    pick = results["final_pick"]
    assert pick["procedure"] == "rerun" and len(pick["candidates"]) == 2
    assert all(len(row["runs"]) == 2 and all(r["value"] is not None for r in row["runs"]) for row in pick["candidates"])
    assert pick["picked"] == max(pick["candidates"], key=lambda row: row["mean"])["number"]
    assert results["best_trial"] == pick["picked"]
    study = load(tmp_path)
    assert study.user_attrs[final_pick.FINAL_PICK_ATTR] == pick
    header = (tmp_path / "results" / "best_config.yaml").read_text().splitlines()[:3]
    assert any(line.startswith(f"# final pick: trial {pick['picked']} (mean val R@1") for line in header), header
    assert f"final pick: trial {pick['picked']}" in done.stdout
