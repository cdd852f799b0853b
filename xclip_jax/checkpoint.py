"""Checkpoints with orbax: the best heads to ship, and the full train state to resume.

Layout of a heads checkpoint directory (``save_heads``)::

    DIR/<epoch>/params   both heads' params and the loss params (orbax PyTree)
    DIR/<epoch>/meta     the full config and metadata (JSON)

orbax's ``CheckpointManager`` writes each save into a temporary directory and renames it only
when complete, keeping one: a save killed mid-write leaves the previous checkpoint restorable.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import jax
import numpy as np

from xclip_jax.errors import UserError

logging.getLogger("absl").setLevel(logging.WARNING)


def _orbax_notes(record: logging.LogRecord) -> bool:
    # orbax clears the half-written folder an interrupted save left behind, and says so at WARNING
    # level; nothing is wrong, and the line would reach the user's console.
    return "Removing existing directory since it is not finalized" not in record.getMessage()


logging.getLogger("absl").addFilter(_orbax_notes)


def _manager(directory: Path, create: bool = True):
    import orbax.checkpoint as ocp

    options = ocp.CheckpointManagerOptions(max_to_keep=1, create=create, enable_async_checkpointing=False)
    return ocp.CheckpointManager(Path(directory).absolute(), options=options)


def save_heads(directory: str | Path, params: Any, config: dict, metadata: dict, step: int) -> Path:
    """Save params (a pytree) with the config and metadata as checkpoint ``step`` of ``directory``.

    Returns:
      The directory of this save.
    """
    import orbax.checkpoint as ocp

    directory = Path(directory)
    meta = {"config": config, **metadata}
    with _manager(directory) as mngr:
        mngr.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(jax.device_get(params)),
                                                meta=ocp.args.JsonSave(meta)), force=True)
        mngr.wait_until_finished()
    return directory / str(step)


def heads_metadata(train_set, epoch: int, val_r1: float) -> dict:
    """The metadata a heads checkpoint carries beside its params and config."""
    import xclip_jax

    return {"epoch": int(epoch), "val_r1": float(val_r1), "image_dim": int(train_set.image_dim),
            "text_dim": int(train_set.text_dim), "version": xclip_jax.__version__}


def latest_step(directory: str | Path) -> int | None:
    """The newest complete checkpoint step in ``directory``, or None."""
    directory = Path(directory)
    if not directory.is_dir():
        return None
    with _manager(directory, create=False) as mngr:
        return mngr.latest_step()


def load_raw(directory: str | Path) -> tuple[dict, dict]:
    """Restore ``(params, meta)`` from a heads checkpoint without knowing its structure.

    ``directory`` is the managed directory (its latest step is taken) or one step inside it.
    """
    import orbax.checkpoint as ocp

    directory = Path(directory)
    if not directory.exists():
        raise UserError(f"{directory}: checkpoint not found; give a directory written by train or tune")
    step = latest_step(directory)
    if step is None and directory.name.isdigit() and (directory / "meta").exists():
        directory, step = directory.parent, int(directory.name)
    if step is None:
        raise UserError(f"{directory}: no complete checkpoint inside; it may have been interrupted while saving")
    with _manager(directory, create=False) as mngr:
        restored = mngr.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(),
                                                               meta=ocp.args.JsonRestore()))
    params = jax.tree.map(np.asarray, restored["params"])
    return params, restored["meta"]


@dataclasses.dataclass(frozen=True)
class TrainedHeads:
    """A restored pair of heads, ready to project new embeddings.

    Attributes:
      config: the typed TrainConfig the heads were trained with.
      image_dim, text_dim: input dims. meta: the saved metadata (epoch, val R@1, version …).
      params: the heads' parameters.
    """

    config: Any
    image_dim: int
    text_dim: int
    meta: dict
    params: Any
    spec: Any

    def encode_images(self, x) -> jax.Array:
        """L2-normalised image embeddings of ``x`` [n, image_dim]."""
        return self._encode("image", x, self.image_dim)

    def encode_texts(self, x) -> jax.Array:
        """L2-normalised text embeddings of ``x`` [n, text_dim]."""
        return self._encode("text", x, self.text_dim)

    def _encode(self, side, x, dim):
        from xclip_jax.encode import encode

        x = np.asarray(x, np.float32)
        if x.ndim != 2 or x.shape[1] != dim:
            raise ValueError(f"encode_{side}s expects [n, {dim}] inputs, got shape {x.shape}")
        return encode(self.spec, side, self.params[side], x)


def restore(directory: str | Path) -> TrainedHeads:
    """Restore trained heads in a fresh process, knowing nothing but the path.

    Example:
      >>> heads = restore("outputs/clip/checkpoint")
      >>> z = heads.encode_images(image_embeddings)   # [n, output_dim], unit norm
    """
    from xclip_jax.config import TrainConfig, build
    from xclip_jax.spec import RunSpec

    params, meta = load_raw(directory)
    config = build(TrainConfig, meta["config"])
    spec = RunSpec.of(config, meta["image_dim"], meta["text_dim"])
    return TrainedHeads(config=config, image_dim=meta["image_dim"], text_dim=meta["text_dim"], meta=meta,
                        params=params, spec=spec)


def save_state(directory: str | Path, state, extra: dict, step: int) -> None:
    """Save the whole train state (for ``--resume``) with JSON-able ``extra`` (history, best …)."""
    import orbax.checkpoint as ocp

    with _manager(directory) as mngr:
        mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(jax.device_get(state)),
                                                extra=ocp.args.JsonSave(extra)), force=True)
        mngr.wait_until_finished()


def read_state_extra(directory: str | Path) -> dict | None:
    """The JSON ``extra`` of the latest ``save_state`` (without reading the state), or None."""
    import orbax.checkpoint as ocp

    step = latest_step(directory)
    if step is None:
        return None
    with _manager(directory, create=False) as mngr:
        return mngr.restore(step, args=ocp.args.Composite(extra=ocp.args.JsonRestore()))["extra"]


def restore_state(directory: str | Path, target):
    """Restore ``(state, extra)`` saved by ``save_state`` into the structure of ``target``."""
    import orbax.checkpoint as ocp

    step = latest_step(directory)
    if step is None:
        return None
    with _manager(directory, create=False) as mngr:
        restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(jax.device_get(target)),
                                                               extra=ocp.args.JsonRestore()))
    return restored["state"], restored["extra"]
