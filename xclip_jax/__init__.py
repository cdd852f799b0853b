"""xclip_jax: cross-modal projection heads trained and tuned in JAX."""

__version__ = "0.1.0"


def __getattr__(name):
    # `from xclip_jax import train_step` without importing JAX for every CLI's --help.
    if name in ("train_step", "create_train_state", "TrainState"):
        from xclip_jax import step

        return getattr(step, name)
    raise AttributeError(name)
