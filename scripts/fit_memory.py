"""Resident memory of one process over many fits, each without a kept ``Programs`` (as the training
CLI, or a notebook calling ``fit`` in a loop, runs them): whether the programs of finished fits are
freed. Each fit has its own output width, so each compiles its own programs.

    python scripts/fit_memory.py [--fits 50] [--out FILE]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import time


def rss_mb() -> float:
    with open(f"/proc/{os.getpid()}/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--fits", type=int, default=50, help="fits in one process (default 50)")
    parser.add_argument("--out", help="also write the per-fit figures as JSON here")
    args = parser.parse_args(argv)

    from xclip_jax import data
    from xclip_jax.fit import fit
    from xclip_jax.spec import HeadSpec, LossSpec, RunSpec, TrainingSpec
    from xclip_jax.step import create_train_state, to_device

    sets = data.synthetic_splits(n_images=400, captions_per_image=5, image_dim=32, text_dim=48, val_images=100,
                                 test_images=10, seed=0)
    train, val = to_device(sets["train"]), to_device(sets["val"])
    rows = []
    start = time.perf_counter()
    for i in range(args.fits):
        spec = RunSpec(HeadSpec("mlp", 8 + i, 64), LossSpec(), TrainingSpec(batch_size=256), 32, 48)
        fit(create_train_state(spec, seed=i), train, val, num_epochs=1, patience=1, progress=False)
        gc.collect()
        rows.append({"fit": i + 1, "rss_mb": round(rss_mb(), 1), "seconds": round(time.perf_counter() - start, 1)})
        if (i + 1) % 10 == 0 or i == 0:
            print(f"after fit {i + 1:3d}: resident {rows[-1]['rss_mb']:.1f} MB ({rows[-1]['seconds']:.0f} s)", flush=True)
    growth = (rows[-1]["rss_mb"] - rows[0]["rss_mb"]) / max(len(rows) - 1, 1)
    print(f"resident memory: {rows[0]['rss_mb']:.1f} MB after the first fit, {rows[-1]['rss_mb']:.1f} MB after "
          f"{len(rows)}: {growth:.2f} MB per fit")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"fits": rows, "mb_per_fit": round(growth, 3)}, fh, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
