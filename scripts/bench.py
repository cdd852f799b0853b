#!/usr/bin/env python
"""xclip_jax benchmark: one process, one run, every figure a ratio on this machine at this moment.

    python scripts/bench.py [--quick] [--coco] [--dtype bfloat16] [--skip-study | --study] [--out PATH]

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

About XLA's FLOP count: XLA's HloCostAnalysis counts a while loop's body once, whatever its trip
count (true of jax 0.10). An epoch is a ``lax.scan`` over the steps, so the epoch's model FLOPs are
taken as (XLA's count of one compiled ``train_step``) x (steps per epoch) unless XLA's count of the
epoch program is already at least that (a version that multiplies by the trip count). Both raw
counts are kept in the record. XLA counts every floating-point op (matmuls, GELU, softmax, Adam...),
not only matmuls; an analytic matmul-only count is recorded beside it for comparison.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # importable without installing (the device runs from the checkout)
    sys.path.insert(0, str(REPO))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

COMBOS = (
    ("siglip", "sigmoid_infonce"),
    ("clip", "softmax_infonce"),
    ("mlp", "softmax_infonce"),
    ("attention", "softmax_infonce"),
    ("mlp", "queue_infonce"),
)

TARGET_FRACTION = 0.75
TARGET_WARM_FIRST_STEP_S = 3.0

RECORDS: list[dict] = []
HEADER: dict = {}
OUT_PATH: Path | None = None


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


def block(x):
    return jax.block_until_ready(x)


def cost_flops(compiled) -> float | None:
    """'flops' from a compiled object's cost analysis (a dict, or a list of dicts on older jax)."""
    try:
        ca = compiled.cost_analysis()
    except Exception as e:  # some backends do not implement it
        log(f"cost_analysis unavailable: {e}")
        return None
    if ca is None:
        return None
    if isinstance(ca, (list, tuple)):
        ca = ca[0] if ca else {}
    flops = ca.get("flops")
    return float(flops) if flops is not None and flops >= 0 else None


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def gpu_description() -> str | None:
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


# ----------------------------------------------------------------------------- 1. peak


class PeakMeter:
    """The matmul peak of one dtype/precision: an n x n x n ``jnp.dot``, GFLOP/s = 2 n^3 / t.

    ``sample(k)`` times k runs and keeps their median as one sample. The bench samples once at the
    start and again after every training combo; the peak is the best sample of the run (the machine
    can do at least that), so a moment of contention from other processes lowers no fraction by
    shrinking the peak. Every sample is recorded.
    """

    def __init__(self, n: int, dtype, precision=None):
        self.n = n
        key_a, key_b = jax.random.split(jax.random.PRNGKey(0))
        self.a = jax.random.normal(key_a, (n, n), jnp.float32).astype(dtype)
        self.b = jax.random.normal(key_b, (n, n), jnp.float32).astype(dtype)
        self.f = jax.jit(lambda x, y: jnp.dot(x, y, precision=precision)).lower(self.a, self.b).compile()
        for _ in range(2):  # warm-up
            block(self.f(self.a, self.b))
        self.samples: list[float] = []

    def sample(self, repeats: int) -> float:
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            block(self.f(self.a, self.b))
            times.append(time.perf_counter() - t0)
        gflops = 2.0 * self.n ** 3 / statistics.median(times) / 1e9
        self.samples.append(gflops)
        return gflops

    @property
    def peak(self) -> float:
        return max(self.samples)


def numpy_sgemm_gflops(n: int, repeats: int) -> float:
    """The host BLAS (numpy's, OpenBLAS in the wheels) float32 GEMM rate: the same n^3 product outside XLA.

    A reference only (the peak the fractions use is XLA's own ``jnp.dot``): it shows how far XLA:CPU's
    matmul is from what the CPU does with a tuned BLAS, which is what a PyTorch (MKL/oneDNN) original uses.
    """
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    a @ b
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
    return 2.0 * n ** 3 / statistics.median(times) / 1e9


# ----------------------------------------------------------------------------- 2. training


def make_data(rows: int, image_dim: int, text_dim: int, random: bool = False):
    """The training set on the device: ``xclip_jax.data.synthesize`` (default), or, with ``random``,
    unit-variance normals drawn on the device with the same layout (5 captions per image) — the
    same throughput, without the host-side generation (~10-30 s at COCO dims)."""
    from xclip_jax import data
    from xclip_jax.step import DeviceData, to_device

    captions = 5
    if random:
        k1, k2 = jax.random.split(jax.random.PRNGKey(0))
        n_images = rows // captions
        dev = DeviceData(jax.random.normal(k1, (n_images, image_dim), jnp.float32),
                         jax.random.normal(k2, (n_images * captions, text_dim), jnp.float32),
                         jnp.repeat(jnp.arange(n_images, dtype=jnp.int32), captions))
        block(dev)
        return dev
    image_rows, text_rows, ids = data.synthesize(rows // captions, captions, image_dim, text_dim, seed=0)
    eset = data.from_rows("bench", image_rows, text_rows, ids)
    dev = to_device(eset)
    block(dev)
    return dev


def analytic_matmul_flops(head: str, loss: str, batch: int, image_dim: int, text_dim: int, out: int, hidden: int,
                          queue: int, num_layers: int = 1) -> float:
    """Matmul-only FLOPs of one training step: forward 2*B*in*out per dense layer; backward 2x that,
    minus the input gradient of each head's first layer (the data need none; siglip's LayerNorm
    params before its layer do); the loss's logits and their gradients."""
    def head_layers(d):
        if head == "siglip":
            return [(d, out)]
        if head in ("clip", "mlp"):
            return [(d, hidden), (hidden, out)]
        return [(d, d), (d, d)] * num_layers + [(d, out)]  # v_proj, out_proj per block (q/k skipped)

    total = 0.0
    for d in (image_dim, text_dim):
        layers = head_layers(d)
        fwd = sum(2.0 * batch * i * o for i, o in layers)
        # The first layer's input gradient is not needed, except for siglip, whose LayerNorm has params.
        total += 3 * fwd - (0.0 if head == "siglip" else 2.0 * batch * layers[0][0] * layers[0][1])
    logits = 2.0 * batch * batch * out
    if loss == "queue_infonce":
        logits += 2.0 * batch * queue * out
    # forward logits, then dL/dzi and dL/dzt (the queue side gets no gradient)
    total += logits + (logits + 2.0 * batch * batch * out)
    return total


def bench_training(args, meter: PeakMeter, data_dev, image_dim: int, text_dim: int) -> list[dict]:
    from xclip_jax.spec import HeadSpec, LossSpec, TrainingSpec
    from xclip_jax.step import TrainSpec, create_train_state, run_epoch, train_step

    dtype = args.dtype
    rows = data_dev.rows
    results = []
    for batch in args.batches:
        for head, loss in COMBOS:
            name = f"{head}+{loss}"
            spec = TrainSpec(HeadSpec(head, output_dim=args.output_dim, hidden_dim=args.hidden_dim,
                                      dropout=args.dropout, num_heads=8, num_layers=1),
                             LossSpec(loss, temperature=0.07, queue_size=4096),
                             TrainingSpec(batch_size=batch, learning_rate=1e-3, weight_decay=1e-4, dtype=dtype),
                             image_dim, text_dim)
            state = create_train_state(spec, seed=0)
            steps = rows // batch
            t0 = time.perf_counter()
            epoch_fn = run_epoch.lower(state, data_dev).compile()
            compile_s = time.perf_counter() - t0
            epoch_flops_raw = cost_flops(epoch_fn)
            sample = {"image": jnp.zeros((batch, image_dim), jnp.float32),
                      "text": jnp.zeros((batch, text_dim), jnp.float32),
                      "ids": jnp.arange(batch, dtype=jnp.int32)}
            # One step's count from the lowered (pre-optimisation) HLO: within 0.3% of the compiled
            # program's count here, and it saves a second compile per combo.
            lowered_step = train_step.lower(state, sample)
            step_flops = cost_flops(lowered_step)
            if step_flops is None:
                step_flops = cost_flops(lowered_step.compile())
            if step_flops is not None and (epoch_flops_raw is None or epoch_flops_raw < 0.9 * step_flops * steps):
                # The loop body was counted once: add the other steps' share.
                epoch_flops = (epoch_flops_raw or step_flops) + (steps - 1) * step_flops
                flops_how = ("XLA cost_analysis of the compiled epoch (scan body counted once by XLA) "
                             "+ (steps - 1) x XLA cost_analysis of one train_step")
            else:
                epoch_flops, flops_how = epoch_flops_raw, "XLA cost_analysis of the compiled epoch program"
            analytic = analytic_matmul_flops(head, loss, batch, image_dim, text_dim, args.output_dim, args.hidden_dim,
                                             4096) * steps

            state, metrics = epoch_fn(state, data_dev)  # warm-up epoch
            block((state, metrics))
            times, loads = [], []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                state, metrics = epoch_fn(state, data_dev)
                block((state, metrics))
                times.append(time.perf_counter() - t0)
                loads.append(round(os.getloadavg()[0], 2))
            finite = bool(jax.device_get(metrics["finite"]))
            local_peak = meter.sample(args.peak_recheck)
            t = statistics.median(times)
            params = {"head": head, "loss": loss, "batch_size": batch, "rows": rows, "steps": steps,
                      "trained_rows": steps * batch, "image_dim": image_dim, "text_dim": text_dim,
                      "output_dim": args.output_dim, "hidden_dim": args.hidden_dim, "dropout": args.dropout,
                      "dtype": dtype, "timed_epochs": args.repeats, "warmup_epochs": 1,
                      "data": "random normals on the device" if args.random_data else "xclip_jax.data.synthesize"}
            if head == "attention":
                params.update(num_heads=8, num_layers=1)
            if loss == "queue_infonce":
                params["queue_size"] = 4096
            results.append({"name": name, "batch": batch, "epoch_s": t, "times": times, "rows_s": steps * batch / t,
                            "flops": epoch_flops, "flops_how": flops_how, "flops_raw": epoch_flops_raw,
                            "step_flops": step_flops, "analytic": analytic, "compile_s": compile_s, "rows": rows,
                            "finite": finite, "params": params, "loadavg_1m": loads, "local_peak": local_peak})
            gflops = epoch_flops / t / 1e9 if epoch_flops else 0.0
            log(f"{name} batch {batch}: {t:.3f} s/epoch, {steps * batch / t:,.0f} rows/s, {gflops:.1f} GFLOP/s "
                f"(matmul peak just after: {local_peak:.1f}, best so far {meter.peak:.1f}; compile {compile_s:.1f} s; "
                f"load {loads})")
            del state, metrics, epoch_fn

    # Fractions against the run's best peak sample (see PeakMeter), recorded once all are in.
    peak = meter.peak
    for r in results:
        name, params, t = r["name"], r["params"], r["epoch_s"]
        gflops = r["flops"] / t / 1e9 if r["flops"] else None
        r["gflops"] = gflops
        r["frac"] = gflops / peak if gflops else None
        r["analytic_frac"] = r["analytic"] / t / 1e9 / peak
        record(f"epoch_seconds/{name}", round(t, 4), "s", **params, all_times=[round(x, 4) for x in r["times"]],
               compile_seconds=round(r["compile_s"], 3), loss_finite=r["finite"], loadavg_1m=r["loadavg_1m"])
        record(f"rows_per_second/{name}", round(r["rows_s"], 1), "rows/s", **params)
        record(f"model_flops_per_epoch/{name}", r["flops"], "FLOP", **params, counted_by=r["flops_how"],
               xla_epoch_program_flops=r["flops_raw"], xla_train_step_flops=r["step_flops"],
               analytic_matmul_flops=r["analytic"],
               note="XLA's count (HloCostAnalysis): every floating-point op, not only matmuls")
        record(f"achieved_gflops/{name}", round(gflops, 2) if gflops else None, "GFLOP/s", **params)
        record(f"fraction_of_peak/{name}", round(r["frac"], 4) if r["frac"] else None, "fraction",
               **params, peak_gflops=round(peak, 2), peak_dtype=dtype, target=TARGET_FRACTION,
               target_met=bool(r["frac"] is not None and r["frac"] >= TARGET_FRACTION),
               analytic_matmul_fraction=round(r["analytic_frac"], 4),
               fraction_of_peak_sampled_just_after=round(gflops / r["local_peak"], 4) if gflops else None)
    save()
    return results


# ----------------------------------------------------------------------------- 3. metrics


def bench_metrics(repeats: int, n_images: int = 5000, captions: int = 5, dim: int = 512) -> float:
    from xclip_jax.metrics import retrieval_metrics_indexed

    k1, k2 = jax.random.split(jax.random.PRNGKey(1))
    zi = jax.random.normal(k1, (n_images, dim), jnp.float32)
    zi = zi / jnp.linalg.norm(zi, axis=1, keepdims=True)
    zt = jax.random.normal(k2, (n_images * captions, dim), jnp.float32)
    zt = zt / jnp.linalg.norm(zt, axis=1, keepdims=True)
    text_image = jnp.repeat(jnp.arange(n_images, dtype=jnp.int32), captions)
    block((zi, zt, text_image))
    retrieval_metrics_indexed(zi, zt, text_image)  # warm-up (compiles)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        retrieval_metrics_indexed(zi, zt, text_image)  # returns Python floats: synchronous
        times.append(time.perf_counter() - t0)
    t = statistics.median(times)
    record("validation_metrics_seconds", round(t, 4), "s", images=n_images, captions=n_images * captions, dim=dim,
           timed_runs=repeats, all_times=[round(x, 4) for x in times])
    log(f"metrics {n_images} x {n_images * captions}: {t:.3f} s")
    return t


# ----------------------------------------------------------------------------- 4. trial start-up

# Run in a fresh interpreter. XCLIP_BENCH_SPAWN is the parent's time.time() just before the spawn.
CHILD = r"""
import os, sys, time, json
t_spawn = float(os.environ["XCLIP_BENCH_SPAWN"])
t_py = time.time()
import jax
import jax.numpy as jnp
from xclip_jax.step import TrainSpec, create_train_state, run_epoch, to_device
from xclip_jax.spec import HeadSpec, LossSpec, TrainingSpec
from xclip_jax import data
t_import = time.time()
sets = data.synthetic_splits(n_images=3000, captions_per_image=5, image_dim=256, text_dim=384, val_images=500,
                             test_images=500, seed=0)
train = to_device(sets["train"])
jax.block_until_ready(train)
t_data = time.time()
spec = TrainSpec(HeadSpec("clip", output_dim=128, hidden_dim=256, dropout=0.1), LossSpec("softmax_infonce", 0.07),
                 TrainingSpec(batch_size=512, learning_rate=1e-3, weight_decay=1e-4), 256, 384)
state = create_train_state(spec, seed=0)
jax.block_until_ready(state)
t_state = time.time()
epoch_fn = run_epoch.lower(state, train).compile()
t_compile = time.time()
state, metrics = epoch_fn(state, train)
jax.block_until_ready((state, metrics))
t_step = time.time()
print("XCLIP_BENCH " + json.dumps({
    "interpreter": t_py - t_spawn, "import": t_import - t_py, "data": t_data - t_import,
    "state": t_state - t_data, "compile": t_compile - t_state, "first_epoch": t_step - t_compile,
    "spawn_to_first_epoch": t_step - t_spawn,
    "spawn_to_first_step": t_compile - t_spawn + (t_step - t_compile) / (train.rows // 512),
    "rows": train.rows, "steps": train.rows // 512,
    "backend": jax.default_backend()}), flush=True)
"""


def run_child(cache_dir: str) -> dict:
    env = dict(os.environ)
    env.update({
        "JAX_COMPILATION_CACHE_DIR": cache_dir,
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
        "XLA_PYTHON_CLIENT_PREALLOCATE": "false",
        "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p),
    })
    env["XCLIP_BENCH_SPAWN"] = repr(time.time())
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, timeout=600)
    wall = time.perf_counter() - t0
    if out.returncode != 0:
        raise RuntimeError(f"trial start-up child failed ({out.returncode}): {out.stderr[-2000:]}")
    line = next(ln for ln in out.stdout.splitlines() if ln.startswith("XCLIP_BENCH "))
    result = json.loads(line[len("XCLIP_BENCH "):])
    result["process_wall"] = wall
    return result


def bench_trial_startup() -> dict:
    out = {}
    with tempfile.TemporaryDirectory(prefix="xclip_bench_cache_") as cache:
        for label in ("cold", "warm"):
            r = run_child(cache)
            out[label] = r
            params = {"cache": label, "head": "clip", "loss": "softmax_infonce", "image_dim": 256, "text_dim": 384,
                      "output_dim": 128, "hidden_dim": 256, "batch_size": 512, "rows": r["rows"],
                      "steps_in_first_epoch": r["steps"], "breakdown_s": {k: round(r[k], 3) for k in (
                          "interpreter", "import", "data", "state", "compile", "first_epoch")},
                      "note": "fresh python process: import xclip_jax.step, synthesize the quickstart set, "
                              "build the state, AOT-compile run_epoch, run the first epoch; no optuna/storage"}
            if label == "warm":
                params.update(target=TARGET_WARM_FIRST_STEP_S,
                              target_met=r["spawn_to_first_step"] <= TARGET_WARM_FIRST_STEP_S)
            params["how"] = ("first step = process spawn -> compiled epoch program ready + one step's share of the "
                             "first epoch (the epoch is one program, so a single step is not observable apart)")
            record(f"trial_first_step_seconds/{label}", round(r["spawn_to_first_step"], 3), "s", **params)
            record(f"trial_first_epoch_seconds/{label}", round(r["spawn_to_first_epoch"], 3), "s", cache=label,
                   steps=r["steps"], note="process spawn -> first epoch (29 steps of 512) finished on the device")
            record(f"trial_process_wall_seconds/{label}", round(r["process_wall"], 3), "s", cache=label,
                   note="subprocess start to exit (includes interpreter teardown)")
            log(f"trial start-up ({label} cache): first step {r['spawn_to_first_step']:.2f} s, first epoch done "
                f"{r['spawn_to_first_epoch']:.2f} s after spawn "
                f"(import {r['import']:.2f}, data {r['data']:.2f}, state {r['state']:.2f}, compile "
                f"{r['compile']:.2f}, epoch {r['first_epoch']:.2f}); process {r['process_wall']:.2f} s")
    return out


# ----------------------------------------------------------------------------- 5. the quickstart study


STUDY_MODES = {"per-trial processes": 1, "warm runners": None}  # runner_max_trials (None: the config's)


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
    run_dir.mkdir(parents=True)
    cfg_path = run_dir / "study.yaml"
    cfg_path.write_text(yaml.safe_dump(raw, sort_keys=False))
    env = dict(os.environ)
    env["XCLIP_JAX_CACHE"] = str(cache)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    cmd = [sys.executable, "-m", "xclip_jax.tune", str(cfg_path), "--no-progress", "--output-dir", str(run_dir / "out"),
           "--checkpoint-dir", str(run_dir / "ckpt"), "--storage", f"sqlite:///{run_dir}/s.db"]
    t0 = time.perf_counter()
    try:
        out = subprocess.run(cmd, cwd=run_dir, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        record(f"study/{label}", None, "s", error=f"timed out after {timeout} s")
        return None
    wall = time.perf_counter() - t0
    if out.returncode != 0:
        record(f"study/{label}", None, "s", error=out.stderr[-1500:])
        log(f"study {label} failed: {out.stderr[-500:]}")
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


# ----------------------------------------------------------------------------- report


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
    parser.add_argument("--study-timeout", type=float, default=900.0, help="seconds per study")
    parser.add_argument("--study-config", default=str(REPO / "configs" / "quickstart.yaml"),
                        help="the tuning config of the study section (default: the quickstart)")
    parser.add_argument("--random-data", action="store_true",
                        help="train on normals drawn on the device (same shapes) instead of xclip_jax.data.synthesize")
    parser.add_argument("--skip-training", action="store_true")
    parser.add_argument("--skip-startup", action="store_true")
    parser.add_argument("--skip-metrics", action="store_true")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "latest.json"))
    args = parser.parse_args(argv)

    backend = jax.default_backend()
    on_gpu = backend == "gpu"
    args.rows = args.rows or (50_000 if args.quick else 100_000)
    args.batches = args.batches or ([2048] if args.quick else [2048, 4096])
    args.repeats = args.repeats or (1 if args.quick else 3)
    args.peak_n = args.peak_n or (8192 if on_gpu else 4096)
    # The quickstart study takes ~3.5 min on the 2-core CPU (219 s measured, quiet machine) on top of
    # ~3.5 min for the rest of --quick: it does not fit --quick's 5-minute budget, so --quick runs it
    # only with --study (see benchmarks/RESULTS.md). Full mode runs it unless --skip-study.
    run_study = args.study or not (args.skip_study or args.quick)
    global COMBOS
    if args.combos:
        COMBOS = tuple(c for c in COMBOS if f"{c[0]}+{c[1]}" in args.combos)
    image_dim, text_dim = (1152, 4096) if args.coco else (768, 1024)

    t_start = time.perf_counter()
    global OUT_PATH
    OUT_PATH = Path(args.out)
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
                               image_dim, text_dim)
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
    print(f"\nTotal {header['total_seconds']:.1f} s; records in {OUT_PATH}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
