#!/usr/bin/env python
"""The memory plan's formula (``xclip_jax.memory``) against XLA's own analysis of the compiled programs.

    python scripts/plan_check.py [--only small|mid|coco] [--out PATH]

For a grid of program keys (every head with every loss at small dims, one and four members; every
head at mid and COCO-like dims, image 1152 / text 4096, batch 8192, 100,000 rows, one and four
members; an mlp with the largest queue), compiles the epoch and the validation programs from
abstract shapes (nothing is allocated or run), reads ``memory_analysis()`` (arguments +
temporaries) and prints the formula's figure over XLA's for each: the tests hold it to 0.8-1.5x on a
few of these cases, this is the whole grid (a few minutes at small dims, about a minute a case at
COCO's). Writes the records as JSON lines.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from xclip_jax import memory  # noqa: E402
from xclip_jax.memory import Rows  # noqa: E402
from xclip_jax.programs import analysed_bytes  # noqa: E402
from xclip_jax.spec import ProgramKey  # noqa: E402

HEADS = ("siglip", "clip", "mlp", "attention", "linear")
LOSSES = ("softmax_infonce", "sigmoid_infonce", "queue_infonce")
DIMS = {  # image, text, output, hidden, attention layers and heads, queue, batch; train rows/images, val
    "small": ((64, 96, 32, 48, 2, 4, 512, 128), Rows(2000, 400), Rows(500, 100)),
    "mid": ((384, 768, 256, 512, 2, 8, 4096, 1024), Rows(20_000, 20_000), Rows(2000, 2000)),
    "coco": ((1152, 4096, 1024, 2048, 3, 16, 32768, 8192), Rows(100_000, 20_000), Rows(25_000, 5000)),
}


def key_of(head, loss, dims) -> ProgramKey:
    di, dt, out, hidden, layers, heads, queue, batch = dims
    return ProgramKey(head=head, image_dim=di, text_dim=dt, output_dim=out,
                      hidden=(hidden, hidden) if head in ("clip", "mlp") else (0, 0),
                      num_layers=layers if head == "attention" else 0, num_heads=heads if head == "attention" else 0,
                      loss=loss, queue_size=queue if loss == "queue_infonce" else 0, batch_size=batch)


def grid(only=None):
    for tag, (dims, train, val) in DIMS.items():
        if only and tag != only:
            continue
        pairs = ([(h, l) for h in HEADS for l in LOSSES] if tag == "small"
                 else [(h, "softmax_infonce") for h in HEADS] + [("mlp", "queue_infonce")])
        for head, loss in pairs:
            for members in (1, 4):
                yield tag, key_of(head, loss, dims), members, train, val


def measure(key: ProgramKey, members: int, train: Rows, val: Rows) -> dict:
    planned = {"epoch": memory.epoch_bytes(key, members, train), "eval": memory.eval_bytes(key, members, val)}
    return {"xla": analysed_bytes(key, members, train, val), "planned": planned,
            "runner_bytes": memory.runner_bytes(key, members, train, val)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=tuple(DIMS))
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "plan_check.jsonl"))
    args = parser.parse_args()
    ratios = []
    with open(args.out, "w") as out:
        print("| dims | head | loss | members | epoch: planned / XLA (GB) | ratio | validation: planned / XLA (GB) | ratio |")
        print("|---|---|---|---:|---:|---:|---:|---:|")
        for tag, key, members, train, val in grid(args.only):
            t0 = time.perf_counter()
            r = measure(key, members, train, val)
            ratio = {k: r["planned"][k] / r["xla"][k] for k in ("epoch", "eval")}
            ratios += ratio.values()
            print(f"| {tag} | {key.head} | {key.loss} | {members} | {r['planned']['epoch'] / 1e9:.3f} / "
                  f"{r['xla']['epoch'] / 1e9:.3f} | {ratio['epoch']:.2f} | {r['planned']['eval'] / 1e9:.3f} / "
                  f"{r['xla']['eval'] / 1e9:.3f} | {ratio['eval']:.2f} |", flush=True)
            out.write(json.dumps({"dims": tag, "key": key.__dict__, "members": members, **r,
                                  "seconds": round(time.perf_counter() - t0, 1)}) + "\n")
    print(f"\nplanned / XLA over {len(ratios)} programs: {min(ratios):.2f}-{max(ratios):.2f}")
    return 0 if all(0.8 <= r <= 1.5 for r in ratios) else 1


if __name__ == "__main__":
    raise SystemExit(main())
