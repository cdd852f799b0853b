"""``python -m xclip_jax.baselines``."""

from xclip_jax.baselines.cli import main
from xclip_jax.errors import cli

raise SystemExit(cli(main)())
