"""``python -m xclip_jax.data {synth,split,convert,check} ...``: create, split, convert and check sets."""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import numpy as np

from xclip_jax.data.files import (
    IMAGE_SUFFIX,
    METADATA_SUFFIX,
    TEXT_SUFFIX,
    _set_exists,
    _write_npy,
    load_named_set,
    read_array,
    save_set,
)
from xclip_jax.data.sets import describe
from xclip_jax.data.splits import split_train_test, tuning_subset
from xclip_jax.data.synthetic import DEFAULT_NOISE, DEFAULT_NONLINEARITY, synthetic_splits
from xclip_jax.errors import UserError, cli


def _cmd_synth(args) -> None:
    t0 = time.perf_counter()
    sets = synthetic_splits(
        n_images=args.images,
        captions_per_image=args.captions,
        image_dim=args.image_dim,
        text_dim=args.text_dim,
        val_images=args.val_images,
        test_images=args.test_images,
        noise=args.noise,
        nonlinearity=args.nonlinearity,
        fold=args.fold,
        seed=args.seed,
    )
    train = sets["train"]
    sets["train_tuning"] = train.subset_rows(tuning_subset(train.rows, args.tuning_size), "train_tuning")
    for name in ("train", "train_tuning", "val", "test"):
        save_set(args.out, sets[name])
        print(describe(sets[name]))
    seconds = time.perf_counter() - t0
    print(f"wrote synthetic sets (noise {args.noise}, seed {args.seed}) to {args.out} in {seconds:.1f}s")


def _cmd_split(args) -> None:
    source_dir = Path(args.source_dir)
    out = Path(args.out) if args.out is not None else source_dir
    source = load_named_set(source_dir, args.source, fix=(
        f"split reads the source set from --source-dir and --source (here {source_dir} and {args.source!r}): "
        f"point them at the set to split, e.g. --source train2017"))
    print(f"source {describe(source)}")
    row_ids = source.image_ids[source.row_image]
    train_idx, test_idx = split_train_test(row_ids, args.test_ratio, args.seed)
    shared = np.intersect1d(row_ids[train_idx], row_ids[test_idx])
    if shared.size:
        raise UserError(
            f"{source_dir}/{args.source}: leakage check failed, {shared.size} image ids in both train and test "
            f"(e.g. {shared[0]}); nothing was written, please report this as a bug"
        )
    print(
        f"leakage check: 0 shared image ids between train ({np.unique(row_ids[train_idx]).size:,} images) "
        f"and test ({np.unique(row_ids[test_idx]).size:,} images)"
    )
    tuning_idx = train_idx[tuning_subset(train_idx.size, args.tuning_size, args.tuning_seed)]
    for name, rows in (("train", train_idx), ("test", test_idx), ("train_tuning", tuning_idx)):
        save_set(out, source, name, rows)
        n_images = np.unique(source.row_image[rows]).size
        print(f"{name}: {rows.size:,} rows, {n_images:,} images")

    same_files = out.resolve() == source_dir.resolve() and args.val_source == "val"
    if same_files:
        print("val: already in place")
    elif _set_exists(source_dir, args.val_source):
        val = load_named_set(source_dir, args.val_source)
        save_set(out, val, "val")
        print(f"val (from {args.val_source}): {val.rows:,} rows, {val.n_images:,} images")
    else:
        print(f"val: no '{args.val_source}' set in {source_dir}, skipped (choose one with --val-source NAME)")
    print(f"wrote train, test, train_tuning{'' if same_files else ', val'} to {out}")


def _cmd_convert(args) -> None:
    src = Path(args.dir)
    out = Path(args.out) if args.out is not None else src
    if not src.is_dir():
        raise UserError(f"{src}: folder not found; pass the folder that holds the .pt/.safetensors files")
    files = sorted(
        p
        for p in src.iterdir()
        if p.suffix in (".pt", ".safetensors") and p.stem.endswith((IMAGE_SUFFIX, TEXT_SUFFIX))
    )
    if not files:
        raise UserError(
            f"{src}: no NAME_image_embeddings / NAME_text_embeddings .pt or .safetensors files to convert"
        )
    out.mkdir(parents=True, exist_ok=True)
    names = set()
    for path in files:
        array = read_array(path)
        target = out / f"{path.stem}.npy"
        _write_npy(target, array.shape[0], array.shape[1], lambda c: array[c])
        names.add(path.stem.removesuffix(IMAGE_SUFFIX).removesuffix(TEXT_SUFFIX))
        print(f"{path} -> {target} {tuple(array.shape)}")
    for name in sorted(names):
        metadata = src / f"{name}{METADATA_SUFFIX}"
        if out.resolve() != src.resolve() and metadata.is_file():
            shutil.copyfile(metadata, out / metadata.name)
        if (out / metadata.name).is_file():
            print(f"check: {describe(load_named_set(out, name))}")


def _cmd_check(args) -> None:
    print(f"{describe(load_named_set(args.dir, args.name))}; no NaN/Inf; OK")


def parser() -> argparse.ArgumentParser:
    """``python -m xclip_jax.data``'s argument parser (one subcommand each: synth, split, convert, check)."""
    parser = argparse.ArgumentParser(
        prog="python -m xclip_jax.data",
        description="Create, split, convert and check embedding sets (add --debug for tracebacks).",
    )
    debug = argparse.ArgumentParser(add_help=False)
    debug.add_argument("--debug", action="store_true", help="show the traceback of an error")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("synth", parents=[debug], help="write synthetic train, train_tuning, val and test sets")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--images", type=int, default=20_000, help="train images (default 20000)")
    p.add_argument("--captions", type=int, default=5, help="captions per image (default 5)")
    p.add_argument("--image-dim", type=int, default=768, help="image embedding width (default 768)")
    p.add_argument("--text-dim", type=int, default=1024, help="text embedding width (default 1024)")
    p.add_argument("--val-images", type=int, default=1_000, help="validation images (default 1000)")
    p.add_argument("--test-images", type=int, default=1_000, help="test images (default 1000)")
    p.add_argument(
        "--noise", type=float, default=DEFAULT_NOISE, help=f"noise-to-signal ratio (default {DEFAULT_NOISE})"
    )
    p.add_argument("--nonlinearity", type=float, default=DEFAULT_NONLINEARITY,
                   help=f"how far from linear the image-text relation is (default {DEFAULT_NONLINEARITY})")
    p.add_argument("--fold", type=float, default=0.0,
                   help="share of latent coordinates the captions see only by magnitude, which no linear map "
                        "recovers (default 0)")
    p.add_argument("--seed", type=int, default=0, help="the generator's seed (default 0)")
    p.add_argument("--tuning-size", type=int, default=100_000, help="rows in train_tuning (default 100000)")
    p.set_defaults(run=_cmd_synth)

    p = sub.add_parser("split", parents=[debug], help="image-level train/test split, tuning subset and val copy")
    p.add_argument("--source-dir", required=True, help="folder holding the source set")
    p.add_argument("--source", default="train2017", help="set to split (default train2017)")
    p.add_argument("--out", default=None, help="output folder (default: --source-dir)")
    p.add_argument("--test-ratio", type=float, default=0.2, help="share of the images that go to test (default 0.2)")
    p.add_argument("--seed", type=int, default=42, help="seed of the train/test split (default 42)")
    p.add_argument("--tuning-size", type=int, default=100_000, help="rows in train_tuning (default 100000)")
    p.add_argument("--tuning-seed", type=int, default=42, help="seed of the tuning subset (default 42)")
    p.add_argument("--val-source", default="val2017", help="set copied to 'val' when present (default val2017)")
    p.set_defaults(run=_cmd_split)

    p = sub.add_parser("convert", parents=[debug], help="convert .pt/.safetensors embedding files to .npy")
    p.add_argument("dir", help="folder with NAME_image_embeddings.pt etc.")
    p.add_argument("--out", default=None, help="output folder (default: the same folder)")
    p.set_defaults(run=_cmd_convert)

    p = sub.add_parser("check", parents=[debug], help="load and validate one set")
    p.add_argument("dir", help="data folder")
    p.add_argument("name", help="set name, e.g. train")
    p.set_defaults(run=_cmd_check)
    return parser


@cli
def main(argv=None) -> None:
    """Command-line entry point: ``python -m xclip_jax.data {synth,split,convert,check} ...``."""
    args = parser().parse_args(argv)
    args.run(args)
