"""``python -m xclip_jax.data``."""

from xclip_jax.data.cli import main

if __name__ == "__main__":
    main()
