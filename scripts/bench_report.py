"""The bench run's record and what it prints: the JSON file (a header record describing the machine
and the run, then one record per figure: name, params, value, unit), rewritten after every section
so that a killed run keeps what it measured; the log line on stderr; and the markdown table printed
at the end. Every bench module records through ``record`` and ``log`` here.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

RECORDS: list[dict] = []
HEADER: dict = {}
OUT_PATH: Path | None = None


def open_record(path) -> None:
    """Where ``save`` writes the header and the records."""
    global OUT_PATH
    OUT_PATH = Path(path)


def save() -> None:
    """Write the header and the records so far (called after every section: a killed run keeps them)."""
    if OUT_PATH is None:
        return
    OUT_PATH.parent.mkdir(parents=True, exist_ok=True)
    tmp = OUT_PATH.with_suffix(OUT_PATH.suffix + ".tmp")
    tmp.write_text(json.dumps([HEADER] + RECORDS, indent=2, default=str) + "\n")
    tmp.replace(OUT_PATH)


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def record(name: str, value, unit: str, **params) -> dict:
    rec = {"name": name, "params": params, "value": value, "unit": unit}
    RECORDS.append(rec)
    return rec


def fmt(x, spec=".2f"):
    return "—" if x is None else format(x, spec)


def markdown(header: dict, train: list[dict], peak: dict, metrics_s, startup, study, args) -> str:
    lines = []
    lines.append(f"Machine: {header['machine']}; backend {header['platform']}, {header['cpu_count']} CPUs, "
                 f"jax {header['jax_version']}; load average at start {header['loadavg_start']}, "
                 f"end {header['loadavg_end']}.")
    lines.append(f"Mode: {'quick' if args.quick else 'full'}; {header['rows']:,} synthetic rows "
                 f"({header['image_dim']}/{header['text_dim']} dims), dtype {args.dtype}, dropout {args.dropout}, "
                 f"median of {args.repeats} timed epoch(s) after 1 warm-up epoch.")
    lines.append("")
    lines.append("| measure | value |")
    lines.append("|---|---|")
    for k, v in peak.items():
        lines.append(f"| matmul peak {k} (n={args.peak_n}; jnp.dot, best sample) | {v:,.1f} GFLOP/s |")
    blas = next((r for r in RECORDS if r["name"] == "matmul_peak/numpy_blas_float32"), None)
    if blas:
        lines.append(f"| reference: numpy BLAS sgemm float32 (n={args.peak_n}) | {blas['value']:,.1f} GFLOP/s |")
    if metrics_s is not None:
        lines.append(f"| validation metrics 5,000 × 25,000 | {metrics_s:.3f} s |")
    if startup:
        for label in ("cold", "warm"):
            r = startup[label]
            lines.append(f"| trial process start → first step (epoch done), {label} cache | "
                         f"{r['spawn_to_first_step']:.2f} s ({r['spawn_to_first_epoch']:.2f} s): interpreter "
                         f"{r['interpreter']:.2f}, import {r['import']:.2f}, data {r['data']:.2f}, "
                         f"state {r['state']:.2f}, compile {r['compile']:.2f}, epoch {r['first_epoch']:.2f}; "
                         f"process wall {r['process_wall']:.2f} |")
    for label, r in (study or {}).items():
        if not r:
            lines.append(f"| study, {label} | failed (see the JSON records) |")
            continue
        c, t = r["counts"], r["throughput"]
        lines.append(f"| study ({args.study_config}), {label} | {r['wall']:.1f} s ({c.get('complete')} complete, "
                     f"{c.get('pruned')} pruned, {c.get('fail')} failed; best {fmt(r['best_value'], '.4f')}); useful "
                     f"fraction {fmt(t.get('useful_fraction'))}: training {fmt(t.get('train_seconds'), '.0f')} s, "
                     f"start-up {fmt(t.get('startup_seconds'), '.0f')} s, compile {fmt(t.get('compile_seconds'), '.0f')} "
                     f"s, evaluation {fmt(t.get('eval_seconds'), '.0f')} s; {t.get('programs_compiled')} programs, "
                     f"{t.get('compile_cache_hits')} from the persistent cache"
                     + (f"; {r['over_best_baseline']:+.4f} over {r['best_baseline']}, reached within the first "
                        f"{r.get('trials_to_baseline')} trials" if r.get("best_baseline") else "") + " |")
    for rec in (r for r in RECORDS if r["name"].startswith("study_speedup/")):
        lines.append(f"| study speed-up of warm runners over one process per trial, "
                     f"{rec['name'].split('/', 1)[1]} | {rec['value']:.2f}× |")
    for rec in (r for r in RECORDS if r["name"].startswith("bundles/")):
        what = "trials per minute" if "trials_per_minute" in rec["name"] else f"study speed-up over batch_trials {args.batch_trials[0]}"
        lines.append(f"| {what}, {rec['name'].rsplit('/', 1)[1]} | {rec['value']:.2f} |")
    lines.append("")
    if train:
        peak_name = "bfloat16" if args.dtype == "bfloat16" else "float32"
        lines.append(f"Training ({peak_name}; fraction of the measured {peak_name} matmul peak, FLOPs as counted "
                     "by XLA's cost analysis; matmul-only analytic fraction beside it):")
        lines.append("")
        lines.append("| head + loss | batch | epoch s | rows/s | GFLOP/epoch (XLA) | GFLOP/s | % of peak (XLA) "
                     "| % of peak (matmul-only) | % of numpy BLAS | compile s |")
        lines.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for r in train:
            gflop = r["flops"] / 1e9 if r["flops"] else None
            lines.append(f"| {r['name']} | {r['batch']} | {r['epoch_s']:.3f} | {r['rows_s']:,.0f} | {fmt(gflop, ',.1f')} "
                         f"| {fmt(r['gflops'], ',.1f')} | {fmt(None if r['frac'] is None else 100 * r['frac'], '.1f')} "
                         f"| {100 * r['analytic_frac']:.1f} | {fmt(100 * r['blas_frac'] if r.get('blas_frac') else None, '.1f')} "
                         f"| {r['compile_s']:.1f} |")
    return "\n".join(lines)
