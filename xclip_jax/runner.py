"""A trial runner: ``python -m xclip_jax.runner RESOLVED_CONFIG CACHE_DIR``.

Started by the tuning driver's process pool (``xclip_jax.pool``), never by hand. It puts the
study's data on the device once, then runs the trials the driver hands it, one after another. Each
trial runs the same ``fit`` as the training CLI, with one hook that reports to Optuna and prunes;
the trial tells Optuna how it ended (COMPLETE, PRUNED, or FAIL with its reason). A crash, a kill or
an out-of-memory death leaves the trial RUNNING, and the driver records it FAIL with the reason
from the trial's log. An unexpected error in a trial is recorded FAIL and ends the runner (its
state is not trusted for another trial); a diverged (NaN) trial ends alone, PRUNED after a finite best epoch, else FAIL.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import threading
import time
import traceback
from pathlib import Path

from xclip_jax.errors import cli, disk_full, exception_line


# A trial whose loss went NaN after a finite best epoch ends PRUNED (its intermediate values feed the
# sampler and the pruner, its best epoch's checkpoint and `diverged_at` are kept), never COMPLETE: the
# study's answer must not be a configuration whose own training blew up (its final run, same seed,
# would end in the same error). One that diverged before any finite epoch is FAIL. Measured on the
# real set: benchmarks/RESULTS.md.


# The study's warm-up compiles every program key of its space when there are at most this many (a
# space padded to its largest widths has a key per head, loss and batch size; an unpadded one, far
# more: then each trial compiles its own, and the next job's ahead of it).
WARM_UP_KEYS = 48


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
    """The study, its data on the device, its compiled programs, and what a trial needs; built once
    per process and kept for every trial it runs."""

    def __init__(self, config_path: str, cache_dir: str):
        import jax
        import optuna

        from xclip_jax import study as st
        from xclip_jax.data import read_cache
        from xclip_jax.padding import study_buckets
        from xclip_jax.pool import INDEX_ENV
        from xclip_jax.programs import Programs
        from xclip_jax.runtime import STORAGE_ENV, device_info
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
        self.programs = Programs()
        self.backend = jax.default_backend()
        self.device = device_info(jax.devices()[0])  # a trial's `device` attribute: backend, card, memory
        # Compile the next trial while this one trains: worth it where the host has a core to spare
        # while training runs (a GPU trains; or fewer runners than CPU cores). Without a spare core
        # the compile takes the core another runner trains on and the study slows down (the
        # measurements: benchmarks/RESULTS.md).
        spare = self.backend != "cpu" or cfg.n_jobs < (os.cpu_count() or 1)
        self.ahead = cfg.compile_ahead if cfg.compile_ahead is not None else spare
        self.parent = os.getppid()
        self.trials_run = 0
        self.prepared: dict[int, tuple] = {}  # trial id -> what compiling it ahead cost (another thread)
        self.cca_cache: dict = {}  # (head type, output dim) -> the CCA start of this study's training set
        self.buckets = study_buckets(cfg)  # what each trial's widths pad to: its program's key
        self.warmed = [0, 0, 0.0]  # compiled by the study's warm-up and not yet counted to a trial
        self.lock = threading.Lock()
        if self.ahead and os.environ.get(INDEX_ENV) == "0":  # the pool's first runner
            threading.Thread(target=self.warm_up, name="warm-up", daemon=True).start()
        spawned = float(os.environ.get("XCLIP_SPAWN_TIME", time.time()))
        self.startup_seconds = time.time() - spawned  # process start -> data on the device (first trial)

    def warm_up(self) -> None:
        """Compile the programs of the study's every program key (``space.study_keys``: its runnable
        combinations of head, loss, batch and padded widths, when they are few) in a thread of its
        own, before the trials need them: a later trial, runner or study of the same space then finds
        them (kept here, or in the persistent cache). A trial that needs a program being compiled
        waits for it; one that fails to compile fails its trial, not this."""
        from xclip_jax import space
        from xclip_jax.plan import stored_members

        keys = space.study_keys(self.cfg, (self.train_set.image_dim, self.train_set.text_dim), self.train_set.rows,
                                WARM_UP_KEYS)
        members = stored_members(Path(self.cfg.output_dir))  # the study's memory plan: members per program
        for key in keys or ():
            before = self.programs.counters()
            try:
                self.programs.prepare(key, members.get(key, 1), self.train_data, self.val_data)
            except Exception:  # noqa: BLE001 - the trial that needs the program meets it as its own error
                return
            with self.lock:
                self.warmed = [w + after - b for w, after, b in zip(self.warmed, self.programs.counters(), before)]

    def _spec(self, trial_cfg):
        from xclip_jax.spec import RunSpec

        return RunSpec.of(trial_cfg, self.train_set.image_dim, self.train_set.text_dim)

    def _memory_line(self, error: Exception, cfgs: list) -> str | None:
        """For a job that ran out of device memory: the plan's figure for it beside the device's."""
        import jax

        from xclip_jax.memory import Rows, runner_bytes

        if "RESOURCE_EXHAUSTED" not in str(error) and "out of memory" not in str(error).lower():
            return None
        val = Rows(self.val_data.rows, self.val_data.image_NxDi.shape[0])
        planned = runner_bytes(self._key([self._spec(c) for c in cfgs]), len(cfgs),
                               Rows(self.train_set.rows, len(self.train_set.image)), val)
        stats = jax.local_devices()[0].memory_stats() or {}
        actual = (f"the device had {stats['peak_bytes_in_use'] / 2**30:.2f} GiB in use at its peak of "
                  f"{stats['bytes_limit'] / 2**30:.2f} GiB" if "bytes_limit" in stats else "the device gives no figures")
        return (f"out of device memory: the plan gave this bundle of {len(cfgs)} {planned / 2**30:.2f} GiB; {actual}; "
                f"fewer n_jobs or a smaller device_memory_gb leaves more room ({exception_line(error)[:200]})")

    def _key(self, specs: list):
        """The one program key of a job's trials (a bundle's members must share it)."""
        from xclip_jax.padding import program_key

        keys = {program_key(spec, self.buckets) for spec in specs}
        if len(keys) > 1:
            raise ValueError(f"a bundle's members must share one program (head, loss, batch, dtype, padded widths); "
                             f"got {len(keys)}")
        return keys.pop()

    def prepare(self, tids: list[int]) -> None:
        """Compile a job's programs (in the job reader's thread, while another job trains)."""
        if not self.ahead:
            return
        from xclip_jax import study as st
        from xclip_jax.tune_config import trial_config

        before = self.programs.counters()
        spec = self._spec(trial_config(self.cfg, st.trial_params(self.study, tids[0])))
        self.programs.prepare(self._key([spec]), len(tids), self.train_data, self.val_data)
        self.prepared[tids[0]] = tuple(a - b for a, b in zip(self.programs.counters(), before))

    def _open(self, trial, lead: int, size: int):
        """A trial's training config and folder (cfg.yaml written, attributes set)."""
        from xclip_jax.config import dump_yaml
        from xclip_jax.runtime import TRIAL_HEADER, host_name
        from xclip_jax.tune_config import trial_config

        train_cfg = trial_config(self.cfg, trial.params, trial_number=trial.number)
        out = Path(self.cfg.checkpoint_dir) / f"{trial.number:05d}"
        out.mkdir(parents=True, exist_ok=True)
        dump_yaml(train_cfg, out / "cfg.yaml", header=TRIAL_HEADER.format(number=trial.number, study=self.cfg.study_name))
        attrs = {"host": host_name(), "jax_backend": self.backend, "device": self.device,
                 "xla_preallocate": os.environ.get("XLA_PYTHON_CLIENT_PREALLOCATE", "true"), "checkpoint": str(out)}
        if "CUDA_VISIBLE_DEVICES" in os.environ:
            attrs["cuda_visible_devices"] = os.environ["CUDA_VISIBLE_DEVICES"]
        if size > 1:  # trained in one program with others of the same shapes; `bundle` = the lead's number
            attrs.update(bundle=lead, bundle_size=size)
        # One write each: `pid` last, so a trial that has it has the others (a runner killed between two
        # writes leaves no trial with a pid and no host).
        for key, value in {**attrs, "pid": os.getpid()}.items():
            trial.set_user_attr(key, value)
        return train_cfg, out

    def handle(self, job: dict) -> dict:
        """A job from the driver: trials to run (``trial_ids``), or finished trials to train again with
        other seeds (``rerun``: the final pick)."""
        return self.run_reruns(job["rerun"]) if "rerun" in job else self.run_job(job["trial_ids"])

    def _train(self, cfgs: list, hooks: list[tuple]) -> tuple[list, float, float]:
        """Train trial configs that share a program key as one bundle: ``(fit states, seconds getting
        the init program, the clock when the fit began)``."""
        import jax

        from xclip_jax.baselines import with_head_init
        from xclip_jax.fit import fit_bundle
        from xclip_jax.model import hparams, stack
        from xclip_jax.step import fresh_states

        t_start = time.perf_counter()
        specs = [self._spec(c) for c in cfgs]
        key = self._key(specs)
        init_fn = self.programs.init_fn(key, len(cfgs))
        init_compile = time.perf_counter() - t_start
        hp = stack([hparams(spec, c.seed) for spec, c in zip(specs, cfgs)])
        state = with_head_init(fresh_states(key, hp, init_fn), [c.model for c in cfgs], self.train_set,
                               self.cca_cache)
        jax.block_until_ready(state)
        fit_start = time.perf_counter()
        training = cfgs[0].training
        _, fit_states = fit_bundle(state, self.train_data, self.val_data, num_epochs=training.num_epochs,
                                   patience=training.patience, hooks=hooks, ks=tuple(cfgs[0].evaluation.top_k),
                                   programs=self.programs)
        return fit_states, init_compile, fit_start

    def run_reruns(self, members: list) -> dict:
        """Train finished trials again, each with another seed (``[[trial number, seed], ...]``, one
        program key): their best validation R@1 for the final pick. Nothing is told to Optuna or
        saved; a rerun's own training is the trial's (same epochs and patience, no pruning)."""
        from xclip_jax.tune_config import trial_config

        trials = {t.number: t for t in self.study.get_trials(deepcopy=False)}
        cfgs = [dataclasses.replace(trial_config(self.cfg, trials[number].params, trial_number=number), seed=seed)
                for number, seed in members]
        print(f"final pick: training trials {', '.join(str(n) for n, _ in members)} again with other seeds",
              flush=True)
        fit_states, _, _ = self._train(cfgs, [()] * len(cfgs))
        return {"reruns": [{"number": number, "seed": seed, "value": fs.best_r1 if fs.best_epoch >= 0 else None,
                            "best_epoch": fs.best_epoch, "stopped": fs.stopped}
                           for (number, seed), fs in zip(members, fit_states)], "ahead": self.ahead}

    def run_job(self, tids: list[int]) -> dict:
        """Run one trial, or a bundle of trials of one program key (``batch_trials``), to its end;
        returns ``{"states": [...], "ahead": ...}`` for the driver."""
        from optuna.trial import TrialState

        from xclip_jax import checkpoint
        from xclip_jax import study as st
        from xclip_jax.config import to_dict
        from xclip_jax.pool import rss_bytes
        from xclip_jax.step import TrainingDiverged

        t_start = time.perf_counter()
        study, programs, size = self.study, self.programs, len(tids)
        compiled_before = programs.counters()
        trials = [st.open_trial(study, tid) for tid in tids]
        opened = [self._open(trial, trials[0].number, size) for trial in trials]
        cfgs = [c for c, _ in opened]
        result = {"ahead": self.ahead}
        try:
            hooks = [(report_and_prune(t, cfgs[0].training.num_epochs, self.parent),) for t in trials]
            fit_states, init_compile, fit_start = self._train(cfgs, hooks)
            setup = fit_start - t_start - init_compile
            for trial, (train_cfg, out), fs in zip(trials, opened, fit_states):
                if fs.best_params is not None:
                    # one checkpoint per trial, the best epoch's (pruned ones, and ones that diverged
                    # after it, too)
                    checkpoint.save_heads(out, fs.best_params, to_dict(train_cfg),
                                          checkpoint.heads_metadata(self.train_set, fs.best_epoch, fs.best_r1),
                                          step=fs.best_epoch)
        except Exception as e:  # the job's own error, not whatever the log's last line happens to be
            if disk_full(str(e)):
                raise  # not the trials' fault: the driver retries their parameters and stops launching
            traceback.print_exc()
            reason = self._memory_line(e, cfgs) or exception_line(e)
            for trial in trials:
                trial.set_user_attr("fail_reason", reason)
                study.tell(trial.number, state=TrialState.FAIL)
            raise SystemExit(1)  # this process's state is not trusted for another trial
        ahead = self.prepared.pop(tids[0], (0, 0, 0.0))  # compiled for this job while the previous one trained
        with self.lock:  # and the study's warm-up's compiles since the last job: the study counts them all
            warmed, self.warmed = self.warmed, [0, 0, 0.0]
        compiled, hits, _ = (after - before + early + warm for after, before, early, warm
                             in zip(programs.counters(), compiled_before, ahead, warmed))
        runner_startup, self.startup_seconds = self.startup_seconds, 0.0
        shared = {  # the job's costs, each member its share
            # spawn -> data on the device for a runner's first job, then the job's own set-up
            "startup_seconds": (runner_startup + setup) / size,
            "compile_seconds": (init_compile + sum(fs.compile_seconds for fs in fit_states)) / size,
            "programs_compiled": compiled / size,
            "compile_cache_hits": hits / size,
        }
        states = []
        for trial, fs in zip(trials, fit_states):
            timings = {**shared, "train_seconds": fs.train_seconds(), "eval_seconds": fs.eval_seconds(),
                       "runner_trial": self.trials_run, "runner_rss_mb": rss_bytes(os.getpid()) >> 20,
                       "best_epoch": fs.best_epoch, "stopped": fs.stopped,
                       "rows_trained": self.train_set.rows * len(fs.history)}
            for key, value in timings.items():
                trial.set_user_attr(key, round(value, 3) if isinstance(value, float) else value)
            diverged = fs.stopped.startswith("diverged")
            if diverged:  # a numbers problem of this trial, not of the process: the runner goes on
                trial.set_user_attr("diverged_at", int(fs.stopped.rsplit(" ", 1)[1]))
            if diverged and fs.best_epoch < 0:  # nothing finite to keep
                reason = str(TrainingDiverged.at(fs.stopped))
                trial.set_user_attr("fail_reason", reason)
                study.tell(trial.number, state=TrialState.FAIL)
                print(f"FAIL: trial {trial.number}: {reason}", file=sys.stderr, flush=True)
                states.append("FAIL")
            elif diverged or fs.stopped == "pruned":
                study.tell(trial.number, state=TrialState.PRUNED)
                states.append("PRUNED")
            else:
                study.tell(trial.number, fs.best_r1)
                states.append("COMPLETE")
        self.trials_run += 1
        return {**result, "states": states}


def main(argv=None):
    """Serve trials until the pool closes our stdin. SIGTERM keeps its default action: the process ends
    at once, even inside compiled code (a Python handler would run only between bytecodes, and an
    exception it raised inside a library callback could be swallowed). The driver records how the
    trial ended."""
    from xclip_jax.pool import serve

    config_path, cache_dir = argv if argv is not None else sys.argv[1:]

    def start():  # after the pool's worker set-up (memory cap, parent-death signal): jax is imported here
        runner = Runner(config_path, cache_dir)
        return runner.handle, (lambda job: runner.prepare(job["trial_ids"]) if "trial_ids" in job else None)

    serve(start)
    return 0


if __name__ == "__main__":
    raise SystemExit(cli(main)())
