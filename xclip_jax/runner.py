"""A trial runner: ``python -m xclip_jax.runner RESOLVED_CONFIG CACHE_DIR``.

Started by the tuning driver's process pool (``xclip_jax.pool``), never by hand. It puts the
study's data on the device once, then runs the trials the driver hands it, one after another. Each
trial runs the same ``fit`` as the training CLI, with one hook that reports to Optuna and prunes;
the trial tells Optuna how it ended (COMPLETE, PRUNED, or FAIL with its reason). A crash, a kill or
an out-of-memory death leaves the trial RUNNING, and the driver records it FAIL with the reason
from the trial's log. An unexpected error in a trial is recorded FAIL and ends the runner (its
state is not trusted for another trial); a diverged (NaN) trial fails alone.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
import traceback
from pathlib import Path

from xclip_jax.errors import cli, disk_full, exception_line


def report_and_prune(trial, num_epochs: int, parent: int):
    """The trial's hook: report each epoch's validation R@1 and ask the pruner (not after the last
    epoch: it saves nothing); stop at once when the driver that started us is gone."""

    def hook(record, fs, state):
        if os.getppid() != parent:
            raise KeyboardInterrupt("driver is gone")
        epoch = record["epoch"]
        trial.report(record["val_r1"], epoch)
        print(f"epoch {epoch}: loss {record['train_loss']:.4f} val_r1 {record['val_r1']:.4f}", flush=True)
        if epoch < num_epochs - 1 and trial.should_prune():
            return "pruned"
        return None

    return hook


class Runner:
    """The study, its data on the device, and what a trial needs; built once per process."""

    def __init__(self, config_path: str, cache_dir: str):
        import jax
        import optuna

        from xclip_jax import study as st
        from xclip_jax.data import read_cache
        from xclip_jax.runtime import STORAGE_ENV
        from xclip_jax.step import to_device
        from xclip_jax.storage import make_storage
        from xclip_jax.tune_config import load_tune_config

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        cfg = load_tune_config(config_path)
        # The driver passes the storage URL (with any password) in the environment, not in the file.
        self.cfg = cfg = dataclasses.replace(cfg, storage=os.environ.get(STORAGE_ENV, cfg.storage))
        self.study = optuna.load_study(study_name=cfg.study_name, storage=make_storage(cfg.storage),
                                       pruner=st.make_pruner(cfg), sampler=st.make_sampler(cfg))
        sets = read_cache(Path(cache_dir))
        self.train_set = sets["train"]
        self.train_data, self.val_data = to_device(sets["train"]), to_device(sets["val"])
        jax.block_until_ready((self.train_data, self.val_data))
        self.parent = os.getppid()
        spawned = float(os.environ.get("XCLIP_SPAWN_TIME", time.time()))
        self.startup_seconds = time.time() - spawned  # process start -> data on the device

    def run_trial(self, tid: int) -> dict:
        """Run trial ``tid`` to its end; returns ``{"state": ...}`` for the driver."""
        import jax
        from optuna.trial import TrialState

        from xclip_jax import checkpoint
        from xclip_jax import study as st
        from xclip_jax.config import dump_yaml, to_dict
        from xclip_jax.runtime import TRIAL_HEADER, host_name
        from xclip_jax.step import TrainingDiverged, create_train_state
        from xclip_jax.train import fit, heads_metadata, train_spec
        from xclip_jax.tune_config import trial_config

        cfg, study = self.cfg, self.study
        trial = st.open_trial(study, tid)
        number = trial.number
        train_cfg = trial_config(cfg, trial.params, trial_number=number)
        out = Path(cfg.checkpoint_dir) / f"{number:05d}"
        out.mkdir(parents=True, exist_ok=True)
        dump_yaml(train_cfg, out / "cfg.yaml", header=TRIAL_HEADER.format(number=number, study=cfg.study_name))
        attrs = {"pid": os.getpid(), "host": host_name(), "jax_backend": jax.default_backend(),
                 "xla_preallocate": os.environ.get("XLA_PYTHON_CLIENT_PREALLOCATE", "true"), "checkpoint": str(out)}
        if "CUDA_VISIBLE_DEVICES" in os.environ:
            attrs["cuda_visible_devices"] = os.environ["CUDA_VISIBLE_DEVICES"]
        for key, value in attrs.items():
            trial.set_user_attr(key, value)
        try:
            state = create_train_state(train_spec(train_cfg, self.train_set.image_dim, self.train_set.text_dim),
                                       seed=train_cfg.seed)
            hook = report_and_prune(trial, train_cfg.training.num_epochs, self.parent)
            state, fs = fit(state, self.train_data, self.val_data, num_epochs=train_cfg.training.num_epochs,
                            patience=train_cfg.training.patience, hooks=(hook,),
                            ks=tuple(train_cfg.evaluation.top_k), progress=False)
            if fs.best_params is not None:  # one checkpoint per trial, the best epoch's (pruned ones too)
                checkpoint.save_heads(out, fs.best_params, to_dict(train_cfg),
                                      heads_metadata(self.train_set, fs.best_epoch, fs.best_r1), step=fs.best_epoch)
        except TrainingDiverged as e:
            trial.set_user_attr("fail_reason", str(e))
            study.tell(number, state=TrialState.FAIL)
            print(f"FAIL: {e}", file=sys.stderr, flush=True)
            return {"state": "FAIL"}
        except Exception as e:  # the trial's own error, not whatever the log's last line happens to be
            if disk_full(str(e)):
                raise  # not the trial's fault: the driver retries its parameters and stops launching
            traceback.print_exc()
            trial.set_user_attr("fail_reason", exception_line(e))
            study.tell(number, state=TrialState.FAIL)
            raise SystemExit(1)  # this process's state is not trusted for another trial
        trial.set_user_attr("startup_seconds", round(self.startup_seconds, 3))
        trial.set_user_attr("compile_seconds", round(fs.compile_seconds, 3))
        trial.set_user_attr("train_seconds", round(fs.train_seconds(), 3))
        trial.set_user_attr("best_epoch", fs.best_epoch)
        trial.set_user_attr("stopped", fs.stopped)
        if fs.stopped == "pruned":
            study.tell(number, state=TrialState.PRUNED)
            return {"state": "PRUNED"}
        study.tell(number, fs.best_r1)
        return {"state": "COMPLETE"}


def main(argv=None):
    """Serve trials until the pool closes our stdin. SIGTERM keeps its default action: the process ends
    at once, even inside compiled code (a Python handler would run only between bytecodes, and an
    exception it raised inside a library callback could be swallowed). The driver records how the
    trial ended."""
    from xclip_jax.pool import serve, worker_setup

    worker_setup()  # the memory cap and the parent-death signal, before jax is imported
    config_path, cache_dir = argv if argv is not None else sys.argv[1:]
    runner = Runner(config_path, cache_dir)
    serve(lambda job: runner.run_trial(int(job["trial_id"])))
    return 0


if __name__ == "__main__":
    raise SystemExit(cli(main)())
