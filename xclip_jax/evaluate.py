"""``python -m xclip_jax.evaluate CHECKPOINT [--set test|val|NAME] [--data-dir DIR] [--out FILE]``.

Restores trained heads, projects an embedding set and prints COCO-style retrieval metrics
(images de-duplicated), writing them as JSON too.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from xclip_jax.errors import UserError, cli


def evaluate_checkpoint(checkpoint_dir, split: str = "test", data_dir: str | None = None) -> dict:
    """Metrics of a checkpoint's heads on ``split`` (a split of its config, or a set NAME in ``data_dir``)."""
    from xclip_jax import checkpoint, data
    from xclip_jax.metrics import retrieval_metrics_indexed
    from xclip_jax.train import load_sets

    heads = checkpoint.restore(checkpoint_dir)
    cfg = heads.config
    if data_dir is not None:
        eset = data.load_named_set(data_dir, split)
    elif split not in ("train", "val", "test"):
        raise UserError(f"--set {split}: a set NAME needs --data-dir DIR (with {split}_image_embeddings.npy etc.); "
                        "without it use test, val or train")
    else:
        sets = load_sets(cfg, splits=(split,))
        if split not in sets:
            raise UserError(f"the checkpoint's config names no {split!r} set; pass --data-dir DIR with "
                            f"{split}_image_embeddings.npy etc.")
        eset = sets[split]
    if (eset.image_dim, eset.text_dim) != (heads.image_dim, heads.text_dim):
        raise UserError(f"set {split!r} has dims {eset.image_dim}/{eset.text_dim} but the heads take "
                        f"{heads.image_dim}/{heads.text_dim}; evaluate on embeddings from the same encoders")
    zi = heads.encode_images(eset.image)
    zt = heads.encode_texts(eset.text)
    return retrieval_metrics_indexed(zi, zt, eset.row_image, ks=tuple(cfg.evaluation.top_k))


def metrics_path(checkpoint_dir, split: str) -> Path:
    """Where ``evaluate`` writes a checkpoint's metrics on ``split`` by default: inside the checkpoint's
    own folder (a trial's ``checkpoints/00022/``, a run's ``checkpoint/``), so that every checkpoint
    and set gets its own file. A step folder (``checkpoint/3``) is replaced by the next save: its
    metrics go to the folder that holds it."""
    folder = Path(checkpoint_dir).absolute()
    if folder.name.isdigit() and (folder / "meta").exists():
        folder = folder.parent
    return folder / f"metrics_{split}.json"


def main(argv=None):
    from xclip_jax.metrics import format_table

    parser = argparse.ArgumentParser(prog="python -m xclip_jax.evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="a checkpoint directory written by train or tune")
    parser.add_argument("--set", default="test", help="test, val, or a set NAME (with --data-dir)")
    parser.add_argument("--data-dir", help="folder with NAME_image_embeddings.* etc.")
    parser.add_argument("--out", help="JSON output (default: CHECKPOINT/metrics_<set>.json, one per checkpoint and set)")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    args = parser.parse_args(argv)
    metrics = evaluate_checkpoint(args.checkpoint, args.set, args.data_dir)
    print(f"{args.set}:\n{format_table(metrics)}")
    out = Path(args.out) if args.out else metrics_path(args.checkpoint, args.set)
    out.write_text(json.dumps(metrics, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(cli(main)())
