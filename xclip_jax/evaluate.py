"""Evaluating trained heads: the training run's final evaluation, and
``python -m xclip_jax.evaluate CHECKPOINT [--set test|val|NAME] [--data-dir DIR] [--out FILE]``.

Restores trained heads, projects an embedding set and gives COCO-style retrieval metrics (images
de-duplicated, cosine similarity); the training run also writes the features and pictures its
config's ``evaluation:`` section asks for.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from xclip_jax.errors import UserError, cli

# A similarity matrix larger than this is not written (the features are, and it is one product away).
MAX_SIMILARITY_BYTES = 2 << 30


def write_evaluation(cfg, spec, params, sets: dict, out_dir: Path) -> dict:
    """The final evaluation of a training run: test and val metrics of ``params``, and on the test
    set (val when there is none) the features (``save_features``) and pictures
    (``visualization_samples``) the config asks for. Returns ``{split: metrics}``."""
    from xclip_jax.metrics import retrieval_metrics_indexed
    from xclip_jax.encode import project
    from xclip_jax.step import to_device

    ev = cfg.evaluation
    shown = "test" if "test" in sets else "val"
    metrics = {}
    for split in ("test", "val"):
        if split not in sets:
            continue
        split_data = to_device(sets[split])
        zi, zt = project(params, spec, split_data)
        metrics[split] = retrieval_metrics_indexed(zi, zt, split_data.row_image_R, ks=tuple(ev.top_k))
        if split != shown:
            continue
        if ev.save_features:
            save_features(zi, zt, split_data.row_image_R, Path(out_dir) / "features", split)
        if ev.visualization_samples:
            from xclip_jax.figures import embedding_figures

            embedding_figures(zi, zt, np.asarray(split_data.row_image_R), samples=ev.visualization_samples,
                              perplexity=ev.tsne_perplexity, out_dir=out_dir, prefix=split, seed=cfg.seed)
    return metrics


def save_features(zi_NxD, zt_TxD, row_image_T, out_dir, split: str, announce=print) -> list:
    """The projected features of a set and their cosine similarity matrix, as .npy files in ``out_dir``:
    ``{split}_image_features`` [N unique images, D], ``{split}_text_features`` [T captions, D],
    ``{split}_row_image`` [T] (the image of each caption) and ``{split}_similarity`` [N, T]."""
    import jax

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, array in (("image_features", zi_NxD), ("text_features", zt_TxD), ("row_image", row_image_T)):
        written.append(out_dir / f"{split}_{name}.npy")
        np.save(written[-1], np.asarray(array))
    n, t = zi_NxD.shape[0], zt_TxD.shape[0]
    if 4 * n * t > MAX_SIMILARITY_BYTES:
        if announce:
            announce(f"features: {split}_similarity.npy skipped ({n:,} x {t:,} floats is over "
                     f"{MAX_SIMILARITY_BYTES >> 30} GiB); it is image_features @ text_features.T")
        return written
    written.append(out_dir / f"{split}_similarity.npy")
    sim = np.lib.format.open_memmap(written[-1], mode="w+", dtype=np.float32, shape=(n, t))
    similarity = jax.jit(lambda a, b: a @ b.T)
    chunk = max(1, (64 << 20) // (4 * t))
    with jax.default_matmul_precision("highest"):
        for start in range(0, n, chunk):
            sim[start:start + chunk] = np.asarray(similarity(zi_NxD[start:start + chunk], zt_TxD))
    sim.flush()
    del sim
    return written


def evaluate_checkpoint(checkpoint_dir, split: str = "test", data_dir: str | None = None) -> dict:
    """Metrics of a checkpoint's heads on ``split`` (a split of its config, or a set NAME in ``data_dir``);
    ``test`` where the config names no test set is its val set (said in one line)."""
    return _evaluate(checkpoint_dir, split, data_dir)[1]


def _evaluate(checkpoint_dir, split: str, data_dir: str | None, announce=print) -> tuple[str, dict]:
    """``(the split evaluated, its metrics)``: see :func:`evaluate_checkpoint`."""
    from xclip_jax import checkpoint, data
    from xclip_jax.metrics import retrieval_metrics_indexed

    heads = checkpoint.restore(checkpoint_dir)
    cfg = heads.config
    if data_dir is not None:
        eset = data.load_named_set(data_dir, split)
    elif split not in data.SPLITS:
        raise UserError(f"--set {split}: a set NAME needs --data-dir DIR (with {split}_image_embeddings.npy etc.); "
                        "without it use test, val or train")
    else:
        if split == "test" and (missing := data.no_test_set(cfg.data, cfg.base_data_dir)):
            if announce:
                announce(f"{missing}; evaluating on the val set instead")
            split = "val"
        sets = data.load_sets(cfg.data, cfg.base_data_dir, splits=(split,))
        if split not in sets:
            raise UserError(f"the checkpoint's config names no {split!r} set; pass --data-dir DIR with "
                            f"{split}_image_embeddings.npy etc.")
        eset = sets[split]
    if (eset.image_dim, eset.text_dim) != (heads.image_dim, heads.text_dim):
        raise UserError(f"set {split!r} has dims {eset.image_dim}/{eset.text_dim} but the heads take "
                        f"{heads.image_dim}/{heads.text_dim}; evaluate on embeddings from the same encoders")
    zi = heads.encode_images(eset.image)
    zt = heads.encode_texts(eset.text)
    return split, retrieval_metrics_indexed(zi, zt, eset.row_image, ks=tuple(cfg.evaluation.top_k))


def metrics_path(checkpoint_dir, split: str) -> Path:
    """Where ``evaluate`` writes a checkpoint's metrics on ``split`` by default: inside the checkpoint's
    own folder (a trial's ``checkpoints/00022/``, a run's ``checkpoint/``), so that every checkpoint
    and set gets its own file. A step folder (``checkpoint/3``) is replaced by the next save: its
    metrics go to the folder that holds it."""
    folder = Path(checkpoint_dir).absolute()
    if folder.name.isdigit() and (folder / "meta").exists():
        folder = folder.parent
    return folder / f"metrics_{split}.json"


def parser() -> argparse.ArgumentParser:
    """``python -m xclip_jax.evaluate``'s argument parser."""
    parser = argparse.ArgumentParser(
        prog="python -m xclip_jax.evaluate",
        description="Retrieval metrics of trained heads: restore a checkpoint, project an embedding set (its "
                    "config's test or val split, or a set NAME in --data-dir) and print R@K both ways, median "
                    "ranks and mean recall on de-duplicated images; the metrics are also written as JSON.")
    parser.add_argument("checkpoint", help="a checkpoint directory written by train or tune")
    parser.add_argument("--set", default="test", metavar="SET",
                        help="test (val where the config names no test set), val, or a set NAME (with --data-dir)")
    parser.add_argument("--data-dir", metavar="DIR", help="folder with NAME_image_embeddings.* etc.")
    parser.add_argument("--out", metavar="FILE", help="JSON output (default: CHECKPOINT/metrics_<set>.json, one per checkpoint and set)")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    return parser


def main(argv=None):
    from xclip_jax.metrics import format_table

    args = parser().parse_args(argv)
    split, metrics = _evaluate(args.checkpoint, args.set, args.data_dir)
    print(f"{split}:\n{format_table(metrics)}")
    out = Path(args.out) if args.out else metrics_path(args.checkpoint, split)
    out.write_text(json.dumps(metrics, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(cli(main)())
