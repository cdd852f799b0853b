"""Report on an Optuna tuning study: JSON summary, parameter importances and plots.

The tuning driver writes a study's outputs here (``write_outputs``: the report below, plus
``best_config.yaml`` and ``best_results.json``), and
`python -m xclip_jax.report STORAGE STUDY [--output-dir DIR]` loads a study from its storage
(e.g. ``sqlite:///optuna.db``) and writes them again, by default into the folder the study's
tuner wrote to (``best_config.yaml`` too, from the ``tune_config.yaml`` found there)::

    OUTPUT_DIR/study_summary.json      every trial: state, params, value, intermediate values; the memory plan
    OUTPUT_DIR/importances.json        {param: importance}, {} when it can't be computed
    OUTPUT_DIR/plots/NAME.html         interactive plotly figure
    OUTPUT_DIR/plots/NAME.png          static matplotlib figure

for NAME in optimization_history, param_importances, parallel_coordinate and
intermediate_values. A plot the study can't support yet (too few complete trials, no
intermediate values) is skipped with a logged warning instead of failing the report.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import warnings
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from xclip_jax.config import dump_yaml
from xclip_jax.errors import UserError, cli, exception_line
from xclip_jax.final_pick import FINAL_PICK_ATTR, pick_line, picked_trial
from xclip_jax.plan import stored as stored_plan
from xclip_jax.runtime import check_owners, claim, default_folder, host_name
from xclip_jax.study import BASELINES_ATTR, load_study
from xclip_jax.study_plots import importances, write_plots
from xclip_jax.tune_config import load_tune_config
from xclip_jax.verdict import advice_line, against_baselines, below_baseline, best_train_config, top_trials

_STATES = (
    TrialState.COMPLETE,
    TrialState.PRUNED,
    TrialState.FAIL,
    TrialState.RUNNING,
    TrialState.WAITING,
)


class Report(dict):
    """``{relative path: Path}`` of the files written, plus ``skipped``: ``{plot name: reason}``."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.skipped: dict[str, str] = {}
        self.warnings: list[str] = []


# ---------------------------------------------------------------------------- JSON


def _jsonable(x: Any) -> Any:
    """Return `x` as strict JSON data: non-finite floats become None, unknown types str."""
    if x is None or isinstance(x, (bool, str, int)):
        return x
    if isinstance(x, float):
        # Strict JSON has no NaN/Infinity; a diverged trial's NaN loss must not
        # make the whole summary unreadable by other tools.
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple, set, frozenset)):
        return [_jsonable(v) for v in x]
    if hasattr(x, "tolist") and callable(x.tolist):
        # numpy / jax scalars and arrays stored in user attrs.
        try:
            return _jsonable(x.tolist())
        except (TypeError, ValueError):
            pass
    if hasattr(x, "item") and callable(x.item):
        try:
            return _jsonable(x.item())
        except (TypeError, ValueError):
            pass
    if hasattr(x, "isoformat"):
        return x.isoformat()
    return str(x)


def _write_json(path: Path, data: Any) -> None:
    text = json.dumps(_jsonable(data), indent=2, allow_nan=False)
    path.write_text(text + "\n", encoding="utf-8")


# ---------------------------------------------------------------------------- summaries


def _trial_value(t: FrozenTrial) -> float | list[float] | None:
    # FrozenTrial.value raises on multi-objective trials; read `values` instead.
    if t.values is None:
        return None
    return t.values[0] if len(t.values) == 1 else list(t.values)


def trial_record(t: optuna.trial.FrozenTrial) -> dict:
    """Describe one trial as JSON-ready data.

    Keys: ``number``, ``state`` (e.g. ``"PRUNED"``), ``params`` (only those the trial
    suggested, so conditional params may be absent), ``value`` (None unless COMPLETE;
    a list for multi-objective studies), ``intermediate_values`` (``{str(step): value}``
    in step order, str keys so the record round-trips through JSON unchanged),
    ``datetime_start``/``datetime_complete`` (ISO 8601 or None), ``duration_seconds``
    and ``user_attrs``. Non-finite numbers are replaced by None.
    """
    return _jsonable(
        {
            "number": t.number,
            "state": t.state.name,
            "params": dict(t.params),
            "value": _trial_value(t),
            "intermediate_values": {
                str(step): v for step, v in sorted(t.intermediate_values.items())
            },
            "datetime_start": t.datetime_start.isoformat() if t.datetime_start else None,
            "datetime_complete": (
                t.datetime_complete.isoformat() if t.datetime_complete else None
            ),
            "duration_seconds": t.duration.total_seconds() if t.duration is not None else None,
            "user_attrs": dict(t.user_attrs),
        }
    )


def _direction(study: optuna.Study) -> str | list[str]:
    names = [d.name for d in study.directions]
    return names[0] if len(names) == 1 else names


def _best_trial(study: optuna.Study) -> FrozenTrial | None:
    if len(study.directions) != 1:
        return None  # multi-objective studies have a Pareto front, not one best trial
    try:
        return study.best_trial
    except ValueError:  # no COMPLETE trial yet
        return None


def _state_counts(trials: list[FrozenTrial]) -> dict[str, int]:
    # Every state listed, zeros included, so consumers needn't guard missing keys.
    counts = {s.name: 0 for s in _STATES}
    for t in trials:
        counts[t.state.name] = counts.get(t.state.name, 0) + 1
    return counts


def _devices(trials: list[FrozenTrial]) -> list[dict]:
    seen = []
    for t in trials:
        device = t.user_attrs.get("device")
        if isinstance(device, dict) and device not in seen:
            seen.append(device)
    return seen


def study_summary(study: optuna.Study) -> dict:
    """Summarise a study as JSON-ready data.

    Keys: ``study_name``, ``direction`` (``"MAXIMIZE"``/``"MINIMIZE"``), ``n_trials``,
    ``counts`` (trials per state: COMPLETE, PRUNED, FAIL, RUNNING, WAITING, zeros
    included), ``best_trial`` (its number, or None when no trial completed),
    ``best_value``, ``best_params``, ``user_attrs`` (the study's) and ``trials``
    (:func:`trial_record` of every trial, in trial-number order).
    """
    trials = study.get_trials(deepcopy=False)
    counts = _state_counts(trials)
    best = _best_trial(study)
    return _jsonable(
        {
            "study_name": study.study_name,
            "direction": _direction(study),
            "n_trials": len(trials),
            "counts": counts,
            "best_trial": best.number if best is not None else None,
            "best_value": best.value if best is not None else None,
            "best_params": dict(best.params) if best is not None else None,
            "user_attrs": dict(study.user_attrs),
            # where the last driver run's time went (every run's record is in user_attrs.xclip_runs)
            "throughput": (study.user_attrs.get("xclip_runs") or [None])[-1],
            # what the trials ran on (backend, device, memory): one entry per device seen
            "devices": _devices(trials),
            # the closed-form linear baselines on the same data (val and test metrics of each)
            "baselines": study.user_attrs.get(BASELINES_ATTR),
            "trials": [trial_record(t) for t in sorted(trials, key=lambda t: t.number)],
        }
    )


def write_report(study: optuna.Study, out_dir: str | Path) -> Report:
    """See :func:`_write_report`; Optuna's notes on small studies (few trials per regime, flat
    axes) are silenced here: they are expected early in a study and say nothing actionable."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return _write_report(study, out_dir)


def _write_report(study: optuna.Study, out_dir: str | Path) -> Report:
    """Write the study's summary, importances and plots under `out_dir`.

    Writes ``study_summary.json`` (:func:`study_summary`), ``importances.json``
    (:func:`importances`) and, for each of :data:`PLOT_NAMES`, ``plots/NAME.html``
    (plotly; one ``plotly-VERSION.min.js`` per output root, ``study_plots.shared_plotly_js``, so
    the folder works offline) and
    ``plots/NAME.png`` (optuna.visualization.matplotlib). A plot the study can't
    support, or whose drawing fails, is skipped with a logged warning; it never raises
    for the study's contents.

    Returns a :class:`Report`: ``{path relative to out_dir: Path}`` of every file
    written, with ``.skipped`` = ``{plot name: reason}``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    report = Report()

    summary_path = out_dir / "study_summary.json"
    _write_json(summary_path, {**study_summary(study), "memory_plan": stored_plan(out_dir)})
    report["study_summary.json"] = summary_path

    imps = importances(study)
    imps_path = out_dir / "importances.json"
    _write_json(imps_path, imps)
    report["importances.json"] = imps_path

    written, skipped = write_plots(study, imps, out_dir / "plots")
    report.update({Path(os.path.relpath(path, out_dir)).as_posix(): path for path in written})
    report.skipped.update(skipped)
    return report


# ---------------------------------------------------------------------------- a study's outputs


OUTPUT_DIR_ATTR = "xclip_output_dir"  # {host: the output_dir its driver writes to}: where report writes by default


def record_output_dir(study, output_dir) -> None:
    """Remember with the study where this host's driver writes its outputs (``report``'s default)."""
    dirs = dict(study.user_attrs.get(OUTPUT_DIR_ATTR) or {})
    path = str(Path(output_dir).resolve())
    if dirs.get(host_name()) != path:
        study.set_user_attr(OUTPUT_DIR_ATTR, {**dirs, host_name(): path})


def recorded_output_dir(study) -> Path | None:
    """The output_dir this host's driver wrote the study's outputs to, or None."""
    path = (study.user_attrs.get(OUTPUT_DIR_ATTR) or {}).get(host_name())
    return Path(path) if path else None


def write_outputs(study, cfg) -> dict:
    """best_config.yaml, best_results.json and the report (summary, importances, plots)."""
    from xclip_jax.study import counts

    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = write_report(study, out)
    try:
        best = picked_trial(study)
    except ValueError:
        return written
    tc, warning = best_train_config(cfg, best)
    header = (f"# Best configuration from study {cfg.study_name!r}: trial {best.number}, "
              f"validation R@1 = {best.value:.4f} ({len(study.trials)} trials)\n")
    pick = study.user_attrs.get(FINAL_PICK_ATTR)
    if pick and pick["picked"] == best.number:
        header += f"# {pick_line(pick)}\n"
    lost = below_baseline(best.value, study.user_attrs.get(BASELINES_ATTR))
    if lost:
        header += (f"# WORSE THAN A LINEAR MAP: the closed-form baseline {lost['name']} reaches validation R@1 = "
                   f"{lost['val']['r1']:.4f}; to beat it, in the tuning config: {advice_line(cfg)}\n")
    if warning:
        header += f"# NOTE: {warning}\n"
        written.warnings.append(warning)
    dump_yaml(tc, out / "best_config.yaml", header=header)
    results = {
        "study_name": cfg.study_name,
        "best_trial": best.number,
        "best_value": best.value,
        "best_params": best.params,
        "user_attrs": best.user_attrs,
        "checkpoint": str(Path(cfg.checkpoint_dir) / f"{best.number:05d}"),
        "counts": counts(study),
        **against_baselines(best.value, study.user_attrs.get(BASELINES_ATTR)),
        "top_trials": top_trials(study, study.user_attrs.get(BASELINES_ATTR)),
        "final_pick": pick or {"procedure": "best"},
    }
    (out / "best_results.json").write_text(json.dumps(results, indent=2, default=str))
    written["best_config"] = out / "best_config.yaml"
    written["best_results"] = out / "best_results.json"
    return written


# ---------------------------------------------------------------------------- CLI


def parser() -> argparse.ArgumentParser:
    """``python -m xclip_jax.report``'s argument parser."""
    p = argparse.ArgumentParser(prog="python -m xclip_jax.report",
                                description="Write a JSON summary, parameter importances and plots of an Optuna study.")
    p.add_argument("storage", metavar="STORAGE", help="storage URL, e.g. sqlite:///optuna.db")
    p.add_argument("study", metavar="STUDY", help="study name")
    p.add_argument("--output-dir", metavar="DIR", help="where to write the outputs (default: the output_dir the "
                   "study's tuner wrote to on this machine; optuna_results/STUDY for a study it did not write)")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    return p


def _summary_line(study: optuna.Study) -> str:
    counts = _state_counts(study.get_trials(deepcopy=False))
    parts = ", ".join(f"{n} {s.lower()}" for s, n in counts.items() if n)
    best = _best_trial(study)
    best_text = f"best trial {best.number}: {best.value:.6g}" if best is not None else "no best trial"
    return f"study {study.study_name!r}: {parts or 'no trials'}; {best_text}"


def _tune_config(study, out: Path, recorded: Path | None):
    """The tuning config the study's driver left beside its outputs (``tune_config.yaml``, in ``out``
    or else in the folder the driver wrote to), pointed at ``out``; None when there is none."""
    for folder in (out, recorded):
        path = folder / "tune_config.yaml" if folder else None
        if path and path.is_file():
            cfg = load_tune_config(path)
            if cfg.study_name == study.study_name:
                return dataclasses.replace(cfg, output_dir=str(out))
    return None


@cli
def main(argv: list[str] | None = None) -> int:
    """CLI entry point: ``python -m xclip_jax.report STORAGE STUDY [--output-dir DIR]``.

    Loads the study and writes its outputs: into ``--output-dir``, else the folder the study's tuner
    wrote to on this machine (else the tuner's default, ``optuna_results/STUDY``); with the tuning config found there, every
    output (``write_outputs``: ``best_config.yaml`` and ``best_results.json`` too), else the report
    (``write_report``). A folder that holds another study's outputs is refused, as the tuner refuses
    it. Prints each file written and each plot skipped. Returns 0; a missing study, an unreachable
    storage or another study's folder is a UserError (one line on stderr, exit status 2).
    """
    args = parser().parse_args(argv)
    study = load_study(args.storage, args.study)
    recorded = recorded_output_dir(study)
    out = Path(args.output_dir or recorded or default_folder("output_dir", study.study_name))
    check_owners({"output_dir": out}, study.study_name)
    cfg = _tune_config(study, out, recorded)
    try:
        report = write_outputs(study, cfg) if cfg is not None else write_report(study, out)
        claim({"output_dir": out}, study.study_name)
    except OSError as e:
        raise UserError(f"cannot write the report to {str(out)!r}: {exception_line(e)}; pass a "
                        "writable --output-dir") from e
    print(_summary_line(study))
    for path in report.values():
        print(f"wrote {path}")
    for name, reason in report.skipped.items():
        print(f"skipped {name}: {reason}")
    for warning in report.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if cfg is None:
        print(f"best_config.yaml not rebuilt: no tune_config.yaml of study {study.study_name!r} in {out} "
              "(the tuner writes one into its output_dir)")
    return 0


if __name__ == "__main__":
    # `main` is already wrapped by `cli`; wrapping it again would swallow --debug.
    raise SystemExit(main())
