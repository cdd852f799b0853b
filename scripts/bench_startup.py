"""The trial start-up bench: a fresh process that imports ``xclip_jax.step``, builds the quickstart
data and state and runs its first epoch, with an empty persistent compilation cache (cold) and
again with the same cache (warm); the time from spawn to the first step, and where it went.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

from bench_report import REPO, log, record

TARGET_WARM_FIRST_STEP_S = 3.0

# Run in a fresh interpreter. XCLIP_BENCH_SPAWN is the parent's time.time() just before the spawn.
CHILD = r"""
import os, sys, time, json
t_spawn = float(os.environ["XCLIP_BENCH_SPAWN"])
t_py = time.time()
import jax
import jax.numpy as jnp
import numpy as np
from xclip_jax.step import create_train_state, run_epochs, to_device
from xclip_jax.spec import HeadSpec, LossSpec, RunSpec, TrainingSpec
from xclip_jax import data
t_import = time.time()
sets = data.synthetic_splits(n_images=3000, captions_per_image=5, image_dim=256, text_dim=384, val_images=500,
                             test_images=500, seed=0)
train = to_device(sets["train"])
jax.block_until_ready(train)
t_data = time.time()
spec = RunSpec(HeadSpec("clip", output_dim=128, hidden_dim=256, dropout=0.1), LossSpec("softmax_infonce", 0.07),
                 TrainingSpec(batch_size=512, learning_rate=1e-3, weight_decay=1e-4), 256, 384)
state = jax.tree.map(lambda x: x[None], create_train_state(spec, seed=0))
jax.block_until_ready(state)
t_state = time.time()
epoch_fn = run_epochs.lower(state, train, np.array([True])).compile()
t_compile = time.time()
state, metrics = epoch_fn(state, train, np.array([True]))
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
