"""Tests for xclip_jax.report: JSON summary, importances, plots and the CLI."""

import dataclasses
import json
import math

import optuna
import pytest
from optuna.trial import TrialState

from xclip_jax import report, verdict
from xclip_jax.study_plots import PLOT_NAMES
from xclip_jax.tune_config import INIT_LINE

optuna.logging.set_verbosity(optuna.logging.WARNING)

# Small test studies trip PED-ANOVA's "too few trials per regime" advisory; expected here.
pytestmark = pytest.mark.filterwarnings("ignore:Some regimes:UserWarning")

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _storage(tmp_path):
    return f"sqlite:///{tmp_path}/s.db"


def _build_study(storage, name="tune"):
    """8 trials: conditional hidden_dim, reported steps, 2 PRUNED, 1 FAIL, 1 NaN report."""
    study = optuna.create_study(
        direction="maximize",
        storage=storage,
        study_name=name,
        sampler=optuna.samplers.RandomSampler(seed=0),
    )
    outcomes = ["ok", "ok", "pruned", "ok", "ok", "fail", "pruned", "ok"]
    for i, outcome in enumerate(outcomes):
        t = study.ask()
        head = t.suggest_categorical("head_type", ["linear", "mlp"])
        lr = t.suggest_float("lr", 1e-4, 1e-1, log=True)
        hidden = t.suggest_int("hidden_dim", 64, 512) if head == "mlp" else 0
        r1 = 0.3 + 0.1 * math.log10(lr) * -0.1 + hidden / 5000 + 0.01 * i
        n_steps = 1 if outcome == "pruned" else 3
        for step in range(n_steps):
            t.report(r1 * (step + 1) / 3, step)
        if i == 0:
            t.set_user_attr("note", "first")
        if outcome == "pruned":
            study.tell(t, state=TrialState.PRUNED)
        elif outcome == "fail":
            study.tell(t, state=TrialState.FAIL)
        else:
            study.tell(t, r1)
    return study


@pytest.fixture
def study(tmp_path):
    return _build_study(_storage(tmp_path))


def test_trial_record_and_summary(study):
    s = report.study_summary(study)
    assert s["study_name"] == "tune"
    assert s["direction"] == "MAXIMIZE"
    assert s["n_trials"] == 8
    assert s["counts"] == {"COMPLETE": 5, "PRUNED": 2, "FAIL": 1, "RUNNING": 0, "WAITING": 0}
    assert s["best_trial"] == study.best_trial.number
    assert s["best_value"] == pytest.approx(study.best_value)
    assert s["best_params"] == study.best_params
    rec = s["trials"][0]
    assert rec["number"] == 0 and rec["state"] == "COMPLETE"
    assert set(rec["intermediate_values"]) == {"0", "1", "2"}
    assert rec["user_attrs"] == {"note": "first"}
    assert rec["duration_seconds"] >= 0
    assert rec["datetime_start"] and rec["datetime_complete"]
    failed = s["trials"][5]
    assert failed["state"] == "FAIL" and failed["value"] is None


def test_write_report(study, tmp_path):
    out = tmp_path / "out"
    written = report.write_report(study, out)

    summary = json.loads((out / "study_summary.json").read_text())
    assert written["study_summary.json"] == out / "study_summary.json"
    assert [t["number"] for t in summary["trials"]] == list(range(8))
    by_number = {t.number: t for t in study.get_trials()}
    for rec in summary["trials"]:
        t = by_number[rec["number"]]
        assert rec["state"] == t.state.name
        assert rec["params"] == t.params  # conditional hidden_dim only where suggested
        assert rec["intermediate_values"] == {
            str(k): pytest.approx(v) for k, v in t.intermediate_values.items()
        }
    states = [t["state"] for t in summary["trials"]]
    assert states.count("PRUNED") == 2 and states.count("FAIL") == 1
    assert any("hidden_dim" in t["params"] for t in summary["trials"])
    assert any("hidden_dim" not in t["params"] for t in summary["trials"])

    imps = json.loads((out / "importances.json").read_text())
    assert imps and set(imps) <= {"head_type", "lr", "hidden_dim"}
    assert sum(imps.values()) == pytest.approx(1.0)
    assert all(v >= 0 for v in imps.values())

    assert not written.skipped
    for name in PLOT_NAMES:
        png = out / "plots" / f"{name}.png"
        html = out / "plots" / f"{name}.html"
        assert written[f"plots/{name}.png"] == png
        assert written[f"plots/{name}.html"] == html
        assert png.read_bytes().startswith(PNG_MAGIC) and png.stat().st_size > 1000
        assert "plotly" in html.read_text()
    # The pages load plotly from the output root's one copy, never from a CDN (reports are read offline).
    (js,) = out.glob("plotly-*.min.js")
    assert f'src="../{js.name}"' in (out / "plots" / "optimization_history.html").read_text()
    assert "cdn.plot.ly" not in (out / "plots" / "optimization_history.html").read_text()
    assert all(p.is_file() for p in written.values())


def test_json_is_strict_with_non_finite_values(tmp_path):
    study = optuna.create_study(direction="maximize")
    t = study.ask()
    t.suggest_float("lr", 1e-4, 1e-1, log=True)
    t.report(float("nan"), 0)
    t.report(float("inf"), 1)
    t.set_user_attr("loss", float("-inf"))
    study.tell(t, 0.5)
    running = study.ask()  # left RUNNING, never told
    running.suggest_float("lr", 1e-4, 1e-1, log=True)

    out = tmp_path / "out"
    report.write_report(study, out)
    text = (out / "study_summary.json").read_text()
    summary = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-strict JSON {c}"))
    rec = summary["trials"][0]
    assert rec["intermediate_values"] == {"0": None, "1": None}
    assert rec["user_attrs"] == {"loss": None}
    running_rec = summary["trials"][1]
    assert running_rec["state"] == "RUNNING"
    assert running_rec["value"] is None and running_rec["datetime_complete"] is None
    assert summary["counts"]["RUNNING"] == 1


def test_single_complete_trial_skips_what_it_cannot_plot(tmp_path):
    study = optuna.create_study(direction="maximize")
    study.optimize(lambda t: t.suggest_float("x", 0.0, 1.0), n_trials=1)

    assert report.importances(study) == {}
    out = tmp_path / "out"
    written = report.write_report(study, out)
    assert json.loads((out / "importances.json").read_text()) == {}
    assert set(written.skipped) == {
        "param_importances",
        "parallel_coordinate",
        "intermediate_values",
    }
    assert (out / "plots" / "optimization_history.png").is_file()
    assert not (out / "plots" / "param_importances.png").exists()
    assert "plots/param_importances.html" not in written


def test_empty_study_and_constant_params(tmp_path):
    empty = optuna.create_study()
    written = report.write_report(empty, tmp_path / "empty")
    assert set(written.skipped) == set(PLOT_NAMES)
    summary = json.loads((tmp_path / "empty" / "study_summary.json").read_text())
    assert summary["best_trial"] is None and summary["trials"] == []

    constant = optuna.create_study()
    for _ in range(3):
        constant.enqueue_trial({"x": 0.5})
    constant.optimize(lambda t: t.suggest_float("x", 0.0, 1.0) + t.number, n_trials=3)
    assert report.importances(constant) == {}


def test_cli_writes_report(tmp_path, capsys):
    storage = _storage(tmp_path)
    _build_study(storage)
    out = tmp_path / "results"
    assert report.main([storage, "tune", "--output-dir", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert "study 'tune'" in stdout and "study_summary.json" in stdout
    assert (out / "study_summary.json").is_file()
    assert (out / "plots" / "parallel_coordinate.png").is_file()


def test_cli_unknown_study_lists_available(tmp_path, capsys):
    storage = _storage(tmp_path)
    _build_study(storage, name="tune")
    optuna.create_study(storage=storage, study_name="other")
    with pytest.raises(SystemExit) as e:
        report.main([storage, "nope", "--output-dir", str(tmp_path / "o")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert "'nope'" in err and "other, tune" in err
    assert not (tmp_path / "o").exists()


def test_cli_missing_sqlite_file_is_not_created(tmp_path, capsys):
    missing = tmp_path / "missing.db"
    with pytest.raises(SystemExit) as e:
        report.main([f"sqlite:///{missing}", "tune"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "missing.db" in err and "does not exist" in err
    assert not missing.exists()


# ---------------------------------------------------------------------------- a tuner's study: its folder and best config


def _tiny_study(tmp_path, values=(0.30, 0.42), baselines=None, record=True):
    """The tiny tuning config and a study of it with one COMPLETE trial per value (no training), as the
    tuner leaves it: its output_dir recorded with the study and ``tune_config.yaml`` in it."""
    from tests.conftest import write
    from xclip_jax.config import dump_yaml
    from xclip_jax.space import sample
    from xclip_jax.tune_config import load_tune_config

    cfg = load_tune_config(write(tmp_path))
    study = optuna.create_study(study_name=cfg.study_name, storage=cfg.storage, direction="maximize")
    for value in values:
        t = study.ask()
        sample(t, cfg)
        study.tell(t, value)
    if baselines:
        study.set_user_attr("xclip_baselines", baselines)
    if record:
        report.record_output_dir(study, cfg.output_dir)
        (tmp_path / "results").mkdir()
        dump_yaml(cfg, tmp_path / "results" / "tune_config.yaml")
    return cfg, study


def _baseline(r1):
    return [{"name": "CCA-32", "param": 32, "val": {"r1": r1}, "test": {"r1": r1}, "fit_seconds": 1.0}]


def test_cli_writes_into_the_studys_own_folder_and_rebuilds_best_config(tmp_path, capsys, monkeypatch):
    """No --output-dir: the folder the study's tuner wrote to (recorded with the study), every output
    rebuilt from its tune_config.yaml, best_config.yaml included; optuna_results is not touched."""
    from xclip_jax.config import load_train_config

    cfg, _ = _tiny_study(tmp_path)
    monkeypatch.chdir(tmp_path)
    assert report.main([cfg.storage, cfg.study_name]) == 0
    out = capsys.readouterr().out
    results = tmp_path / "results"
    assert f"wrote {results / 'best_config.yaml'}" in out and "not rebuilt" not in out
    assert load_train_config(results / "best_config.yaml").experiment_name == "tiny_best"
    assert json.loads((results / "best_results.json").read_text())["best_value"] == pytest.approx(0.42)
    assert (results / "plots" / "parallel_coordinate.png").is_file()
    assert (results / ".study_name").read_text().strip() == "tiny"
    assert not (tmp_path / "optuna_results").exists()
    # another folder gets the best config too (the tuning config is read from the study's own folder)
    assert report.main([cfg.storage, cfg.study_name, "--output-dir", str(tmp_path / "copy")]) == 0
    assert load_train_config(tmp_path / "copy" / "best_config.yaml").experiment_name == "tiny_best"


def test_cli_refuses_another_studys_output_dir(tmp_path, capsys):
    """The tuner's one-line refusal: a folder marked by another study, or holding its best_results.json,
    is left as it was."""
    from tests.conftest import run_cli
    from xclip_jax.runtime import claim

    storage = _storage(tmp_path)
    _build_study(storage, name="tune")
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    claim({"output_dir": theirs}, "other")
    err = run_cli(report.main, [storage, "tune", "--output-dir", str(theirs)], capsys)
    assert "study 'other'" in err and "'tune'" in err and "--output-dir" in err
    assert sorted(p.name for p in theirs.iterdir()) == [".study_name"]
    legacy = tmp_path / "legacy"  # a folder from before the marker: its best_results.json names the study
    legacy.mkdir()
    (legacy / "best_results.json").write_text(json.dumps({"study_name": "other"}))
    assert "study 'other'" in run_cli(report.main, [storage, "tune", "--output-dir", str(legacy)], capsys)
    assert sorted(p.name for p in legacy.iterdir()) == ["best_results.json"]


def test_cli_without_a_tuning_config_says_best_config_was_not_rebuilt(tmp_path, capsys):
    storage = _storage(tmp_path)
    _build_study(storage)
    assert report.main([storage, "tune", "--output-dir", str(tmp_path / "out")]) == 0
    assert "best_config.yaml not rebuilt: no tune_config.yaml" in capsys.readouterr().out
    assert (tmp_path / "out" / ".study_name").read_text().strip() == "tune"


def test_best_config_below_the_baseline_says_so_with_the_yaml_to_add(tmp_path):
    cfg, study = _tiny_study(tmp_path, baselines=_baseline(0.50), record=False)
    report.write_outputs(study, cfg)
    header = (tmp_path / "results" / "best_config.yaml").read_text().split("\ndata:")[0]
    assert "WORSE THAN A LINEAR MAP" in header and "CCA-32" in header and "0.5000" in header
    assert f"add `{INIT_LINE}` under search_space" in header
    study.set_user_attr("xclip_baselines", _baseline(0.40))  # the best trial (0.42) beats it
    report.write_outputs(study, cfg)
    assert "WORSE" not in (tmp_path / "results" / "best_config.yaml").read_text()


def test_next_step_is_the_training_command_or_what_to_change(tmp_path):
    cfg, _ = _tiny_study(tmp_path, record=False)
    won = {"best_value": 0.42, "baselines": _baseline(0.40), "interrupted": False}
    line = verdict.next_step(cfg, "tune.yaml", won)
    assert line.startswith(f"next: python -m xclip_jax.train {tmp_path / 'results' / 'best_config.yaml'}")
    lost = verdict.next_step(cfg, "tune.yaml", {**won, "baselines": _baseline(0.50)})
    assert lost.startswith("next: in tune.yaml, start heads from the CCA solution") and INIT_LINE in lost
    assert "python -m xclip_jax.tune tune.yaml --add-trials 6" in lost and "python -m xclip_jax.train" in lost
    assert verdict.next_step(cfg, "tune.yaml", {**won, "baselines": None}).startswith("next: python -m xclip_jax.train")
    assert verdict.next_step(cfg, "tune.yaml", {**won, "interrupted": True}) is None
    assert verdict.next_step(cfg, "tune.yaml", {**won, "best_value": None}) is None


def test_next_step_changes_a_flag_where_the_value_came_from_one(tmp_path):
    """``--max-epochs 1`` on the command line: the advice to train longer is the flag's, and the
    command that goes on keeps the other flags (the password masked)."""
    from xclip_jax.tune_config import ParamSpace

    cfg, _ = _tiny_study(tmp_path, record=False)
    cfg = dataclasses.replace(cfg, max_epochs=1, search_space={**cfg.search_space, "init": ParamSpace(
        choices=("default", "cca"))})
    lost = {"best_value": 0.42, "baselines": _baseline(0.50), "interrupted": False}
    flags = {"max_epochs": 1, "storage": "postgresql+psycopg://alice:PW@host/db"}
    line = verdict.next_step(cfg, "tune.yaml", lost, flags)
    assert line.startswith("next: train longer: set `--max-epochs 2`"), line
    assert "python -m xclip_jax.tune tune.yaml --max-epochs 2 --storage postgresql+psycopg://alice:***@host/db " \
           "--add-trials 6" in line and "PW" not in line and "in tune.yaml" not in line
    assert verdict.next_step(cfg, "tune.yaml", lost).startswith("next: in tune.yaml, train longer: set `max_epochs: 2`")


def test_parallel_coordinate_draws_the_most_important_parameters(tmp_path):
    """Six axes at most, the most important first, and labels that fit: a suffix every choice shares
    is dropped."""
    from xclip_jax import study_plots

    study = optuna.create_study(direction="maximize")
    for i in range(4):
        t = study.ask()
        for j in range(9):
            t.suggest_float(f"p{j}", 0.0, 1.0)
        study.tell(t, float(i))
    imps = {"p8": 0.5, "p3": 0.3, "p0": 0.2}
    assert study_plots.parallel_params(study, imps) == ["p8", "p3", "p0", "p1", "p2", "p4"]
    assert study_plots._shared_suffix(["sigmoid_infonce", "softmax_infonce"]) == "_infonce"
    assert study_plots._shared_suffix(["siglip", "clip"]) == ""


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
def test_parallel_coordinate_always_draws_the_head_type_with_its_labels_above_the_lines():
    from matplotlib import pyplot as plt
    from optuna.visualization.matplotlib import plot_parallel_coordinate

    from xclip_jax import study_plots

    study = optuna.create_study(direction="maximize")
    for i in range(6):
        t = study.ask()
        t.suggest_categorical("head_type", ["clip", "mlp"])
        for j in range(8):
            t.suggest_float(f"p{j}", 0.0, 1.0)
        study.tell(t, float(i))
    imps = {**{f"p{j}": 0.1 for j in range(8)}, "head_type": 0.0}  # the least important
    params = study_plots.parallel_params(study, imps)
    assert params[0] == "head_type" and len(params) == study_plots.PARALLEL_AXES
    ax = plot_parallel_coordinate(study, params=params)
    study_plots._readable_axes(ax)
    axes = [a for a in ax.figure.axes if a is not ax and a.get_label() != "<colorbar>"]
    labels = [label for a in axes for label in a.get_yticklabels() if label.get_text()]
    assert labels and all(label.get_bbox_patch() is not None for label in labels)
    assert all(a.get_zorder() > ax.get_zorder() for a in axes)  # drawn over the lines
    plt.close(ax.figure)


def test_intermediate_values_stay_readable_at_a_hundred_trials():
    """A legend for the best few complete trials and one entry for the pruned ones, whatever the
    number of trials; the others are coloured by their final value, the pruned ones grey."""
    from xclip_jax import study_plots

    study = optuna.create_study(direction="maximize")
    for i in range(100):
        t = study.ask()
        pruned = i % 3 == 0
        for step in range(2 if pruned else 5):
            t.report((i % 17) / 20 * (step + 1) / 5, step)
        study.tell(t, None if pruned else (i % 17) / 20, state=TrialState.PRUNED if pruned else TrialState.COMPLETE)
    complete = sorted(study.get_trials(states=(TrialState.COMPLETE,)), key=lambda t: -t.value)
    best = complete[:study_plots.LEGEND_TRIALS]
    ax = study_plots._intermediate_matplotlib(study)
    texts = [t.get_text() for t in ax.get_legend().get_texts()]
    __import__("matplotlib.pyplot").pyplot.close(ax.figure)
    assert texts == [f"#{t.number} {t.value:.3f}" for t in best] + ["pruned (34)"]
    fig = study_plots._intermediate_plotly(study)
    assert [d.name for d in fig.data if d.showlegend] == ["pruned"] + [f"#{t.number} {t.value:.3f}" for t in best[::-1]]
    style = study_plots._curve_style
    span = (complete[-1].value, complete[0].value)
    assert style(complete[0], [], span)["color"] != style(complete[-1], [], span)["color"]
    assert style(study.trials[0], [], span)["color"] == "#b4b4b4"  # pruned


def test_the_top_trials_and_their_margins_are_in_best_results_and_one_line(tmp_path):
    """How sure the answer is: the best complete trials, each one's gap to the best and margin over the
    best baseline, in best_results.json and in the study's last lines."""
    cfg, study = _tiny_study(tmp_path, values=(0.30, 0.42, 0.41, 0.10), baselines=_baseline(0.40), record=False)
    report.write_outputs(study, cfg)
    top = json.loads((tmp_path / "results" / "best_results.json").read_text())["top_trials"]
    assert [t["number"] for t in top] == [1, 2, 0, 3]
    assert [round(t["behind_best"], 3) for t in top] == [0.0, -0.01, -0.12, -0.32]
    assert [round(t["over_best_baseline"], 3) for t in top] == [0.02, 0.01, -0.1, -0.3]
    assert set(top[0]["params"]) >= {"head_type", "learning_rate"}
    table = verdict.top_table(top, cfg).splitlines()
    assert [row.split()[:3] for row in table[2:]] == [["#1", "0.4200", top[0]["params"]["head_type"]],
                                                      ["#2", "0.4100", "-0.010"], ["#0", "0.3000", "-0.120"],
                                                      ["#3", "0.1000", "-0.320"]]
