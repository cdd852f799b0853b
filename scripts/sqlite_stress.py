"""How many trial processes can report to one SQLite study at once without a lock failure?

    python scripts/sqlite_stress.py --procs 4 8 16 32 --reports 40

Each process does what a trial process does with the storage, as fast as it can: load the study,
ask a trial's parameters through our storage settings, report an intermediate value per "epoch"
(with the pruner's reads), set user attributes, and tell the result. Prints, per process count,
failures (any exception, "database is locked" included) and the wall time.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import sys
import tempfile
import time
from pathlib import Path


def worker(url: str, reports: int, queue, plain: bool = False) -> None:
    import optuna

    from xclip_jax import study as st
    from xclip_jax.config import DataConfig, SyntheticData
    from xclip_jax.storage import make_storage
    from xclip_jax.tune_config import TuneConfig

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    try:
        cfg = TuneConfig(storage=url, data=DataConfig(synthetic=SyntheticData()))
        storage = optuna.storages.RDBStorage(url) if plain else make_storage(url)
        study = optuna.load_study(study_name="stress", storage=storage, pruner=st.make_pruner(cfg))
        trial = study.ask()
        trial.suggest_float("x", 0.0, 1.0)
        for epoch in range(reports):
            trial.report(epoch * 0.01, epoch)
            trial.set_user_attr(f"attr{epoch % 4}", epoch)
            trial.should_prune()
        study.tell(trial, 1.0)
        queue.put(None)
    except Exception as e:  # every failure counts, whatever it is
        queue.put(f"{type(e).__name__}: {str(e).splitlines()[0]}")


def run(procs: int, reports: int, plain: bool = False) -> tuple[int, float, list[str]]:
    import optuna

    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{Path(tmp) / 'stress.db'}"
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        optuna.create_study(study_name="stress", storage=url, direction="maximize")
        queue = mp.get_context("spawn").Queue()
        ctx = mp.get_context("spawn")
        workers = [ctx.Process(target=worker, args=(url, reports, queue, plain)) for _ in range(procs)]
        t0 = time.perf_counter()
        for w in workers:
            w.start()
        errors = [e for e in (queue.get() for _ in workers) if e]
        for w in workers:
            w.join()
        return procs, time.perf_counter() - t0, errors


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--procs", type=int, nargs="+", default=[4, 8, 16, 32])
    parser.add_argument("--reports", type=int, default=40)
    parser.add_argument("--plain", action="store_true", help="Optuna's default SQLite settings, for comparison")
    args = parser.parse_args()
    print("| processes | reports each | failures | wall s |\n|---|---|---|---|")
    worst = 0
    for n in args.procs:
        procs, wall, errors = run(n, args.reports, args.plain)
        print(f"| {procs} | {args.reports} | {len(errors)} | {wall:.1f} |", flush=True)
        for e in sorted(set(errors)):
            print(f"  failure: {e}")
        worst = max(worst, len(errors))
    return 1 if worst else 0


if __name__ == "__main__":
    sys.exit(main())
