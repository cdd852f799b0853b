#!/usr/bin/env bash
# The wheels a lent GPU machine lacks for scripts/device_check.sh (its image has jax, flax, optax,
# orbax, chex, pytest, pyyaml, tqdm, matplotlib and safetensors, not optuna and what optuna needs),
# downloaded here into .whl/ (ignored by git) for Python 3.12 on x86-64 Linux. Run from the
# repository root, then carry .whl with the device call.
set -euo pipefail
mkdir -p .whl
rm -f .whl/*.whl
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${PLATFORMS[@]}" -d .whl optuna alembic sqlalchemy mako colorlog greenlet plotly
ls -1 .whl
du -sh .whl
