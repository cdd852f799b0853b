"""Search quality: how good a tuning study's best trial is, and how much that varies from seed to seed.

    python scripts/bench.py --search CONFIG [--seeds N | --confirm | --seed-list S ...] [--set KEY=VALUE ...]
        [--label NAME] [--keep DIR] [--out PATH]

Choices are made on the 8 choosing seeds (``CHOOSING_SEEDS``; ``--seeds N`` takes the first N) and
only confirmed afterwards on 3 others (``--confirm``: ``CONFIRMING_SEEDS``): a choice that does not
hold on the confirming seeds is not made (a setting chosen on five seeds once did not hold on three
others). For each sampler seed the study of CONFIG runs once
from scratch, one after another: ``sampler.seed`` set to the seed, the ``--set`` overrides applied
to the config's top-level keys, a fresh SQLite storage, output and checkpoint folders and an empty
persistent compilation cache (so every seed pays the same compiles). Per seed it records the best
trial's val R@1 (``best_results.json``), its checkpoint's test R@1 by the project's own evaluation
(``python -m xclip_jax.evaluate CHECKPOINT --set test``, the ``r1`` of the ``metrics_test.json`` it
writes), the study's wall seconds (the whole command: data, baselines, trials), its trials, and the
best closed-form baseline (from the study; ``python -m xclip_jax.baselines`` once when the config
has ``baselines: false``). Then mean, sample sd, min and max over the seeds, and the margin of the
mean test R@1 over the best baseline's test R@1; a JSON record (a header, then one record per seed
and per summary figure) and a markdown table for benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import bench_report
from bench_machine import cpu_model, gpu_description
from bench_report import HEADER, REPO, fmt, log, record, save
from bench_studies import absolute_data_dir, tune_study


# The sampler seeds settings are compared on, and the seeds that only confirm a choice made on them.
CHOOSING_SEEDS = (0, 1, 2, 3, 4, 5, 6, 7)
CONFIRMING_SEEDS = (100, 101, 102)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The search benchmark's flags, for bench.py's command line."""
    group = parser.add_argument_group("search quality (--search CONFIG)")
    group.add_argument("--search", metavar="CONFIG",
                       help="run the tuning study of CONFIG once per sampler seed from scratch and report the "
                            "best trial's val and test R@1 over the seeds against the best baseline")
    group.add_argument("--seeds", type=int, default=len(CHOOSING_SEEDS), metavar="N",
                       help=f"the first N of the choosing seeds {list(CHOOSING_SEEDS)} (default all)")
    group.add_argument("--confirm", action="store_true",
                       help=f"the confirming seeds {list(CONFIRMING_SEEDS)} instead: run once a choice is made")
    group.add_argument("--seed-list", type=int, nargs="+", metavar="S", help="these sampler seeds instead")
    group.add_argument("--set", dest="overrides", action="append", default=[], type=parse_override,
                       metavar="KEY=VALUE",
                       help="override a top-level key of the tuning config, VALUE in YAML (repeatable), e.g. "
                            "--set batch_trials=4 or --set 'sampler={type: tpe, multivariate: false}'")
    group.add_argument("--label", help="the setting's name in the table (default: the --set overrides)")
    group.add_argument("--keep", metavar="DIR",
                       help="run the studies in DIR and keep them (default: a temporary folder, removed)")


def parse_override(text: str) -> tuple[str, object]:
    """``KEY=VALUE`` as (KEY, VALUE read as YAML)."""
    import yaml

    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
        raise argparse.ArgumentTypeError(f"{text!r}: give KEY=VALUE with a top-level key of the tuning config")
    try:
        return key, yaml.safe_load(value)
    except yaml.YAMLError as e:
        raise argparse.ArgumentTypeError(f"{text!r}: VALUE is not YAML ({str(e).splitlines()[0]})") from None


def study_config(config: Path, overrides: list[tuple[str, object]], seed: int) -> dict:
    """The tuning config of one seed: CONFIG with the overrides and ``sampler.seed``."""
    import yaml

    raw = yaml.safe_load(config.read_text()) or {}
    raw.update(overrides)
    raw["sampler"] = {**(raw.get("sampler") or {}), "seed": seed}
    return absolute_data_dir(raw)


def check_config(raw: dict) -> str | None:
    """The tuner's own error for ``raw`` (one line), or None when it loads: a bad ``--set`` fails
    here, before the first study."""
    import yaml

    from xclip_jax.errors import UserError
    from xclip_jax.tune_config import load_tune_config

    with tempfile.TemporaryDirectory(prefix="xclip_bench_check_") as folder:
        path = Path(folder) / "study.yaml"
        path.write_text(yaml.safe_dump(raw, sort_keys=False))
        try:
            load_tune_config(path)
        except UserError as e:
            return str(e).replace(f"{path}: ", "")
    return None


def _python(module: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          check=False)


def _last_line(text: str) -> str:
    return (text.strip().splitlines() or [""])[-1]


def evaluate_test_r1(checkpoint: Path, cwd: Path) -> tuple[float | None, str | None, str | None]:
    """``python -m xclip_jax.evaluate CHECKPOINT --set test``: (the ``r1`` of the metrics file it
    wrote, that file, None) or (None, None, its error line)."""
    out = _python("xclip_jax.evaluate", str(checkpoint), "--set", "test", cwd=cwd)
    if out.returncode != 0:
        return None, None, _last_line(out.stderr)
    written = next((ln[len("wrote "):] for ln in out.stdout.splitlines() if ln.startswith("wrote ")), None)
    if written is None:
        return None, None, "python -m xclip_jax.evaluate named no metrics file"
    return json.loads(Path(written).read_text())["r1"], written, None


def _best_baseline(baselines) -> dict | None:
    """The baseline with the best val R@1 (as the study picks it), as {name, val_r1, test_r1}."""
    if not baselines:
        return None
    top = max(baselines, key=lambda b: b["val"]["r1"] if "val" in b else b["val_r1"])
    if "val" in top:  # python -m xclip_jax.baselines' records
        return {"name": top["name"], "val_r1": top["val"]["r1"], "test_r1": (top.get("test") or {}).get("r1")}
    return {"name": top["name"], "val_r1": top["val_r1"], "test_r1": top.get("test_r1")}


def run_seed(raw: dict, seed: int, run_dir: Path, timeout: float | None) -> dict:
    """One study from scratch, and its best trial's test R@1."""
    result = {"seed": seed}
    try:
        wall, rc, stderr = tune_study(raw, run_dir, run_dir / "jax_cache", timeout)
    except subprocess.TimeoutExpired:
        return {**result, "error": f"the study timed out after {timeout} s"}
    result["wall_seconds"] = round(wall, 2)
    if rc != 0:
        return {**result, "error": _last_line(stderr) or f"python -m xclip_jax.tune exited {rc}"}
    out = run_dir / "out"
    summary = json.loads((out / "study_summary.json").read_text())
    best = json.loads((out / "best_results.json").read_text()) if (out / "best_results.json").exists() else {}
    counts = best.get("counts") or {k.lower(): v for k, v in summary["counts"].items()}
    result.update(trials=sum(counts.get(k, 0) for k in ("complete", "pruned", "fail")), counts=counts,
                  best_trial=best.get("best_trial"), val_r1=best.get("best_value"), test_r1=None,
                  best_params=best.get("best_params"),
                  backend=(best.get("user_attrs") or {}).get("jax_backend"),
                  useful_fraction=(summary.get("throughput") or {}).get("useful_fraction"),
                  programs_compiled=(summary.get("throughput") or {}).get("programs_compiled"),
                  baseline=_best_baseline(best.get("baselines")))
    if not best:
        return {**result, "error": "no trial completed"}
    checkpoint = Path(best["checkpoint"])
    result["test_r1"], result["metrics_file"], error = evaluate_test_r1(checkpoint, run_dir)
    if error:
        result["error"] = f"evaluate {checkpoint}: {error}"
    pick = best.get("final_pick") or {}
    if pick.get("procedure") == "rerun":  # what the best single run would have handed over, beside it
        single = pick["best_single_run"]
        result["final_pick"] = {"picked": pick["picked"], "best_single_run": single, "seconds": pick.get("seconds"),
                                "candidates": pick["candidates"]}
        result["best_single_test_r1"] = result["test_r1"] if single == pick["picked"] else evaluate_test_r1(
            checkpoint.parent / f"{single:05d}", run_dir)[0]
    return result


def baselines_once(raw: dict, folder: Path) -> dict | None:
    """``python -m xclip_jax.baselines`` on the study's data, for a config with ``baselines: false``."""
    import yaml

    folder.mkdir(parents=True, exist_ok=True)
    config = folder / "baselines.yaml"
    config.write_text(yaml.safe_dump(raw, sort_keys=False))
    log("the config has baselines off: python -m xclip_jax.baselines once")
    out = _python("xclip_jax.baselines", str(config), "--out", str(folder / "baselines.json"), cwd=folder)
    if out.returncode != 0:
        log(f"python -m xclip_jax.baselines failed: {_last_line(out.stderr)}")
        return None
    return _best_baseline(json.loads((folder / "baselines.json").read_text()))


def spread(values) -> dict:
    """Mean, sample sd (None below two values), min and max of the values that are not None."""
    v = [x for x in values if x is not None]
    if not v:
        return {"n": 0, "mean": None, "sd": None, "min": None, "max": None}
    return {"n": len(v), "mean": statistics.fmean(v), "sd": statistics.stdev(v) if len(v) > 1 else None,
            "min": min(v), "max": max(v)}


def markdown(label: str, runs: list[dict], stats: dict, baseline: dict | None, margin) -> str:
    """One row per seed, then the mean ± sd, min and max over the seeds, and the best baseline."""
    lines = ["| setting | seed | best val R@1 | test R@1 | wall s | trials (complete/pruned/failed) | best trial |",
             "|---|---|---:|---:|---:|---|---:|"]
    for r in runs:
        c = r.get("counts") or {}
        trials = f"{r['trials']} ({c.get('complete')}/{c.get('pruned')}/{c.get('fail')})" if "trials" in r else "—"
        note = f" ({r['error']})" if r.get("error") else ""
        lines.append(f"| {label} | {r['seed']} | {fmt(r.get('val_r1'), '.4f')} | {fmt(r.get('test_r1'), '.4f')}{note} "
                     f"| {fmt(r.get('wall_seconds'), '.1f')} | {trials} | {fmt(r.get('best_trial'), 'd')} |")
    val, test, wall = stats["val_r1"], stats["test_r1"], stats["wall_seconds"]
    seeds = f"{test['n']} seed{'s' if test['n'] != 1 else ''}"
    lines.append(f"| {label} | mean ± sd ({seeds}) | {fmt(val['mean'], '.4f')} ± {fmt(val['sd'], '.4f')} "
                 f"| **{fmt(test['mean'], '.4f')}** ± {fmt(test['sd'], '.4f')} | {fmt(wall['mean'], '.1f')} ± "
                 f"{fmt(wall['sd'], '.1f')} | | |")
    for what in ("min", "max"):
        lines.append(f"| {label} | {what} | {fmt(val[what], '.4f')} | {fmt(test[what], '.4f')} "
                     f"| {fmt(wall[what], '.1f')} | | |")
    if baseline:
        lines.append(f"| best baseline: {baseline['name']} | | {fmt(baseline['val_r1'], '.4f')} "
                     f"| {fmt(baseline['test_r1'], '.4f')} | | | |")
        lines.append("")
        lines.append(f"Mean test R@1 over the best baseline's ({baseline['name']}): {fmt(margin, '+.4f')}.")
    else:
        lines.append("")
        lines.append("No baseline: the study recorded none and python -m xclip_jax.baselines did not run.")
    return "\n".join(lines)


def default_out(config: Path, label: str | None) -> Path:
    """``benchmarks/search-<config stem>[-<label>]-<date>.json``, never one that exists."""
    slug = re.sub(r"[^A-Za-z0-9_.]+", "-", label).strip("-") if label else ""
    stem = "-".join(p for p in ("search", config.stem, slug, datetime.date.today().isoformat()) if p)
    out, n = REPO / "benchmarks" / f"{stem}.json", 2
    while out.exists():
        out, n = REPO / "benchmarks" / f"{stem}-{n}.json", n + 1
    return out


def main(args) -> int:
    """The search benchmark of bench.py's parsed ``args``; 2 on a bad config or ``--set``."""
    config = Path(args.search).absolute()
    if not config.is_file():
        print(f"error: --search {args.search}: no such file", file=sys.stderr)
        return 2
    seeds = args.seed_list or list(CONFIRMING_SEEDS if args.confirm else CHOOSING_SEEDS[:args.seeds])
    if not seeds:
        print("error: --seeds N: give N >= 1", file=sys.stderr)
        return 2
    label = args.label or (", ".join(f"{k}={json.dumps(v)}" for k, v in args.overrides) or "as configured")
    problem = check_config(study_config(config, args.overrides, seeds[0]))
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    work = Path(args.keep).absolute() if args.keep else Path(tempfile.mkdtemp(prefix="xclip_bench_search_"))
    work.mkdir(parents=True, exist_ok=True)

    bench_report.open_record(Path(args.out) if args.out else default_out(config, args.label))
    HEADER.update({
        "name": "header", "mode": "search", "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "config": os.path.relpath(config, REPO),  # as run from the project root: no path of this machine
        "label": label, "overrides": dict(args.overrides), "seeds": seeds,
        "machine": gpu_description() or cpu_model(), "cpu_model": cpu_model(), "gpu": gpu_description(),
        "cpu_count": os.cpu_count(), "python": platform.python_version(), "hostname": platform.node(),
        "argv": sys.argv[1:], "study_timeout": args.study_timeout,
        "compile_cache": "empty per seed (every seed pays the same compiles)",
        "loadavg_start": [round(x, 2) for x in os.getloadavg()], "complete": False,
    })
    save()
    runs = []
    try:
        for seed in seeds:
            raw = study_config(config, args.overrides, seed)
            run_dir = work / f"seed_{seed}"
            if run_dir.exists():
                shutil.rmtree(run_dir)
            log(f"search {label}: seed {seed} ({len(runs) + 1} of {len(seeds)}), in {run_dir}")
            r = run_seed(raw, seed, run_dir, args.study_timeout)
            if not args.keep:
                shutil.rmtree(run_dir, ignore_errors=True)
            r.pop("metrics_file", None)  # a path in the study's folder; its figure is test_r1
            runs.append(r)
            record("search/seed", r.get("test_r1"), "R@1", label=label, **r)
            save()
            log(f"seed {seed}: best val R@1 {fmt(r.get('val_r1'), '.4f')}, test R@1 {fmt(r.get('test_r1'), '.4f')}, "
                f"{fmt(r.get('wall_seconds'), '.1f')} s, {r.get('trials')} trials"
                + (f"; {r['error']}" if r.get("error") else ""))

        baseline = next((r["baseline"] for r in runs if r.get("baseline")), None)
        source = "the studies' best_results.json"
        if baseline is None and any("trials" in r for r in runs):
            baseline, source = baselines_once(study_config(config, args.overrides, seeds[0]), work / "baselines"), \
                "python -m xclip_jax.baselines"
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    stats = {key: spread(r.get(key) for r in runs)
             for key in ("test_r1", "val_r1", "wall_seconds", "best_single_test_r1")}
    for key, s in stats.items():
        record(f"search/{key}", s["mean"], "s" if key == "wall_seconds" else "R@1", label=label, **s)
    margin = None
    if baseline:
        record("search/best_baseline", baseline["test_r1"], "R@1", baseline=baseline["name"],
               val_r1=baseline["val_r1"], test_r1=baseline["test_r1"], source=source)
        if stats["test_r1"]["mean"] is not None and baseline["test_r1"] is not None:
            margin = stats["test_r1"]["mean"] - baseline["test_r1"]
        record("search/margin_over_best_baseline", margin, "R@1", label=label, baseline=baseline["name"],
               note="mean test R@1 over the seeds - the best baseline's test R@1 (the baseline with the best val R@1)",
               val_margin=(None if stats["val_r1"]["mean"] is None
                           else stats["val_r1"]["mean"] - baseline["val_r1"]))
    HEADER["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    HEADER["complete"] = True
    save()
    print(markdown(label, runs, stats, baseline, margin))
    print(f"\nrecords in {bench_report.OUT_PATH}")
    return 0 if all("error" not in r for r in runs) else 1
