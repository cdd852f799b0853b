"""``python -m xclip_jax.baselines``: the baselines' table for any training or tuning config, or (what
a tuning study runs in a child process) the results of a driver's data cache as JSON."""

from __future__ import annotations

import jax
import numpy as np

from xclip_jax.baselines.search import compute_baselines, format_baselines


def _load_config(path):
    from xclip_jax.config import load_train_config, read_yaml
    from xclip_jax.tune_config import load_tune_config

    raw = read_yaml(path)
    return load_tune_config(path) if {"search_space", "study_name", "n_trials"} & set(raw) else load_train_config(path)


def parser():
    """``python -m xclip_jax.baselines``' argument parser."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m xclip_jax.baselines",
        description="Fit the closed-form linear baselines (ridge both ways, CCA, Procrustes after whitening) on a "
                    "config's training set, choose each one's parameter on its validation set, and print val and "
                    "test Recall@K: what a tuned head has to beat. A choice at the end of its grid is extended past "
                    "it, and noted under the table when it stays there.")
    parser.add_argument("config", nargs="?", help="a training or tuning YAML; its data section names the sets")
    parser.add_argument("--cache", help="a tuning driver's data cache folder, read instead of a config's data")
    parser.add_argument("--out", help="also write the results (every baseline, its search and metrics) as JSON here")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    return parser


def main(argv=None):
    """``python -m xclip_jax.baselines CONFIG`` (a training or tuning config) prints the baselines'
    table; ``--cache DIR --out FILE`` (what a tuning study runs) reads a driver's data cache and
    writes the results as JSON."""
    import json
    from pathlib import Path

    from xclip_jax import data

    cli = parser()
    args = cli.parse_args(argv)
    if args.cache:
        splits = data.cached_splits(Path(args.cache))
        sets = data.read_cache(Path(args.cache), splits=splits)
    elif args.config:
        cfg = _load_config(args.config)
        sets = data.load_sets(cfg.data, cfg.base_data_dir)
    else:
        cli.error("give a config, or --cache DIR")
    results = compute_baselines(sets["train"], sets["val"], sets.get("test"))
    print(format_baselines(results))
    if args.out:
        tmp = Path(args.out).with_suffix(".tmp")
        tmp.write_text(json.dumps(jax.tree.map(lambda x: float(x) if isinstance(x, np.floating) else x, results),
                                  indent=2))
        tmp.replace(args.out)
    return 0
