"""The machine a bench runs on: its description (CPU model, GPU), the matmul peak meter that every
fraction is taken against, the host BLAS reference, and XLA's FLOP count of a compiled program.
"""

from __future__ import annotations

import platform
import shutil
import statistics
import subprocess
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from bench_report import log


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
