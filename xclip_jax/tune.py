"""The tuning driver: ``python -m xclip_jax.tune CONFIG [overrides]``.

It asks Optuna for trials and runs each in its own process (``xclip_jax.trial``), at most
``n_jobs`` at once, sharing the card (no preallocation) and a persistent compilation cache. It
keeps the trials' heartbeats, records crashed or killed trials as FAIL with their reason, fails
stale trials of lost drivers (their parameters are retried once), stops cleanly on Ctrl-C, and
writes the study's outputs. Rerunning the same command resumes toward ``n_trials``.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from xclip_jax.errors import UserError, cli, disk_full


def host_name() -> str:
    """This machine's name in trial attributes (``XCLIP_HOSTNAME`` overrides, e.g. in containers)."""
    return os.environ.get("XCLIP_HOSTNAME") or socket.gethostname()


def _limit_memory(limit_bytes: int):
    def apply():
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (limit_bytes, limit_bytes))

    return apply


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _log_tail(path: Path, size: int = 65536) -> str:
    """The last ``size`` bytes of a trial's log (library messages can be long, and shutdown noise
    may follow the error that matters)."""
    try:
        with open(path, "rb") as fh:
            fh.seek(max(fh.seek(0, os.SEEK_END) - size, 0))
            return fh.read().decode(errors="replace")
    except OSError:
        return ""


def _exit_reason(rc: int, log_tail: str) -> str:
    lines = [ln.strip() for ln in log_tail.splitlines() if ln.strip()]
    last = lines[-1][:300] if lines else ""
    if rc < 0:
        name = signal.Signals(-rc).name if -rc in signal.Signals._value2member_map_ else str(-rc)
        why = f"killed by {name}"
        if -rc == signal.SIGKILL:
            why += " (out of memory, or killed by hand)"
        return f"{why}; last output: {last}" if last else why
    return f"exit status {rc}: {last}" if last else f"exit status {rc}"


def check_writable(directory: Path) -> None:
    """Fail before any trial when an output folder can't be written."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".write_test_{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise UserError(f"{directory}: not writable ({e.strerror}); choose another output_dir/checkpoint_dir "
                        "or fix its permissions") from None


TRIAL_HEADER = "# trial {number} of study {study}\n"  # the first line of each trial's cfg.yaml


def claim_checkpoint_dir(directory: Path, study_name: str) -> None:
    """Mark ``directory`` as this study's; refuse one that holds another study's trial checkpoints
    (trial numbers restart at 0 in every study, so a second study would overwrite them)."""
    marker = directory / ".study_name"
    if marker.exists():
        owner = marker.read_text().strip()
    else:  # a folder from before the marker: a trial's cfg.yaml names its study in TRIAL_HEADER
        first = min(directory.glob("[0-9]*/cfg.yaml"), default=None)
        header = first.read_text().split("\n", 1)[0] if first else ""
        owner = header.split(" of study ", 1)[1].strip() if " of study " in header else study_name
    if owner != study_name:
        raise UserError(f"checkpoint_dir {directory} holds the trial checkpoints of study '{owner}'; study "
                        f"'{study_name}' would overwrite them: give it its own checkpoint_dir (--checkpoint-dir)")
    if not marker.exists():
        marker.write_text(study_name + "\n")


@dataclasses.dataclass
class Running:
    proc: subprocess.Popen
    trial_id: int
    number: int
    log_path: Path
    started: float
    device: int | None = None


class Driver:
    """Launches and watches trial processes for one study on this machine."""

    def __init__(self, cfg, *, progress: bool = True):
        import optuna

        from xclip_jax import study as st

        self.cfg = cfg
        self.st = st
        self.halt: str | None = None  # why no more trials start (a full disk), for the final error
        self.out = Path(cfg.output_dir)
        self.progress = progress
        self.storage = st.make_storage(cfg.storage, cfg, heartbeat=True)
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        try:
            self.study = optuna.create_study(study_name=cfg.study_name, storage=self.storage,
                                             sampler=st.make_sampler(cfg), pruner=st.make_pruner(cfg),
                                             direction="maximize", load_if_exists=True)
        except Exception as e:
            if isinstance(e, UserError):
                raise
            raise UserError(f"storage {cfg.storage}: cannot open study {cfg.study_name!r} "
                            f"({str(e).splitlines()[0]}); check the storage URL") from None
        st.check_space(self.study, cfg)
        self.running: dict[int, Running] = {}
        self.host = host_name()

    # -- setup -------------------------------------------------------------------------------

    def prepare(self) -> None:
        """Validate and cache the data, write the resolved config: all before any trial starts."""
        from xclip_jax.config import dump_yaml
        from xclip_jax.train import load_sets

        for folder in (self.out, Path(self.cfg.checkpoint_dir)):
            check_writable(folder)
        claim_checkpoint_dir(Path(self.cfg.checkpoint_dir), self.cfg.study_name)
        self.cache_dir = self.st.data_cache_dir(self.cfg, self.out / "data_cache")
        if not (self.cache_dir / "done").exists():
            sets = load_sets(self.cfg, splits=("train", "val"))
            self._check_batch_sizes(sets["train"].rows)
            self.st.write_cache(sets, self.cache_dir)
        else:
            import numpy as np

            rows = np.load(self.cache_dir / "train_text.npy", mmap_mode="r").shape[0]
            self._check_batch_sizes(rows)
        self.config_path = self.out / "tune_config.yaml"
        dump_yaml(self.cfg, self.config_path, header="# the resolved tuning config that trial processes read\n")
        self.logs = self.out / "logs"
        self.logs.mkdir(exist_ok=True)
        self.jax_cache = os.environ.get("XCLIP_JAX_CACHE", str(Path.home() / ".cache" / "xclip_jax" / "jax"))

    def _check_batch_sizes(self, rows: int) -> None:
        space = self.cfg.search_space.get("batch_size")
        sizes = list(space.choices or [space.high]) if space is not None else []
        if "batch_size" in self.cfg.fixed:
            sizes.append(self.cfg.fixed["batch_size"])
        if not sizes:
            from xclip_jax.config import TrainingConfig

            sizes.append(TrainingConfig().batch_size)
        too_big = [b for b in sizes if b > rows]
        if too_big:
            raise UserError(f"batch_size {too_big} larger than the training set ({rows} rows); "
                            "remove those choices or use a larger training set")

    # -- trials ------------------------------------------------------------------------------

    def launch(self) -> None:
        from optuna.trial import TrialState

        with self.st.quiet_optuna():
            trial = self.study.ask()
        tid = trial._trial_id
        self.storage.record_heartbeat(tid)
        if self.st.is_surplus(self.study, trial.number, self.cfg.n_trials):
            # Another driver asked at the same moment and the study's total is reached.
            self.storage.set_trial_system_attr(tid, "xclip_surplus", True)
            self.study.tell(trial.number, state=TrialState.FAIL)
            return
        self.st.sample(trial, self.cfg)
        trial.set_user_attr("driver_host", self.host)
        trial.set_user_attr("driver_pid", os.getpid())
        env = dict(os.environ)
        env.update({
            "XLA_PYTHON_CLIENT_PREALLOCATE": "false",
            "JAX_COMPILATION_CACHE_DIR": self.jax_cache,
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
            "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
            "XCLIP_SPAWN_TIME": repr(time.time()),
            "PYTHONUNBUFFERED": "1",
        })
        device = self._pick_device()
        if device is not None:
            env["CUDA_VISIBLE_DEVICES"] = str(device)
        log_path = self.logs / f"trial_{trial.number:05d}.log"
        limit = self.cfg.trial_memory_limit_gb
        try:
            with open(log_path, "w") as fh:
                proc = subprocess.Popen(
                    [sys.executable, "-m", "xclip_jax.trial", str(self.config_path), str(tid), str(self.cache_dir)],
                    stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, start_new_session=True,
                    preexec_fn=_limit_memory(int(limit * 2**30)) if limit else None)
        except OSError as e:  # e.g. no room for its log: the trial never ran, its parameters run again
            self._fail(tid, f"could not start: {e}", retry="always")
            if disk_full(str(e)):
                self._halt_for_disk(trial.number, str(e))
                return
            raise
        self.running[tid] = Running(proc, tid, trial.number, log_path, time.time(), device)

    def _pick_device(self) -> int | None:
        """With ``devices``: the one running the fewest of our trials (the first of those on a tie)."""
        if not self.cfg.devices:
            return None
        load = collections.Counter(r.device for r in self.running.values())
        return min(self.cfg.devices, key=load.__getitem__)

    def reap(self) -> list[str]:
        """Collect finished trial processes; record FAIL for those that died without telling."""
        from optuna.trial import TrialState

        lines = []
        for tid, r in list(self.running.items()):
            timed_out = self.cfg.trial_timeout and time.time() - r.started > self.cfg.trial_timeout
            if timed_out and r.proc.poll() is None:
                os.killpg(r.proc.pid, signal.SIGKILL)
                r.proc.wait()
            rc = r.proc.poll()
            if rc is None:
                continue
            del self.running[tid]
            frozen = self.storage.get_trial(tid)
            if frozen.state == TrialState.RUNNING:
                tail = "" if timed_out else _log_tail(r.log_path)
                reason = "trial_timeout exceeded" if timed_out else _exit_reason(rc, tail)
                cause = disk_full(tail)
                if cause:  # not the trial's fault: run its parameters again, start no more
                    reason = reason if cause in reason else f"{cause} ({reason})"
                    self._fail(tid, reason, retry="always")
                    self._halt_for_disk(r.number, reason)
                else:
                    self._fail(tid, reason, retry="never")
                frozen = self.storage.get_trial(tid)
            lines.append(self.describe(frozen))
        return lines

    def describe(self, t) -> str:
        from optuna.trial import TrialState

        if t.state == TrialState.COMPLETE:
            try:
                best = self.study.best_trial
                tail = f" Best is trial {best.number} with value: {best.value:.4f}."
            except ValueError:
                tail = ""
            return f"Trial {t.number} finished with value: {t.value:.4f} and parameters: {t.params}.{tail}"
        if t.state == TrialState.PRUNED:
            last = max(t.intermediate_values) if t.intermediate_values else None
            return f"Trial {t.number} pruned at epoch {last}."
        return f"Trial {t.number} failed: {t.user_attrs.get('fail_reason', 'unknown reason')}"

    def housekeeping(self) -> None:
        """Heartbeats for our trials; fail trials of dead drivers (stale, or dead on this host)."""
        from optuna.trial import TrialState

        for tid in self.running:
            self.storage.record_heartbeat(tid)
        # The stale check of Optuna's fail_stale_trials, done here so the failed trial gets a reason.
        for tid in self.storage._get_stale_trial_ids(self.study._study_id):
            self._fail(tid, f"no heartbeat for {self.cfg.grace_period:g} s: the driver that ran it stopped "
                                 "(machine lost or driver killed); its parameters run again")
        for t in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if t._trial_id in self.running:
                continue
            attrs = t.user_attrs
            if attrs.get("driver_host") == self.host and "driver_pid" in attrs and not _pid_alive(attrs["driver_pid"]):
                self._fail(t._trial_id, "its driver died; its parameters run again")

    def _halt_for_disk(self, number: int, reason: str) -> None:
        if self.halt is None:
            self.halt = (f"disk full: trial {number} failed ({reason}); no more trials were started and its "
                         f"parameters are queued. Free space under {self.cfg.checkpoint_dir} and {self.cfg.output_dir} "
                         "(or move them to another disk), then rerun the same command to resume")
            from tqdm.auto import tqdm

            tqdm.write("disk full: starting no more trials; waiting for the running ones")

    def _fail(self, tid: int, reason: str, retry: str = "once") -> bool:
        """Record a RUNNING trial FAIL with ``reason`` unless another driver got there first (the
        state change is one locked row update: exactly one wins); the winner queues its params again
        per ``retry``: "once" (unless the trial was itself a retry), "always" (the failure was not the
        parameters' fault) or "never"."""
        from optuna.exceptions import UpdateFinishedTrialError
        from optuna.trial import TrialState

        try:
            self.storage.set_trial_user_attr(tid, "fail_reason", reason)
            if not self.storage.set_trial_state_values(tid, state=TrialState.FAIL):
                return False
        except UpdateFinishedTrialError:
            return False
        if retry != "never":
            self.st.retry_once(self.study, self.storage.get_trial(tid), always=retry == "always")
        return True

    def interrupt(self) -> None:
        """Ctrl-C: end running trials within seconds, record them, queue their params again."""
        from optuna.trial import TrialState

        for r in self.running.values():
            if r.proc.poll() is None:
                os.killpg(r.proc.pid, signal.SIGTERM)
        deadline = time.time() + 10
        for r in self.running.values():
            try:
                r.proc.wait(timeout=max(deadline - time.time(), 0.1))
            except subprocess.TimeoutExpired:
                os.killpg(r.proc.pid, signal.SIGKILL)
                r.proc.wait()
        for tid in self.running:
            if self.storage.get_trial(tid).state == TrialState.RUNNING:
                self._fail(tid, "interrupted (Ctrl-C); its parameters run again on resume")
        self.running.clear()

    # -- the loop ----------------------------------------------------------------------------

    def run(self) -> dict:
        from tqdm.auto import tqdm

        cfg = self.cfg
        start = time.time()
        bar = tqdm(total=cfg.n_trials, desc=cfg.study_name, unit="trial", disable=not self.progress,
                   initial=min(self.st.counts(self.study)["finished"], cfg.n_trials))
        last_beat = 0.0
        last_shown = None
        interrupted = False
        stop = []
        # Ctrl-C sets a flag the loop reads: an exception could surface inside a library callback
        # (JAX's gc hook swallows it) and be lost.
        previous = {sig: signal.signal(sig, lambda signum, frame: stop.append(signum))
                    for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            while True:
                if stop:
                    raise KeyboardInterrupt
                for line in self.reap():
                    tqdm.write(line)
                now = time.time()
                if now - last_beat >= min(cfg.heartbeat_interval, 2):
                    self.housekeeping()
                    last_beat = now
                c = self.st.counts(self.study)
                shown = (c["finished"], c["running"], c["pruned"], c["fail"])
                if shown != last_shown:  # redraw on change only: logs stay readable
                    last_shown = shown
                    bar.n = min(c["finished"], cfg.n_trials)
                    bar.set_postfix(running=c["running"], pruned=c["pruned"], failed=c["fail"], best=self._best(),
                                    refresh=False)
                    bar.refresh()
                out_of_time = cfg.timeout is not None and now - start > cfg.timeout
                budget_left = c["finished"] + c["running"] < cfg.n_trials
                if not self.halt and not out_of_time and budget_left and len(self.running) < cfg.n_jobs:
                    self.launch()
                    continue
                if not self.running and (self.halt or out_of_time or not budget_left):
                    if c["running"] == 0 or out_of_time or self.halt:
                        break
                time.sleep(0.2)
        except KeyboardInterrupt:
            interrupted = True
            tqdm.write("interrupted: stopping running trials (they will run again on resume)")
            self.interrupt()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            bar.close()
        try:
            outputs = write_outputs(self.study, cfg)
        except OSError as e:
            if not (self.halt and disk_full(str(e))):
                raise
            outputs = {}  # the disk is full: the next run writes them
        c = self.st.counts(self.study)
        return {"interrupted": interrupted, "counts": c, "wall_seconds": time.time() - start, "outputs": outputs,
                "halt": self.halt}

    def _best(self) -> str:
        try:
            return f"{self.study.best_value:.4f}"
        except ValueError:
            return "-"


def best_train_config(cfg, trial):
    """The complete training config of the best trial, for a full run on the full data."""
    from xclip_jax.config import trial_config

    tc = trial_config(cfg, trial.params, trial_number=trial.number, experiment_name=f"{cfg.study_name}_best")
    data = cfg.data
    if data.synthetic is None:
        # The study tuned on the tuning subset; the final run trains on the full train split.
        changes = {}
        for part in ("image_embeddings", "text_embeddings", "metadata"):
            name = getattr(data, f"train_{part}")
            full = name.replace("train_tuning_", "train_")
            if full != name and (Path(cfg.base_data_dir) / full).exists():
                changes[f"train_{part}"] = full
        if len(changes) == 3:
            tc = dataclasses.replace(tc, data=dataclasses.replace(tc.data, **changes))
    training = dataclasses.replace(tc.training, num_epochs=cfg.final_epochs, patience=cfg.final_patience)
    return dataclasses.replace(tc, training=training, output_dir="outputs")


def write_outputs(study, cfg) -> dict:
    """best_config.yaml, best_results.json and the report (summary, importances, plots)."""
    from xclip_jax import report
    from xclip_jax.config import dump_yaml
    from xclip_jax.study import counts

    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = report.write_report(study, out)
    try:
        best = study.best_trial
    except ValueError:
        return written
    tc = best_train_config(cfg, best)
    header = (f"# Best configuration from study {cfg.study_name!r}: trial {best.number}, "
              f"validation R@1 = {best.value:.4f} ({len(study.trials)} trials)\n")
    dump_yaml(tc, out / "best_config.yaml", header=header)
    results = {
        "study_name": cfg.study_name,
        "best_trial": best.number,
        "best_value": best.value,
        "best_params": best.params,
        "user_attrs": best.user_attrs,
        "checkpoint": str(Path(cfg.checkpoint_dir) / f"{best.number:05d}"),
        "counts": counts(study),
    }
    (out / "best_results.json").write_text(json.dumps(results, indent=2, default=str))
    written["best_config"] = out / "best_config.yaml"
    written["best_results"] = out / "best_results.json"
    return written


def run_study(cfg, *, progress: bool = True) -> dict:
    """Run (or resume) the study of a typed TuneConfig; returns counts, wall time and outputs."""
    from xclip_jax.study import pruning_warning

    warning = pruning_warning(cfg)
    if warning:
        print(f"warning: {warning}", file=sys.stderr)
    driver = Driver(cfg, progress=progress)
    driver.prepare()
    return driver.run()


DEFAULT_CONFIG = "configs/default.yaml"


def _config_path(positional: str | None, option: str | None) -> str:
    """The config named on the command line (positionally or with ``--config``), else the default."""
    if positional and option and positional != option:
        raise UserError(f"two configs given ({positional} and --config {option}); give one")
    path = positional or option
    if path:
        return path
    if Path(DEFAULT_CONFIG).is_file():
        return DEFAULT_CONFIG
    raise UserError(f"no config given and no {DEFAULT_CONFIG} here; run python -m xclip_jax.tune CONFIG "
                    "(e.g. configs/quickstart.yaml from the repository)")


def main(argv=None):
    """``python -m xclip_jax.tune [CONFIG | --config CONFIG] [--storage URL] [--study-name N] [--n-trials N] …``."""
    import argparse

    from xclip_jax.config import ConfigError, load_tune_config, validate_tune

    parser = argparse.ArgumentParser(prog="python -m xclip_jax.tune", description="Run or resume a tuning study.")
    parser.add_argument("config", nargs="?", help=f"tuning YAML (the original's keys are accepted); default "
                                                  f"{DEFAULT_CONFIG} when it exists")
    parser.add_argument("--config", dest="config_option", metavar="CONFIG", help="the same, as the original's flag")
    parser.add_argument("--storage")
    parser.add_argument("--study-name")
    parser.add_argument("--n-trials", type=int)
    parser.add_argument("--n-jobs", type=int)
    parser.add_argument("--timeout", type=float)
    parser.add_argument("--output-dir")
    parser.add_argument("--checkpoint-dir")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    cfg = load_tune_config(_config_path(args.config, args.config_option))
    overrides = {k: v for k, v in {"storage": args.storage, "study_name": args.study_name, "n_trials": args.n_trials,
                                   "n_jobs": args.n_jobs, "timeout": args.timeout,
                                   "output_dir": args.output_dir,
                                   "checkpoint_dir": args.checkpoint_dir}.items() if v is not None}
    if overrides:
        try:
            cfg = validate_tune(dataclasses.replace(cfg, **overrides))
        except ValueError as e:
            raise ConfigError(f"command-line override: {e}") from None
    result = run_study(cfg, progress=not args.no_progress)
    c = result["counts"]
    print(f"study {cfg.study_name}: {c['complete']} complete, {c['pruned']} pruned, {c['fail']} failed "
          f"in {result['wall_seconds']:.1f} s; outputs in {cfg.output_dir}")
    if result["halt"]:
        raise UserError(result["halt"])
    return 130 if result["interrupted"] else 0


if __name__ == "__main__":
    raise SystemExit(cli(main)())
