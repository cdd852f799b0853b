"""One tuning trial, in its own process: ``python -m xclip_jax.trial RESOLVED_CONFIG TRIAL_ID CACHE_DIR``.

Started by the driver (``xclip_jax.tune``), never by hand. It trains with the same
``run_training`` as the training CLI and only adds reporting to Optuna, pruning, and the trial's
user attributes. It tells Optuna how it ended (COMPLETE, PRUNED, or FAIL for a diverged loss);
a crash, a kill or an out-of-memory death leaves the trial RUNNING, and the driver records it FAIL
with the reason from this process's log.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import sys
import time
import traceback

from xclip_jax.errors import cli, disk_full, exception_line


def _die_with_parent() -> None:
    """Ask Linux to SIGTERM us when the driver dies (a lost driver must not leave orphans)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def run_trial(config_path: str, trial_id: int, cache_dir: str) -> int:
    """Run the trial; returns the process exit status (0 when Optuna was told the outcome)."""
    spawn_time = float(os.environ.get("XCLIP_SPAWN_TIME", time.time()))
    parent = os.getppid()
    _die_with_parent()
    # SIGTERM keeps its default action: the process ends at once, even inside compiled code. A Python
    # handler would run only between bytecodes, and an exception it raised inside a library callback
    # could be swallowed, letting a stopped trial run on. The driver records how the trial ended.

    from pathlib import Path

    import jax
    import optuna
    from optuna.trial import TrialState

    from xclip_jax import study as st
    from xclip_jax.config import dump_yaml, load_tune_config, trial_config
    from xclip_jax.train import TrainingDiverged, run_training
    from xclip_jax.tune import STORAGE_ENV, TRIAL_HEADER, host_name

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    cfg = load_tune_config(config_path)
    # The driver passes the storage URL (with any password) in the environment, not in the file.
    cfg = dataclasses.replace(cfg, storage=os.environ.get(STORAGE_ENV, cfg.storage))
    storage = st.make_storage(cfg.storage, cfg)
    # The study's pruner lives in this process: load it with the configured one, not Optuna's default.
    study = optuna.load_study(study_name=cfg.study_name, storage=storage, pruner=st.make_pruner(cfg),
                              sampler=st.make_sampler(cfg))
    trial = optuna.trial.Trial(study, trial_id)
    number = trial.number
    params = trial.params
    train_cfg = trial_config(cfg, params, trial_number=number)
    out = Path(cfg.checkpoint_dir) / f"{number:05d}"
    out.mkdir(parents=True, exist_ok=True)
    dump_yaml(train_cfg, out / "cfg.yaml", header=TRIAL_HEADER.format(number=number, study=cfg.study_name))
    trial.set_user_attr("pid", os.getpid())
    trial.set_user_attr("host", host_name())
    trial.set_user_attr("jax_backend", jax.default_backend())
    trial.set_user_attr("xla_preallocate", os.environ.get("XLA_PYTHON_CLIENT_PREALLOCATE", "true"))
    if "CUDA_VISIBLE_DEVICES" in os.environ:
        trial.set_user_attr("cuda_visible_devices", os.environ["CUDA_VISIBLE_DEVICES"])
    trial.set_user_attr("checkpoint", str(out))

    sets = st.read_cache(Path(cache_dir))

    def on_epoch(epoch, record, state, improved):
        if os.getppid() != parent:
            raise KeyboardInterrupt("driver is gone")
        trial.report(record["val_r1"], epoch)
        print(f"epoch {epoch}: loss {record['train_loss']:.4f} val_r1 {record['val_r1']:.4f}", flush=True)
        if epoch < train_cfg.training.num_epochs - 1 and trial.should_prune():  # the last epoch saves nothing
            return "pruned"
        return None

    try:
        summary = run_training(train_cfg, out, progress=False, on_epoch=on_epoch, sets=sets, checkpoint_dir=out,
                               write_reports=False)
    except TrainingDiverged as e:
        trial.set_user_attr("fail_reason", str(e))
        study.tell(number, state=TrialState.FAIL)
        print(f"FAIL: {e}", file=sys.stderr, flush=True)
        return 3
    except Exception as e:  # the trial's own error, not whatever the log's last line happens to be
        if disk_full(str(e)):
            raise  # not the trial's fault: the driver retries its parameters and stops launching
        traceback.print_exc()
        trial.set_user_attr("fail_reason", exception_line(e))
        study.tell(number, state=TrialState.FAIL)
        return 1
    trial.set_user_attr("startup_seconds", round(summary["data_ready_time"] - spawn_time, 3))
    trial.set_user_attr("compile_seconds", round(summary["compile_seconds"], 3))
    trial.set_user_attr("train_seconds", round(summary["train_seconds"], 3))
    trial.set_user_attr("best_epoch", summary["best_epoch"])
    trial.set_user_attr("stopped", summary["stopped"])
    if summary["stopped"] == "pruned":
        study.tell(number, state=TrialState.PRUNED)
    else:
        study.tell(number, summary["best_val_r1"])
    return 0


def main(argv=None):
    config_path, trial_id, cache_dir = argv
    return run_trial(config_path, int(trial_id), cache_dir)


if __name__ == "__main__":
    raise SystemExit(cli(main)())
