"""The study's answer in a few lines: its top trials and how far apart they are, the margin over the
best closed-form baseline (with the config change when a baseline wins), where its time went, and
the command to run next. ``best_results.json`` carries the same figures."""

from __future__ import annotations

import sys
from pathlib import Path

from xclip_jax.tune_config import advice_line, baseline_advice


def top_baseline(baselines: list) -> dict:
    """The baseline with the best validation R@1."""
    return max(baselines, key=lambda b: b["val"]["r1"])


def below_baseline(best_value: float | None, baselines) -> dict | None:
    """The best closed-form baseline when it beats the study's best trial, else None."""
    if best_value is None or not baselines:
        return None
    top = top_baseline(baselines)
    return top if best_value < top["val"]["r1"] else None


TOP_K = 5


def trial_line(study, t) -> str:
    """The console's line for a finished trial (as Optuna's own log says it)."""
    from optuna.trial import TrialState

    if t.state == TrialState.COMPLETE:
        try:
            best = study.best_trial
            tail = f" Best is trial {best.number} with value: {best.value:.4f}."
        except ValueError:
            tail = ""
        return f"Trial {t.number} finished with value: {t.value:.4f} and parameters: {t.params}.{tail}"
    if t.state == TrialState.PRUNED:
        last = max(t.intermediate_values) if t.intermediate_values else None
        return f"Trial {t.number} pruned at epoch {last}."
    return f"Trial {t.number} failed: {t.user_attrs.get('fail_reason', 'unknown reason')}"


def bundle_line(numbers: list[int]) -> str:
    """The console's line for a bundle (``batch_trials``) handed to a runner."""
    return (f"bundle of {len(numbers)}: trials {', '.join(map(str, numbers))} train together in one program "
            "(the same head, loss, batch and padded widths, each its own sampled values)")


def top_trials(study, baselines=None, k: int = TOP_K) -> list[dict]:
    """The ``k`` best complete trials, best first: number, validation R@1, its gap to the best trial,
    its margin over the best closed-form baseline and its parameters. How sure the answer is: a
    best trial that leads the next by less than a seed's noise (a few hundredths on real data;
    benchmarks/RESULTS.md) is one of several equally good heads."""
    from optuna.trial import TrialState

    complete = sorted(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)), key=lambda t: -t.value)[:k]
    top = top_baseline(baselines)["val"]["r1"] if baselines else None
    return [{"number": t.number, "value": t.value, "behind_best": t.value - complete[0].value,
             "over_best_baseline": None if top is None else t.value - top, "params": t.params} for t in complete]


def top_line(top: list[dict]) -> str | None:
    """The study's top trials in one line, e.g. ``top trials: #13 0.440, #19 0.420 (-0.020), …``."""
    if len(top) < 2:
        return None
    rest = ", ".join(f"#{t['number']} {t['value']:.3f} ({t['behind_best']:+.3f})" for t in top[1:])
    return f"top trials: #{top[0]['number']} {top[0]['value']:.3f}, {rest}"


def against_baselines(best_value: float, baselines) -> dict:
    if not baselines:
        return {}
    top = top_baseline(baselines)
    return {"baselines": [{"name": b["name"], "param": b["param"], "val_r1": b["val"]["r1"],
                           "test_r1": (b.get("test") or {}).get("r1"), "fit_seconds": b["fit_seconds"]}
                          for b in baselines],
            "best_baseline": top["name"], "over_best_baseline": best_value - top["val"]["r1"]}


def report_baselines(best: float | None, baselines: list | None, cfg=None) -> None:
    """Print the study's best trial against its best closed-form baseline in one line, e.g. ``best
    trial 0.531, +0.052 over CCA-128 (0.479)`` (and a warning when the baseline is better, with the
    tuning config's change when ``cfg`` is given)."""
    if best is None or not baselines:
        return
    top = top_baseline(baselines)
    print(f"best trial {best:.3f}, {best - top['val']['r1']:+.3f} over {top['name']} ({top['val']['r1']:.3f})")
    if best < top["val"]["r1"]:
        advice = f"; in the tuning config: {advice_line(cfg)}" if cfg is not None else ""
        print(f"warning: the study's best trial ({best:.3f}) is below the linear baseline {top['name']} "
              f"({top['val']['r1']:.3f}); widen the search (learning rate, epochs) or start heads from it "
              f"(head_type linear or siglip with init: cca){advice}", file=sys.stderr)


def next_step(cfg, config_path: str, result: dict) -> str | None:
    """The one line that ends a study: the command that trains its best config, or, when a linear
    baseline beat it, what to change first (None when it was interrupted or nothing completed)."""
    if result.get("interrupted") or result.get("best_value") is None:
        return None
    train = f"python -m xclip_jax.train {Path(cfg.output_dir) / 'best_config.yaml'}"
    if below_baseline(result["best_value"], result.get("baselines")):
        change, same_study = baseline_advice(cfg)
        rerun = (f"python -m xclip_jax.tune {config_path} --add-trials {cfg.n_trials}" if same_study else
                 f"python -m xclip_jax.tune {config_path} with a new study_name")
        return f"next: in {config_path}, {change}; then {rerun} (or train the best trial anyway: {train})"
    return f"next: {train}   (trains the best configuration on the full data, up to {cfg.final_epochs} epochs)"


def throughput_line(t: dict) -> str:
    """Where this run's time went: the useful fraction and what the rest was spent on."""
    return (f"useful fraction {t['useful_fraction']:.2f} (training {t['train_seconds']:.0f} s of {t['n_jobs']} x "
            f"{t['wall_seconds']:.0f} s; start-up {t['startup_seconds']:.0f} s, compile {t['compile_seconds']:.0f} s, "
            f"evaluation {t['eval_seconds']:.0f} s over {t['trials']} trials)")
