"""Tuning studies for the benches: one run of ``python -m xclip_jax.tune`` from a fresh storage,
output folder and compilation cache (``tune_study``), one study's figures (``_run_study``: its wall
time, counts, best value, margin over the best baseline and where the time went), and the
comparisons made of it: one process per trial against warm runners
(``bench_study``), ``batch_trials`` K against K (``bench_batch_trials``), ``init`` default against
cca (``bench_init_cca``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_report import REPO, log, record

STUDY_MODES = {"per-trial processes": 1, "warm runners": None}  # runner_max_trials (None: the config's)


def absolute_data_dir(raw: dict) -> dict:
    """``raw`` with its ``base_data_dir`` made absolute as the tuner reads it (relative to the current
    folder; ``data`` when unset), so that the study, run elsewhere, and the trial checkpoints' configs
    name the same files. A synthetic set names no files and is left as it is."""
    data = raw.get("data")
    if isinstance(data, dict) and data.get("synthetic") is not None and "base_data_dir" not in raw:
        return raw
    return {**raw, "base_data_dir": str(Path(raw.get("base_data_dir") or "data").absolute())}


def tune_study(raw: dict, run_dir: Path, cache: Path, timeout: float | None) -> tuple[float, int, str]:
    """``python -m xclip_jax.tune`` on the config ``raw`` (written to ``run_dir/study.yaml``) with a
    fresh SQLite storage (``run_dir/s.db``), output folder (``run_dir/out``) and checkpoint folder
    (``run_dir/ckpt``), ``cache`` as its persistent compilation cache, its output in
    ``run_dir/tune.log``. Returns (wall seconds, exit status, the end of its stderr); raises
    ``subprocess.TimeoutExpired`` after ``timeout`` seconds (None: no limit)."""
    import yaml

    run_dir.mkdir(parents=True)
    cfg_path = run_dir / "study.yaml"
    cfg_path.write_text(yaml.safe_dump(absolute_data_dir(raw), sort_keys=False))
    env = dict(os.environ)
    env["XCLIP_JAX_CACHE"] = str(cache)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    cmd = [sys.executable, "-m", "xclip_jax.tune", str(cfg_path), "--no-progress", "--output-dir", str(run_dir / "out"),
           "--checkpoint-dir", str(run_dir / "ckpt"), "--storage", f"sqlite:///{run_dir}/s.db"]
    t0 = time.perf_counter()
    with open(run_dir / "tune.log", "w") as out, open(run_dir / "tune.err", "w+") as err:
        rc = subprocess.run(cmd, cwd=run_dir, env=env, stdout=out, stderr=err, timeout=timeout, check=False).returncode
        err.seek(0)
        tail = err.read()[-1500:]
    return time.perf_counter() - t0, rc, tail


def _run_study(config: Path, tmp: Path, label: str, cache: Path, runner_max_trials, timeout: float,
               **overrides) -> dict | None:
    """One tuning study in a fresh storage and output folder; its wall time and where the time went.
    ``overrides`` replace top-level keys of the config (e.g. ``batch_trials=4``)."""
    import yaml

    raw = yaml.safe_load(config.read_text())
    if runner_max_trials is not None:
        raw["runner_max_trials"] = runner_max_trials
    raw.update(overrides)
    run_dir = tmp / label.replace(" ", "_")
    try:
        wall, rc, stderr = tune_study(raw, run_dir, cache, timeout)
    except subprocess.TimeoutExpired:
        record(f"study/{label}", None, "s", error=f"timed out after {timeout} s")
        return None
    if rc != 0:
        record(f"study/{label}", None, "s", error=stderr[-1500:])
        log(f"study {label} failed: {stderr[-500:]}")
        return None
    summary = json.loads((run_dir / "out" / "study_summary.json").read_text())
    best = json.loads((run_dir / "out" / "best_results.json").read_text())
    result = {"wall": wall, "counts": best.get("counts", {}), "best_value": best.get("best_value"),
              "throughput": summary.get("throughput") or {}, "best_baseline": best.get("best_baseline"),
              "over_best_baseline": best.get("over_best_baseline")}
    if best.get("best_baseline"):
        # Trials (in number order) until one finished at or above the best baseline's val r1.
        floor = best["best_value"] - best["over_best_baseline"]
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        trials = optuna.load_study(study_name=None, storage=f"sqlite:///{run_dir}/s.db").trials
        result["trials_to_baseline"] = next((t.number + 1 for t in trials
                                             if t.value is not None and t.value >= floor), None)
    record(f"study/{label}", round(wall, 2), "s", config=str(config.relative_to(REPO) if config.is_relative_to(REPO)
                                                              else config),
           runner_max_trials=raw.get("runner_max_trials"), batch_trials=raw.get("batch_trials", 1),
           n_trials=raw.get("n_trials"), counts=result["counts"], best_value=result["best_value"],
           best_baseline=result["best_baseline"], over_best_baseline=result["over_best_baseline"],
           trials_to_baseline=result.get("trials_to_baseline"), fixed=raw.get("fixed"),
           throughput=result["throughput"], cpu_count=os.cpu_count())
    t = result["throughput"]
    log(f"study {label}: {wall:.1f} s, useful fraction {t.get('useful_fraction')}, best {result['best_value']}")
    return result


def bench_study(timeout: float, config: Path) -> dict:
    """The study in each mode (one process per trial; warm runners), each from an empty persistent
    compilation cache of its own and then again on that (now warm) cache: four studies in one run,
    and the ratios of their wall times."""
    results = {}
    with tempfile.TemporaryDirectory(prefix="xclip_bench_study_") as tmp:
        tmp = Path(tmp)
        for cache_state in ("cold", "warm"):
            for mode, max_trials in STUDY_MODES.items():
                label = f"{mode}, {cache_state} cache"
                results[label] = _run_study(config, tmp / cache_state, label, tmp / f"cache_{mode.split()[0]}",
                                            max_trials, timeout)
    for cache_state in ("cold", "warm"):
        per, warm = (results.get(f"{mode}, {cache_state} cache") for mode in STUDY_MODES)
        if per and warm:
            record(f"study_speedup/{cache_state} cache", round(per["wall"] / warm["wall"], 2), "x",
                   note="wall of one process per trial / wall of warm runners, same config, this run")
    return results


def bench_batch_trials(ks: list[int], timeout: float, config: Path) -> dict:
    """The study once per ``batch_trials`` K (warm runners, each from an empty compilation cache of
    its own), in one run: wall, trials per minute and best value side by side, and each K's wall
    against the first K's."""
    results = {}
    with tempfile.TemporaryDirectory(prefix="xclip_bench_bundles_") as tmp:
        tmp = Path(tmp)
        for k in ks:
            label = f"batch_trials {k}"
            results[k] = r = _run_study(config, tmp, label, tmp / f"cache_k{k}", None, timeout, batch_trials=k)
            if r:
                finished = sum(r["counts"].get(state, 0) for state in ("complete", "pruned"))
                record(f"bundles/trials_per_minute/K={k}", round(60 * finished / r["wall"], 2), "trials/min",
                       best_value=r["best_value"], wall=round(r["wall"], 2))
    first = results.get(ks[0])
    for k in ks[1:]:
        if first and results.get(k):
            record(f"bundles/speedup/K={k}", round(first["wall"] / results[k]["wall"], 2), "x",
                   note=f"wall at batch_trials {ks[0]} / wall at batch_trials {k}, same config, this run")
    return results


def bench_init_cca(timeout: float, config: Path) -> dict:
    """The study with ``fixed.init`` default and cca, in one run: best value, margin over the best
    baseline and trials until a trial reached it, side by side."""
    import yaml

    fixed = yaml.safe_load(config.read_text()).get("fixed") or {}
    results = {}
    with tempfile.TemporaryDirectory(prefix="xclip_bench_init_") as tmp:
        tmp = Path(tmp)
        for init in ("default", "cca"):
            label = f"init {init}"
            results[label] = _run_study(config, tmp, label, tmp / f"cache_{init}", None, timeout,
                                        fixed={**fixed, "init": init})
    return results
