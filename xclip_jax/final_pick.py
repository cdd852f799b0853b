"""The study's final pick: which configuration it hands over.

``final_pick: best`` hands over the trial with the best validation R@1, one run of one seed, whose
neighbours are often within that seed's noise of it. ``final_pick: rerun`` trains the top
``final_pick_trials`` complete trials again with ``final_pick_seeds`` fresh seeds each (runs of
one program key train in bundles of the memory plan's member count) and hands over the one whose fresh runs have the best mean:
a configuration that is good, not a run that was lucky. Every candidate's figures are kept with
the study (``FINAL_PICK_ATTR``) and written to ``best_results.json``. Plain Python (no jax): the
driver plans the runs and reads their results; a runner trains them (``Runner.run_reruns``).
"""

from __future__ import annotations

import statistics
import time

import numpy as np
import optuna
from optuna.trial import TrialState

from xclip_jax.padding import program_key, study_buckets
from xclip_jax.spec import RunSpec, key_seed
from xclip_jax.tune_config import TuneConfig, trial_config

FINAL_PICK_ATTR = "xclip_final_pick"
FINAL_PICKS = ("best", "rerun")


def candidates(study: optuna.Study, cfg: TuneConfig) -> list:
    """The complete trials the final pick chooses among, best value first (none below two)."""
    complete = sorted(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)), key=lambda t: -t.value)
    top = complete[:cfg.final_pick_trials]
    return top if len(top) >= 2 else []


def rerun_seed(seed: int, number: int, run: int) -> int:
    """The seed of trial ``number``'s fresh run ``run`` in a study seeded ``seed`` (never the trial's own)."""
    return int(np.random.SeedSequence([key_seed(seed), number, run + 1, 7]).generate_state(1)[0])


def plan(study: optuna.Study, cfg: TuneConfig, dims: tuple[int, int], members=None) -> list[list[list[int]]]:
    """The final pick's runs as jobs: ``[[[trial number, seed], ...], ...]``, the runs of one program
    key in bundles of at most ``members(key)`` (the memory plan's: ``Plan.members``; default one);
    none unless ``final_pick: rerun`` and two trials completed."""
    if cfg.final_pick != "rerun":
        return []
    buckets, runs = study_buckets(cfg), {}
    for t in candidates(study, cfg):
        key = program_key(RunSpec.of(trial_config(cfg, t.params), *dims), buckets)
        runs.setdefault(key, []).extend([t.number, rerun_seed(cfg.sampler.seed, t.number, i)]
                                        for i in range(cfg.final_pick_seeds))
    size = {key: max(1, members(key) if members else 1) for key in runs}
    return [key_runs[i:i + size[key]] for key, key_runs in runs.items() for i in range(0, len(key_runs), size[key])]


def record(study: optuna.Study, cfg: TuneConfig, runs: list[dict], seconds: float = 0.0) -> dict | None:
    """Pick from the finished runs (``Runner.run_reruns``' records) and keep every candidate's figures
    with the study: its own value, each fresh run's, their mean and sd. A run that did not finish
    (lost, or diverged before a finite epoch) counts as R@1 0: a configuration that fails must not
    win. Returns the record (None when there are no candidates)."""
    chosen = candidates(study, cfg)
    if not chosen:
        return None
    rows = []
    for t in chosen:
        mine = [r for r in runs if r["number"] == t.number]
        values = [r["value"] if r["value"] is not None else 0.0 for r in mine]
        values += [0.0] * (cfg.final_pick_seeds - len(values))
        rows.append({"number": t.number, "value": t.value,
                     "runs": [{"seed": r["seed"], "value": r["value"]} for r in mine], "mean": statistics.fmean(values),
                     "sd": statistics.stdev(values) if len(values) > 1 else 0.0})
    picked = max(rows, key=lambda row: row["mean"])
    result = {"procedure": "rerun", "trials": len(rows), "seeds": cfg.final_pick_seeds, "candidates": rows,
              "picked": picked["number"], "best_single_run": chosen[0].number, "seconds": round(seconds, 2)}
    study.set_user_attr(FINAL_PICK_ATTR, result)
    return result


def picked_trial(study: optuna.Study):
    """The trial the study hands over: the final pick's, when one was made, else the best value's.
    Raises ValueError when no trial completed (as ``study.best_trial``)."""
    pick = study.user_attrs.get(FINAL_PICK_ATTR)
    if pick:
        trial = study.trials[pick["picked"]]
        if trial.state == TrialState.COMPLETE:
            return trial
    return study.best_trial


def pick_line(pick: dict | None) -> str | None:
    """The final pick in one line, e.g. ``final pick: trial 12 (mean val R@1 0.451 over 2 fresh runs;
    trial 9, the best single run, 0.447)``."""
    if not pick:
        return None
    rows = {row["number"]: row for row in pick["candidates"]}
    chosen, single = rows[pick["picked"]], rows[pick["best_single_run"]]
    same = pick["picked"] == pick["best_single_run"]
    tail = "the best single run too" if same else (f"trial {single['number']}, the best single run, "
                                                  f"{single['mean']:.3f}")
    return (f"final pick: trial {chosen['number']} (mean val R@1 {chosen['mean']:.3f} over {pick['seeds']} fresh "
            f"runs; {tail})")


def run(pool, study: optuna.Study, cfg: TuneConfig, dims: tuple[int, int], logs, stop: list, say,
        members=None) -> dict | None:
    """The final pick's runs on the driver's pool (one job per bundle of ``plan``, as the pool has room) and
    the pick recorded with the study. A lost job's runs count as failed; a non-empty ``stop`` (Ctrl-C)
    raises KeyboardInterrupt, and the study keeps its best-value pick."""
    start = time.perf_counter()
    jobs = [(f"final_pick_{i}", runs) for i, runs in enumerate(plan(study, cfg, dims, members))]
    if not jobs:
        return None
    runs, pending = [], {}
    say(f"final pick: training the top {len(candidates(study, cfg))} trials again with {cfg.final_pick_seeds} fresh "
        f"seeds each ({sum(len(m) for _, m in jobs)} runs)")
    while jobs or pending:
        if stop:
            raise KeyboardInterrupt
        while jobs and pool.has_room():
            name, bundle = jobs.pop(0)
            pending[name] = bundle
            pool.submit(name, {"rerun": bundle}, logs / f"{name}.log")
        for event in pool.poll():
            bundle = pending.pop(event.job, None)
            if bundle is not None and event.kind == "done":
                runs += event.result.get("reruns", [])
            elif bundle is not None:
                say(f"final pick: the runs of trials {sorted({n for n, _ in bundle})} were lost ({event.reason}); "
                    "they count as failed")
        time.sleep(0.2)
    return record(study, cfg, runs, time.perf_counter() - start)
