"""Test-wide settings."""

import jax

# Compare against float64 references at full float32 matmul precision: on GPUs JAX's default
# lets float32 matmuls run in TF32 (10-bit mantissa), which is a speed choice, not the formula.
jax.config.update("jax_default_matmul_precision", "highest")

import os

import pytest


@pytest.fixture(scope="session", autouse=True)
def shared_compilation_cache(tmp_path_factory):
    """One persistent JAX compilation cache for every trial process the tests start.

    The tests start many trial processes with the same tiny shapes; sharing the cache between
    them (as the tuner does in a real study) makes all but the first compile of each program a
    cache hit. It lives in the session's temp dir, so nothing leaks between runs.
    """
    os.environ["XCLIP_JAX_CACHE"] = str(tmp_path_factory.mktemp("jax_cache"))
    yield
