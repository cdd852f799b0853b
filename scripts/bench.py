#!/usr/bin/env python
"""xclip_jax benchmark: one process, one run, every figure a ratio on this machine at this moment.

    python scripts/bench.py [--quick] [--coco] [--dtype bfloat16] [--skip-study | --study] [--out PATH]
    python scripts/bench.py --search CONFIG [--seeds N] [--set KEY=VALUE ...] [--label NAME]   (see bench_search)

Measures, in order:

1. The machine's matmul peak: a large square ``jnp.dot`` (median of several timed runs after a
   warm-up), GFLOP/s = 2 n^3 / t, in float32 (and bfloat16 on a GPU or with ``--dtype bfloat16``).
   On a GPU the float32 peak uses JAX's default matmul precision, which is what training uses
   (TF32 on recent NVIDIA cards); the strict ``Precision.HIGHEST`` figure is recorded beside it.
2. Training throughput for each head x loss (siglip+sigmoid, clip+softmax, mlp+softmax,
   attention+softmax (8 heads, 1 layer), mlp+queue (4096)) at batch 2048 and 4096, output 512,
   hidden 1024, on a 100,000-row synthetic set (image 768 / text 1024 dims; ``--coco``: 1152 / 4096):
   the epoch time of ``run_epoch`` (its ahead-of-time compiled program; median of the timed
   epochs after one warm-up epoch), rows/s, the model FLOPs of an epoch as XLA's cost analysis
   counts them, and the achieved fraction of the measured peak.
3. Validation metrics: ``retrieval_metrics_indexed`` on 5,000 images x 25,000 captions (random
   unit vectors of dim 512).
4. Trial start-up: a fresh process that imports ``xclip_jax.step``, builds the quickstart data and
   state (image 256, text 384, clip head 256->128, batch 512, 15,000 rows) and runs its first
   epoch, with an empty persistent compilation cache (cold) and again with the same cache (warm).
5. A tuning study (``--study-config``, default the quickstart) four times in the one run: with one
   process per trial and with warm runners, each from an empty persistent compilation cache and then
   on that warm cache; each study's wall time, useful fraction (training seconds / (n_jobs x wall))
   and where the rest went, and the speed-up of runners over per-trial processes.

Writes ``benchmarks/latest.json`` (a header record describing the machine, then one record per
figure: name, params, value, unit) and prints a markdown table.

The sections live beside this file: ``bench_machine`` (machine description, matmul peak, FLOP
count), ``bench_training`` (training throughput, validation metrics), ``bench_startup`` (trial
start-up), ``bench_studies`` (tuning studies), ``bench_report`` (the JSON record, the markdown
table) and ``bench_search`` (``--search CONFIG``: search quality over sampler seeds, its own run);
this file holds the command line and the order of the run.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time
from pathlib import Path

import bench_report
from bench_report import HEADER, REPO, log, markdown, record, save

if str(REPO) not in sys.path:  # importable without installing (the device runs from the checkout)
    sys.path.insert(0, str(REPO))

import bench_search
import jax
import jax.numpy as jnp
from bench_machine import PeakMeter, cpu_model, gpu_description, numpy_sgemm_gflops
from bench_startup import bench_trial_startup
from bench_studies import bench_batch_trials, bench_init_cca, bench_study
from bench_training import COMBOS, bench_metrics, bench_training, make_data


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="batch 2048 only, 50,000 rows, 1 timed epoch, fewer repeats (< 5 min on 2 CPU cores)")
    parser.add_argument("--coco", action="store_true", help="COCO dims: image 1152, text 4096")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="HeadSpec.dtype (bfloat16: mixed precision, compared with the bf16 peak)")
    parser.add_argument("--rows", type=int, help="synthetic rows (default 100,000; quick 50,000)")
    parser.add_argument("--batches", type=int, nargs="+", help="batch sizes (default 2048 4096; quick 2048)")
    parser.add_argument("--repeats", type=int, help="timed epochs per combo (default 3; quick 1)")
    parser.add_argument("--output-dim", type=int, default=512)
    parser.add_argument("--hidden-dim", type=int, default=1024)
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--peak-n", type=int, help="matmul size for the peak (default 4096 CPU, 8192 GPU)")
    parser.add_argument("--peak-recheck", type=int, default=3,
                        help="timed matmuls re-sampling the peak after each combo")
    parser.add_argument("--combos", nargs="+", help="subset of head+loss names, e.g. clip+softmax_infonce")
    study_group = parser.add_mutually_exclusive_group()
    study_group.add_argument("--skip-study", action="store_true", help="omit the quickstart tuning study")
    study_group.add_argument("--study", action="store_true",
                             help="run the study section with --quick too (four studies: ~10 min on 2 CPU cores)")
    parser.add_argument("--batch-trials", type=int, nargs="+", metavar="K",
                        help="run the study once per batch_trials K (e.g. 1 4), warm runners, and compare")
    parser.add_argument("--init-cca", action="store_true",
                        help="run the study with fixed init default and cca (linear/siglip heads) and compare")
    parser.add_argument("--study-timeout", type=float, help="seconds per study (default 900; --search: no limit)")
    parser.add_argument("--study-config", default=str(REPO / "configs" / "quickstart.yaml"),
                        help="the tuning config of the study section (default: the quickstart)")
    parser.add_argument("--random-data", action="store_true",
                        help="train on normals drawn on the device (same shapes) instead of xclip_jax.data.synthesize")
    parser.add_argument("--skip-training", action="store_true")
    parser.add_argument("--skip-startup", action="store_true")
    parser.add_argument("--skip-metrics", action="store_true")
    parser.add_argument("--out", help="the JSON record (default benchmarks/latest.json; --search: "
                                      "benchmarks/search-<config stem>[-<label>]-<date>.json)")
    bench_search.add_arguments(parser)
    args = parser.parse_args(argv)
    if args.search:  # before jax starts a backend here: on a GPU the studies' trials need the card
        return bench_search.main(args)
    if args.overrides or args.seed_list or args.label or args.keep or args.confirm:
        parser.error("--set, --seed-list, --confirm, --label and --keep go with --search CONFIG")
    args.out = args.out or str(REPO / "benchmarks" / "latest.json")
    args.study_timeout = args.study_timeout or 900.0

    backend = jax.default_backend()
    on_gpu = backend == "gpu"
    args.rows = args.rows or (50_000 if args.quick else 100_000)
    args.batches = args.batches or ([2048] if args.quick else [2048, 4096])
    args.repeats = args.repeats or (1 if args.quick else 3)
    args.peak_n = args.peak_n or (8192 if on_gpu else 4096)
    # On a 2-core CPU the quickstart study takes about as long as the rest of --quick, so the two
    # together overrun --quick's 5-minute budget: --quick runs it only with --study (the figures are
    # in benchmarks/RESULTS.md, "Quickstart study"). Full mode runs it unless --skip-study.
    run_study = args.study or not (args.skip_study or args.quick)
    combos = COMBOS
    if args.combos:
        combos = tuple(c for c in COMBOS if f"{c[0]}+{c[1]}" in args.combos)
    image_dim, text_dim = (1152, 4096) if args.coco else (768, 1024)

    t_start = time.perf_counter()
    bench_report.open_record(args.out)
    header = HEADER
    header.update({
        "name": "header", "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "devices": [str(d) for d in jax.devices()], "platform": backend, "cpu_count": os.cpu_count(),
        "machine": cpu_model() if not on_gpu else (gpu_description() or str(jax.devices()[0])),
        "cpu_model": cpu_model(), "gpu": gpu_description(), "jax_version": jax.__version__,
        "jaxlib_version": getattr(__import__("jaxlib"), "__version__", None), "python": platform.python_version(),
        "hostname": platform.node(), "argv": sys.argv[1:], "quick": args.quick, "rows": args.rows,
        "image_dim": image_dim, "text_dim": text_dim, "dtype": args.dtype,
        "loadavg_start": [round(x, 2) for x in os.getloadavg()],
        "xla_flags": os.environ.get("XLA_FLAGS"), "complete": False,
    })
    save()
    log(f"{header['machine']} ({backend}, {os.cpu_count()} CPUs), jax {jax.__version__}; "
        f"load {header['loadavg_start']}")

    peak_repeats = 5 if args.quick else 9
    meters = {"float32": PeakMeter(args.peak_n, jnp.float32)}
    if on_gpu:
        meters["float32 HIGHEST"] = PeakMeter(args.peak_n, jnp.float32, precision=jax.lax.Precision.HIGHEST)
    if on_gpu or args.dtype == "bfloat16":
        meters["bfloat16"] = PeakMeter(args.peak_n, jnp.bfloat16)
    for meter in meters.values():
        meter.sample(peak_repeats)
    blas = [numpy_sgemm_gflops(args.peak_n, peak_repeats)] if backend == "cpu" else []
    log("matmul peaks (GFLOP/s): " + ", ".join(f"{k} {m.peak:.1f}" for k, m in meters.items()))

    train = []
    if not args.skip_training:
        t0 = time.perf_counter()
        data_dev = make_data(args.rows, image_dim, text_dim, random=args.random_data)
        log(f"synthetic set {args.rows:,} x {image_dim}/{text_dim} on the device in {time.perf_counter() - t0:.1f} s")
        train = bench_training(args, meters["bfloat16" if args.dtype == "bfloat16" else "float32"], data_dev,
                               image_dim, text_dim, combos)
        del data_dev
    save()
    metrics_s = None if args.skip_metrics else bench_metrics(repeats=3)
    save()
    startup = None if args.skip_startup else bench_trial_startup()
    save()
    study = bench_study(args.study_timeout, Path(args.study_config).resolve()) if run_study else None
    if args.init_cca:
        study = {**(study or {}), **bench_init_cca(args.study_timeout, Path(args.study_config).resolve())}
    if args.batch_trials:
        bundles = bench_batch_trials(args.batch_trials, args.study_timeout, Path(args.study_config).resolve())
        study = {**(study or {}), **{f"warm runners, batch_trials {k}": r for k, r in bundles.items()}}

    peak = {}
    if blas:
        blas.append(numpy_sgemm_gflops(args.peak_n, peak_repeats))
        record("matmul_peak/numpy_blas_float32", round(max(blas), 2), "GFLOP/s", n=args.peak_n,
               samples=[round(x, 2) for x in blas],
               note="numpy's BLAS sgemm on the same n^3 product (best of the start and end samples, each a median): "
                    "a reference for what the CPU does outside XLA; fractions use XLA's jnp.dot peak")
        for r in train:
            if r.get("gflops"):
                r["blas_frac"] = r["gflops"] / max(blas)
                record(f"fraction_of_numpy_blas_peak/{r['name']}", round(r["blas_frac"], 4), "fraction",
                       batch_size=r["batch"], blas_gflops=round(max(blas), 2))
    for key, meter in meters.items():
        peak[key] = meter.peak
        record(f"matmul_peak/{key.replace(' ', '_')}", round(meter.peak, 2), "GFLOP/s", n=args.peak_n,
               samples=[round(x, 2) for x in meter.samples],
               how=f"best of {len(meter.samples)} samples (each the median of {peak_repeats} runs at the start, "
                   f"{args.peak_recheck} after each training combo)",
               precision=("HIGHEST (strict fp32)" if "HIGHEST" in key else
                          "default (what training uses; TF32 on recent NVIDIA GPUs)" if key == "float32" else None))
    header["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    header["total_seconds"] = round(time.perf_counter() - t_start, 1)
    header["complete"] = True
    save()
    print(markdown(header, train, peak, metrics_s, startup, study, args))
    print(f"\nTotal {header['total_seconds']:.1f} s; records in {bench_report.OUT_PATH}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
