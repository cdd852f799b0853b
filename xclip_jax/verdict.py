"""The study's answer in a few lines: its top trials and how far apart they are, the margin over the
best closed-form baseline (with the config change when a baseline wins), where its time went, and
the command to run next; the best trial's training config for the full data. ``best_results.json``
carries the same figures."""

from __future__ import annotations

import dataclasses
import shlex
import sys
from pathlib import Path

from xclip_jax.config import ConfigError
from xclip_jax.errors import UserError, mask_secrets
from xclip_jax.spec import CCA_HEADS, HeadSpec
from xclip_jax.tune_config import INIT_LINE, trial_config


def full_training_files(cfg) -> tuple[dict, str | None]:
    """The study tuned on the tuning subset (``train_tuning_*``); the final run should train on the
    full training split (``train_*``). Returns ``(changes to the data section, warning or None)``,
    the file names found by the same rule as every command (a converted ``.npy`` wins)."""
    from xclip_jax.data import resolve_file

    data, base = cfg.data, Path(cfg.base_data_dir)
    names = {f"train_{part}": getattr(data, f"train_{part}")
             for part in ("image_embeddings", "text_embeddings", "metadata")}
    if data.synthetic is not None or not all("train_tuning_" in n for n in names.values()):
        return {}, None
    changes = {}
    for key, name in names.items():
        full = name.replace("train_tuning_", "train_")
        try:
            found = resolve_file(base / full) if key != "train_metadata" else base / full
        except UserError:
            continue
        if found.is_file():
            changes[key] = str(found.relative_to(base))
    if len(changes) == 3:
        return changes, None
    return {}, (f"best_config.yaml trains on the tuning subset ({names['train_image_embeddings']} …): no full "
                f"training set train_* was found in {base}; make it with python -m xclip_jax.data split, "
                "or edit the data section of best_config.yaml")


def best_train_config(cfg, trial):
    """The complete training config of the best trial, for a full run on the full data; and a warning
    when the full training set is not there (the config then keeps the tuning subset)."""
    tc = trial_config(cfg, trial.params, trial_number=trial.number, experiment_name=f"{cfg.study_name}_best")
    changes, warning = full_training_files(cfg)
    if changes:
        tc = dataclasses.replace(tc, data=dataclasses.replace(tc.data, **changes))
    training = dataclasses.replace(tc.training, num_epochs=cfg.final_epochs, patience=cfg.final_patience)
    return dataclasses.replace(tc, training=training, output_dir="outputs"), warning


def _starts_from_cca(cfg) -> bool:
    return "init" in cfg.search_space or cfg.fixed.get("init") == "cca"


def baseline_advice(cfg, flags=()) -> tuple[str, bool]:
    """What to change in a tuning config whose best trial lost to a linear baseline: the exact YAML
    that starts heads from the CCA solution (or, when they can already, that trains longer: the
    ``--max-epochs`` flag when ``flags``, the keys given on the command line, hold max_epochs).

    Returns ``(the change, whether the same study can go on with it)``: a new search-space entry
    can join a study, other choices for an entry it has can't (a new study_name then).
    """
    space = cfg.search_space
    heads = list(space["head_type"].choices) if "head_type" in space else [cfg.fixed.get("head_type", HeadSpec().type)]
    if _starts_from_cca(cfg):
        epochs = 2 * cfg.max_epochs
        longer = f"`--max-epochs {epochs}`" if "max_epochs" in flags else f"`max_epochs: {epochs}`"
        return f"train longer: set {longer}, or widen learning_rate's range", True
    if any(h in CCA_HEADS for h in heads):
        return f"start heads from the CCA solution: add `{INIT_LINE}` under search_space", True
    if "head_type" in space:
        choices = ", ".join(map(str, heads + ["linear"]))
        change = (f"start heads from the CCA solution: under search_space set `head_type: {{type: categorical, "
                  f"choices: [{choices}]}}` and add `{INIT_LINE}`")
        return change, False
    return "start heads from the CCA solution: set `head_type: linear` and `init: cca` under fixed", False


def advice_line(cfg, flags=()) -> str:
    """:func:`baseline_advice` in one phrase (with a new study_name where the study can't go on)."""
    change, same_study = baseline_advice(cfg, flags)
    return change if same_study else f"{change}, under a new study_name"


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
        return (f"Trial {t.number} finished with value: {t.value:.4f} (validation R@1) and parameters: "
                f"{t.params}.{tail}")
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


def top_table(top: list[dict], cfg) -> str | None:
    """The study's top trials as a short table of what they are (head, loss, widths, learning rate,
    τ: the trial's full config, fixed values and defaults filled in) and their validation R@1, e.g.::

        top trials (validation R@1; widths output/hidden; τ the initial temperature, ~ learned):
          trial  value   gap     head  loss             widths  learning rate  τ
          #13    0.4400          clip  softmax_infonce  256/512 3.2e-04        0.070~
    """
    if not top:
        return None
    header = ("trial", "value", "gap", "head", "loss", "widths", "learning rate", "τ")
    rows = [header]
    for t in top:
        try:
            tc = trial_config(cfg, t["params"])
        except (ConfigError, ValueError, KeyError):  # a trial of another space (an earlier config's): its values only
            rows.append((f"#{t['number']}", f"{t['value']:.4f}", f"{t['behind_best']:+.3f}", str(t["params"])))
            continue
        m = tc.model
        widths = f"{m.output_dim}/{m.hidden_dim or 'in÷2'}" if m.type in ("clip", "mlp") else str(m.output_dim)
        rows.append((f"#{t['number']}", f"{t['value']:.4f}", f"{t['behind_best']:+.3f}" if t["behind_best"] else "",
                     m.type, tc.loss.type, widths, f"{tc.training.learning_rate:.1e}",
                     f"{tc.loss.temperature:.3f}{'~' if tc.loss.learnable_temp else ''}"))
    width = [max(len(row[i]) for row in rows if len(row) == len(header)) for i in range(len(header))]
    lines = ["  " + "  ".join(cell.ljust(w) if len(row) == len(header) else cell for cell, w in zip(row, width)).rstrip()
             for row in rows]
    return "\n".join(["top trials (validation R@1; widths output/hidden; τ the initial temperature, ~ learned):",
                      *lines])


def outcome_line(cfg, result: dict) -> str:
    """The study's counts at its end: its complete, pruned and failed trials, the trials this run
    stopped and queued again said once (the run that queued them), never again."""
    c, before = result["counts"], result.get("counts_before") or {"retried": 0}
    new = c["retried"] - before["retried"]
    requeued = f" ({new} of them re-queued: interrupted, stale or disk full)" if new else ""
    return (f"study {cfg.study_name}: {c['complete']} complete, {c['pruned']} pruned, {c['fail'] + new} failed"
            f"{requeued} in {result['wall_seconds']:.1f} s; outputs in {cfg.output_dir}")


def against_baselines(best_value: float, baselines) -> dict:
    if not baselines:
        return {}
    top = top_baseline(baselines)
    return {"baselines": [{"name": b["name"], "param": b["param"], "val_r1": b["val"]["r1"],
                           "test_r1": (b.get("test") or {}).get("r1"), "fit_seconds": b["fit_seconds"]}
                          for b in baselines],
            "best_baseline": top["name"], "over_best_baseline": best_value - top["val"]["r1"]}


def report_baselines(best: float | None, baselines: list | None, cfg=None, flags=()) -> None:
    """Print the study's best trial against its best closed-form baseline in one line, e.g. ``best
    trial 0.531, +0.052 over CCA-128 (0.479)`` (and a warning when the baseline is better, with the
    tuning config's change when ``cfg`` is given; ``flags``: the keys given on the command line)."""
    if best is None or not baselines:
        return
    top = top_baseline(baselines)
    print(f"best trial {best:.3f}, {best - top['val']['r1']:+.3f} over {top['name']} ({top['val']['r1']:.3f})")
    if best < top["val"]["r1"]:
        where = "" if cfg is None or (_starts_from_cca(cfg) and "max_epochs" in flags) else "in the tuning config: "
        advice = f"; {where}{advice_line(cfg, flags)}" if cfg is not None else ""
        print(f"warning: the study's best trial ({best:.3f}) is below the linear baseline {top['name']} "
              f"({top['val']['r1']:.3f}); widen the search (learning rate, epochs) or start heads from it "
              f"(head_type linear or siglip with init: cca){advice}", file=sys.stderr)


def tune_command(config_path: str, flags: dict) -> str:
    """``python -m xclip_jax.tune CONFIG`` with the command-line flags ``{key: value}`` (password masked)."""
    words = [config_path] + [w for key, value in flags.items() for w in (f"--{key.replace('_', '-')}", str(value))]
    return f"python -m xclip_jax.tune {mask_secrets(shlex.join(words))}"


def next_step(cfg, config_path: str, result: dict, flags: dict | None = None) -> str | None:
    """The one line that ends a study: the command that trains its best config, or, when a linear
    baseline beat it, what to change first and the command that goes on (None when it was
    interrupted or nothing completed). ``flags``: the keys given on the command line, ``{key: value}``:
    the command keeps them, and a change to one of them is a change of the flag, not of the config."""
    if result.get("interrupted") or result.get("best_value") is None:
        return None
    flags = dict(flags or {})
    train = f"python -m xclip_jax.train {Path(cfg.output_dir) / 'best_config.yaml'}"
    if below_baseline(result["best_value"], result.get("baselines")):
        change, same_study = baseline_advice(cfg, flags)
        where = f"in {config_path}, "
        if _starts_from_cca(cfg) and "max_epochs" in flags:  # the change is the flag's
            flags["max_epochs"], where = 2 * cfg.max_epochs, ""
        if same_study:  # --add-trials and --n-trials are one or the other
            rerun = f"{tune_command(config_path, {k: v for k, v in flags.items() if k != 'n_trials'})} " \
                    f"--add-trials {cfg.n_trials}"
        else:
            rerun = f"{tune_command(config_path, flags)} with a new study_name"
        return f"next: {where}{change}; then {rerun} (or train the best trial anyway: {train})"
    return f"next: {train}   (trains the best configuration on the full data, up to {cfg.final_epochs} epochs)"


def throughput_line(t: dict) -> str:
    """Where this run's time went: the useful fraction and what the rest was spent on."""
    return (f"useful fraction {t['useful_fraction']:.2f} (training {t['train_seconds']:.0f} s of {t['n_jobs']} x "
            f"{t['wall_seconds']:.0f} s; start-up {t['startup_seconds']:.0f} s, compile {t['compile_seconds']:.0f} s, "
            f"evaluation {t['eval_seconds']:.0f} s over {t['trials']} trials)"
            + (f"; {t['rows_per_second']:,.0f} training rows/s" if t.get("rows_per_second") else ""))
