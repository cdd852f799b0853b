"""Test-wide settings."""

import jax

# Compare against float64 references at full float32 matmul precision: on GPUs JAX's default
# lets float32 matmuls run in TF32 (10-bit mantissa), which is a speed choice, not the formula.
jax.config.update("jax_default_matmul_precision", "highest")
