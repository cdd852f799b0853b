"""The in-process compute benches: training throughput of each head x loss (the epoch time of
``run_epochs``' ahead-of-time compiled program (one member), rows/s, the model FLOPs of an epoch and the achieved
fraction of the measured matmul peak), and the time of the validation metrics.

About XLA's FLOP count: XLA's HloCostAnalysis counts a while loop's body once, whatever its trip
count (true of jax 0.10). An epoch is a ``lax.scan`` over the steps, so the epoch's model FLOPs are
taken as (XLA's count of one compiled ``train_step``) x (steps per epoch) unless XLA's count of the
epoch program is already at least that (a version that multiplies by the trip count). Both raw
counts are kept in the record. XLA counts every floating-point op (matmuls, GELU, softmax, Adam...),
not only matmuls; an analytic matmul-only count is recorded beside it for comparison.
"""

from __future__ import annotations

import os
import statistics
import time

import jax
import jax.numpy as jnp
from bench_machine import PeakMeter, block, cost_flops
from bench_report import log, record, save

COMBOS = (
    ("siglip", "sigmoid_infonce"),
    ("clip", "softmax_infonce"),
    ("mlp", "softmax_infonce"),
    ("attention", "softmax_infonce"),
    ("mlp", "queue_infonce"),
)

TARGET_FRACTION = 0.75


def make_data(rows: int, image_dim: int, text_dim: int, random: bool = False):
    """The training set on the device: ``xclip_jax.data.synthesize`` (default), or, with ``random``,
    unit-variance normals drawn on the device with the same layout (5 captions per image) — the
    same throughput, without the host-side generation (single-threaded, so slow at COCO dims; the
    figure is in benchmarks/RESULTS.md)."""
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


def bench_training(args, meter: PeakMeter, data_dev, image_dim: int, text_dim: int, combos=COMBOS) -> list[dict]:
    import numpy as np

    from xclip_jax.spec import HeadSpec, LossSpec, RunSpec, TrainingSpec
    from xclip_jax.step import create_train_state, run_epochs, train_step

    dtype = args.dtype
    rows = data_dev.rows
    results = []
    for batch in args.batches:
        for head, loss in combos:
            name = f"{head}+{loss}"
            spec = RunSpec(HeadSpec(head, output_dim=args.output_dim, hidden_dim=args.hidden_dim,
                                      dropout=args.dropout, num_heads=8, num_layers=1),
                             LossSpec(loss, temperature=0.07, queue_size=4096),
                             TrainingSpec(batch_size=batch, learning_rate=1e-3, weight_decay=1e-4, dtype=dtype),
                             image_dim, text_dim)
            state = create_train_state(spec, seed=0)
            states, active = jax.tree.map(lambda x: x[None], state), np.array([True])
            steps = rows // batch
            t0 = time.perf_counter()
            epoch_fn = run_epochs.lower(states, data_dev, active).compile()
            compile_s = time.perf_counter() - t0
            epoch_flops_raw = cost_flops(epoch_fn)
            sample = {"image": jnp.zeros((batch, image_dim), jnp.float32),
                      "text": jnp.zeros((batch, text_dim), jnp.float32),
                      "ids": jnp.arange(batch, dtype=jnp.int32)}
            # One step's count from the lowered (pre-optimisation) HLO: it agrees with the compiled
            # program's count (how closely: benchmarks/RESULTS.md) and saves a second compile per combo.
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

            states, metrics = epoch_fn(states, data_dev, active)  # warm-up epoch
            block((states, metrics))
            times, loads = [], []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                states, metrics = epoch_fn(states, data_dev, active)
                block((states, metrics))
                times.append(time.perf_counter() - t0)
                loads.append(round(os.getloadavg()[0], 2))
            finite = bool(jax.device_get(metrics["finite"]).all())
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
