"""A checkpoint's heads for other frameworks: the original's PyTorch checkpoint, safetensors or npz.

``python -m xclip_jax.export CHECKPOINT [--format torch|safetensors|npz] [--out FILE] [--force]``

``torch`` (the default) writes the original PyTorch tool's training checkpoint, ``best_model.pt``: a
``torch.save`` dict with ``config`` (the original's training-config form), ``image_head_state`` and
``text_head_state`` (``state_dict``s), ``epoch`` (epochs trained to the best one, counted from 1 as the
original does) and ``val_r1``; ``model`` and ``text_model`` hold the same tensors under the names of the
original's tuning-trial checkpoints (``torch.save`` stores them once); ``loss_state`` holds the loss's
``logit_scale`` (log of 1/τ) and ``logit_bias`` (the SigLIP bias, 0 when not learned). The original's
``models.create_model(config, image_dim, text_dim)`` builds heads that ``load_state_dict`` these states,
under its module definitions' parameter names and shapes:

* ``siglip`` (``SigLIPProjectionHead``): ``layer_norm.{weight,bias}``, ``projection.weight`` [out, in].
* ``clip`` (``CLIPProjectionHead``, an ``nn.Sequential`` Linear/GELU/Dropout/Linear):
  ``projection.0.{weight,bias}``, ``projection.3.{weight,bias}``.
* ``mlp`` (``MLPProjectionHead``): clip's, then ``projection.4.{weight,bias}`` (the LayerNorm).
* ``attention`` (``AttentionProjectionHead``): per layer ``i``, ``attention_layers.i`` (an
  ``nn.MultiheadAttention``: ``in_proj_weight`` [3·d, d], ``in_proj_bias`` [3·d], ``out_proj.{weight,bias}``)
  and ``layer_norms.i.{weight,bias}``; then ``final_proj.0`` (Linear) and ``final_proj.1`` (LayerNorm).
  On a sequence of one token the attention weights are identically 1, so the query and key blocks
  (the first two thirds of ``in_proj_*``) change no output: they are written as zeros; the value block
  and ``out_proj`` carry our weights.

The ``linear`` head has no counterpart in the original and is refused for ``torch``; so is an ``mlp``
with ``hidden_dim: null`` whose two sides' widths (in_dim // 2) differ (the original's takes one width).
``safetensors`` and ``npz`` hold the same tensors flat, under the same names prefixed by their dict
(``image_head_state.projection.0.weight``, ``loss_state.logit_scale``), and a JSON ``header`` (the
safetensors metadata's one key; a string array in the npz) with the config, ``epoch``, ``val_r1``, the
input dims and our own full config; they need neither torch nor this package to read.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np

from xclip_jax.errors import UserError, cli, exception_line, install_hint
from xclip_jax.spec import hidden_width

FORMATS = ("torch", "safetensors", "npz")
SUFFIX = {"torch": ".pt", "safetensors": ".safetensors", "npz": ".npz"}
ORIGINAL_HEADS = ("siglip", "clip", "mlp", "attention")
MODEL_KEYS = ("type", "output_dim", "hidden_dim", "dropout", "num_heads", "num_layers")


# ----------------------------------------------------------------------------- our params → state dicts


def _linear(name: str, dense: dict) -> dict:
    """A flax Dense (kernel [in, out]) as a PyTorch Linear (weight [out, in])."""
    out = {f"{name}.weight": dense["kernel"].T}
    if "bias" in dense:
        out[f"{name}.bias"] = dense["bias"]
    return out


def _layer_norm(name: str, norm: dict) -> dict:
    return {f"{name}.weight": norm["scale"], f"{name}.bias": norm["bias"]}


def _attention(name: str, block: dict) -> dict:
    """Our value-only attention block as ``nn.MultiheadAttention``: zero query and key blocks."""
    v = block["v_proj"]
    d = v["kernel"].shape[0]
    return {f"{name}.in_proj_weight": np.concatenate([np.zeros((2 * d, d), np.float32), v["kernel"].T]),
            f"{name}.in_proj_bias": np.concatenate([np.zeros(2 * d, np.float32), v["bias"]]),
            **_linear(f"{name}.out_proj", block["out_proj"])}


def head_state_dict(head_type: str, params: dict) -> dict[str, np.ndarray]:
    """One head's params as the original module's ``state_dict`` (float32 numpy arrays, [out, in] weights).

    The ``linear`` head (ours only) maps to ``projection.{weight,bias}``.
    """
    if head_type == "siglip":
        state = {**_layer_norm("layer_norm", params["LayerNorm_0"]), **_linear("projection", params["Dense_0"])}
    elif head_type in ("clip", "mlp"):
        state = {**_linear("projection.0", params["Dense_0"]), **_linear("projection.3", params["Dense_1"])}
        if head_type == "mlp":
            state.update(_layer_norm("projection.4", params["LayerNorm_0"]))
    elif head_type == "attention":
        state = {}
        for i in range(sum(name.startswith("AttentionBlock_") for name in params)):
            block = params[f"AttentionBlock_{i}"]
            state.update(_attention(f"attention_layers.{i}", block))
            state.update(_layer_norm(f"layer_norms.{i}", block["LayerNorm_0"]))
        state.update(_linear("final_proj.0", params["Dense_0"]))
        state.update(_layer_norm("final_proj.1", params["LayerNorm_0"]))
    else:
        state = _linear("projection", params["Dense_0"])
    return {name: np.ascontiguousarray(array, np.float32) for name, array in state.items()}


def original_config(config: dict, image_dim: int, text_dim: int) -> dict:
    """Our training config (a ``config.to_dict``) in the original's training-config form.

    The original's ``MLPProjectionHead`` takes one ``hidden_dim`` for both heads: ours with
    ``hidden_dim: null`` (in_dim // 2 per side) gets the number when both sides agree, else stays null.
    """
    model = {key: config["model"][key] for key in MODEL_KEYS}
    widths = {hidden_width(None, image_dim), hidden_width(None, text_dim)}
    if model["type"] == "mlp" and model["hidden_dim"] is None and len(widths) == 1:
        model["hidden_dim"] = widths.pop()
    loss = config["loss"]
    data = {key: value for key, value in (config.get("data") or {}).items() if key != "synthetic" and value}
    return {**{key: config[key] for key in ("experiment_name", "output_dir", "seed", "device", "base_data_dir")},
            "data": data, "model": model,
            "loss": {"type": loss["type"], "temperature": loss["temperature"],
                     "learnable_scale": loss["learnable_temp"], "queue_size": loss["queue_size"]},
            "training": {key: value for key, value in config["training"].items() if key != "dtype"},
            "evaluation": config["evaluation"]}


# ----------------------------------------------------------------------------- the export


def _restore(checkpoint):
    """``checkpoint.restore``, any failure to read it a one-line UserError."""
    from xclip_jax.checkpoint import restore

    try:
        return restore(checkpoint)
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"{checkpoint}: not a readable heads checkpoint ({exception_line(e)}); give a directory "
                        "written by train or tune") from e


def exported_tensors(heads) -> tuple[dict, dict]:
    """The state dicts of restored ``TrainedHeads`` and their header.

    Returns:
      ``({"image_head_state": {...}, "text_head_state": {...}, "loss_state": {...}}, header)``: numpy
      arrays under the original's names; the header holds ``config`` (the original's form), ``epoch``
      (from 1), ``val_r1``, ``image_dim``, ``text_dim`` and ``xclip_jax_config`` (ours, complete).
    """
    from xclip_jax.config import to_dict

    ours = to_dict(heads.config)
    loss = heads.params["loss"]
    states = {f"{side}_head_state": head_state_dict(heads.config.model.type, heads.params[side])
              for side in ("image", "text")}
    states["loss_state"] = {"logit_scale": np.asarray(loss["log_scale"], np.float32).reshape(()),
                            "logit_bias": np.asarray(loss["bias"], np.float32).reshape(())}
    header = {"config": original_config(ours, heads.image_dim, heads.text_dim),
              "epoch": int(heads.meta["epoch"]) + 1, "val_r1": float(heads.meta["val_r1"]),
              "image_dim": heads.image_dim, "text_dim": heads.text_dim, "xclip_jax_config": ours}
    return states, header


def _torch():
    try:
        import torch
    except ImportError:
        raise UserError(f"--format torch needs PyTorch: {install_hint('torch')}; or use --format safetensors, "
                        "which needs no torch") from None
    return torch


def _torch_checkpoint(states: dict, header: dict) -> dict:
    torch = _torch()
    tensors = {name: {key: torch.from_numpy(array) for key, array in state.items()} for name, state in states.items()}
    return {"config": header["config"], "image_head_state": tensors["image_head_state"],
            "text_head_state": tensors["text_head_state"], "epoch": header["epoch"], "val_r1": header["val_r1"],
            "model": tensors["image_head_state"], "text_model": tensors["text_head_state"],
            "loss_state": tensors["loss_state"]}


def _write(fmt: str, states: dict, header: dict, path: Path) -> None:
    if fmt == "torch":
        _torch().save(_torch_checkpoint(states, header), path)
        return
    flat = {f"{name}.{key}": array for name, state in states.items() for key, array in state.items()}
    if fmt == "safetensors":
        from safetensors.numpy import save

        path.write_bytes(save(flat, metadata={"header": json.dumps(header)}))
    else:
        with open(path, "wb") as f:
            np.savez(f, header=np.array(json.dumps(header)), **flat)


def default_path(checkpoint, fmt: str) -> Path:
    """``best_model.{pt,safetensors,npz}`` inside the checkpoint's folder, beside its step folder (a
    trial's ``checkpoints/00022/best_model.pt``, where the original kept it); a step folder given as
    the checkpoint counts as the folder that holds it."""
    folder = Path(checkpoint)
    if folder.name.isdigit() and (folder / "meta").exists():
        folder = folder.parent
    return folder / f"best_model{SUFFIX[fmt]}"


def export_heads(checkpoint, fmt: str = "torch", out=None, force: bool = False) -> Path:
    """Write the heads of ``checkpoint`` (a directory written by train or tune) as ``fmt``.

    Args:
      checkpoint: the checkpoint directory (or one step inside it).
      fmt: ``torch`` (the original's ``best_model.pt``), ``safetensors`` or ``npz``.
      out: the file to write; default ``default_path(checkpoint, fmt)``.
      force: replace an existing file.

    Returns:
      The path written. Raises UserError (one line) on a missing or unreadable checkpoint, an unknown
      format, an existing file without ``force``, a head the format cannot hold, or torch missing.
    """
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")
    path = Path(out) if out else default_path(checkpoint, fmt)
    if path.exists() and not force:
        raise UserError(f"{path} exists; pass --force to replace it, or --out another file")
    heads = _restore(checkpoint)
    model = heads.config.model
    if fmt == "torch" and model.type not in ORIGINAL_HEADS:
        raise UserError(f"the original tool has no {model.type!r} head, so it cannot load one from a .pt; "
                        "export it with --format safetensors (or npz)")
    states, header = exported_tensors(heads)
    if fmt == "torch" and model.type == "mlp" and header["config"]["model"]["hidden_dim"] is None:
        raise UserError(f"mlp head with hidden_dim null has hidden widths {model.hidden_width(heads.image_dim)} (image) "
                        f"and {model.hidden_width(heads.text_dim)} (text); the original's mlp takes one hidden_dim for both, so "
                        "export it with --format safetensors (or npz)")
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")  # a write cut short leaves no half file under the name
    try:
        _write(fmt, states, header, partial)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return path


def parser() -> argparse.ArgumentParser:
    """``python -m xclip_jax.export``'s argument parser."""
    parser = argparse.ArgumentParser(prog="python -m xclip_jax.export", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="a checkpoint directory written by train or tune")
    parser.add_argument("--format", default="torch", help="torch (default: the original's best_model.pt), "
                        "safetensors or npz")
    parser.add_argument("--out", help="the file to write (default: CHECKPOINT/best_model.pt|.safetensors|.npz)")
    parser.add_argument("--force", action="store_true", help="replace an existing file")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    return parser


def main(argv=None):
    args = parser().parse_args(argv)
    path = export_heads(args.checkpoint, args.format, args.out, args.force)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(cli(main)())
