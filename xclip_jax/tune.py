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
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from xclip_jax.errors import UserError, cli, disk_full, mask_secrets


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


# What JAX prints after an exception when it filters its own frames from the traceback: a note,
# not the error.
_JAX_NOTE = ("For simplicity, JAX has removed its internal frames", "--------------------")
_EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt)\b")


def _error_line(log_tail: str) -> str:
    """The line of a trial's log that says what went wrong: the last exception line (``XError:
    message``), else the last line that is not JAX's traceback-filter note."""
    lines = [ln.strip() for ln in log_tail.splitlines() if ln.strip()]
    lines = [ln for ln in lines if not ln.startswith(_JAX_NOTE)]
    for line in reversed(lines):
        if _EXCEPTION_LINE.match(line):
            return line[:300]
    return lines[-1][:300] if lines else ""


def _exit_reason(rc: int, log_tail: str) -> str:
    last = mask_secrets(_error_line(log_tail))
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
MARKER = ".study_name"
STORAGE_ENV = "XCLIP_STORAGE_URL"
MAX_SKIPPED_IN_A_ROW = 200


def _owner(directory: Path, kind: str) -> str | None:
    """The study that a checkpoint_dir / output_dir belongs to, or None for a fresh folder."""
    marker = directory / MARKER
    if marker.exists():
        return marker.read_text().strip()
    if kind == "checkpoint_dir":  # a folder from before the marker: a trial's cfg.yaml names its study
        first = min(directory.glob("[0-9]*/cfg.yaml"), default=None)
        header = first.read_text().split("\n", 1)[0] if first else ""
        return header.split(" of study ", 1)[1].strip() if " of study " in header else None
    try:  # an output_dir from before the marker: its best_results.json names the study
        return json.loads((directory / "best_results.json").read_text())["study_name"]
    except (OSError, ValueError, KeyError):
        return None


def check_owners(folders: dict, study_name: str) -> None:
    """Refuse ``{kind: folder}`` (checkpoint_dir, output_dir) that hold another study's files: trial
    numbers restart at 0 in every study and outputs have fixed names, so a second study would
    overwrite them. Reads only."""
    taken = {kind: (folder, owner) for kind, folder in folders.items()
             if (owner := _owner(Path(folder), kind)) not in (None, study_name)}
    if not taken:
        return
    what = {"checkpoint_dir": "the trial checkpoints", "output_dir": "the outputs"}
    said = "; ".join(f"{kind} {folder} holds {what[kind]} of study '{owner}'" for kind, (folder, owner) in taken.items())
    flags = " and ".join(f"--{kind.replace('_', '-')}" for kind in taken)
    raise UserError(f"{said}: study '{study_name}' would overwrite them; give it its own {' and '.join(taken)} "
                    f"({flags})")


def claim(folders: dict, study_name: str) -> None:
    """Mark each folder as this study's (after ``check_owners`` passed)."""
    for folder in folders.values():
        marker = Path(folder) / MARKER
        if not marker.exists():
            marker.write_text(study_name + "\n")


def claim_checkpoint_dir(directory: Path, study_name: str) -> None:
    """Check and mark one checkpoint_dir (see ``check_owners``)."""
    check_owners({"checkpoint_dir": directory}, study_name)
    claim({"checkpoint_dir": directory}, study_name)


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
        self.study = None
        self.running: dict[int, Running] = {}
        self.host = host_name()

    # -- setup -------------------------------------------------------------------------------

    def prepare(self) -> None:
        """Every check first (folders, the stored study's space, the data, the search space against the
        data); only then create the study, store its space, claim the folders and cache the data."""
        import optuna

        from xclip_jax.config import dump_yaml

        cfg = self.cfg
        folders = {"checkpoint_dir": Path(cfg.checkpoint_dir), "output_dir": self.out}
        for folder in folders.values():
            check_writable(folder)
        check_owners(folders, cfg.study_name)
        existing = self.st.find_study(self.storage, cfg.study_name)
        if existing is not None:
            self.st.check_space(existing, cfg)
        self.cache_dir = self.st.data_cache_dir(cfg, self.out / "data_cache")
        sets = self._data()
        train = sets["train"]
        self.dims = (train.image_dim, train.text_dim)
        skipped = self.st.check_combinations(cfg, train.rows, self.dims)
        if skipped:
            print(f"warning: {skipped}", file=sys.stderr)
        # Every check passed: from here on things are stored.
        try:
            self.study = optuna.create_study(study_name=cfg.study_name, storage=self.storage,
                                             sampler=self.st.make_sampler(cfg), pruner=self.st.make_pruner(cfg),
                                             direction="maximize", load_if_exists=True)
        except Exception as e:
            raise UserError(f"storage {mask_secrets(cfg.storage)}: cannot open study {cfg.study_name!r} "
                            f"({str(e).splitlines()[0]}); check the storage URL") from None
        self.st.store_space(self.study, cfg)
        claim(folders, cfg.study_name)
        self.st.write_cache(sets, self.cache_dir)
        self.config_path = self.out / "tune_config.yaml"
        # The storage URL reaches trial processes through their environment, never through a file.
        dump_yaml(dataclasses.replace(cfg, storage=mask_secrets(cfg.storage)), self.config_path,
                  header="# the resolved tuning config that trial processes read (they get the storage URL "
                         f"from ${STORAGE_ENV})\n")
        self.logs = self.out / "logs"
        self.logs.mkdir(exist_ok=True)
        self.jax_cache = os.environ.get("XCLIP_JAX_CACHE", str(Path.home() / ".cache" / "xclip_jax" / "jax"))

    def _data(self) -> dict:
        """The study's train and val sets: from the driver's cache when it has them (memory-mapped),
        else loaded and validated; either way one line per set says where it came from."""
        if (self.cache_dir / "done").exists():
            sets = self.st.read_cache(self.cache_dir)
            for line in self.st.cached_sources(self.cache_dir):
                print(f"{line} (cached in {self.cache_dir})")
            return sets
        from xclip_jax.train import load_sets

        return load_sets(self.cfg, splits=("train", "val"))

    # -- trials ------------------------------------------------------------------------------

    def launch(self) -> None:

        trial = self.st.ask_trial(self.study, self.storage, self.cfg, self.dims)
        if trial is None:  # another driver asked at the same moment and the study's total is reached
            return
        tid = trial._trial_id
        trial.set_user_attr("driver_host", self.host)
        trial.set_user_attr("driver_pid", os.getpid())
        env = dict(os.environ)
        env.update({
            "XLA_PYTHON_CLIENT_PREALLOCATE": "false",
            "JAX_COMPILATION_CACHE_DIR": self.jax_cache,
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
            "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
            "XCLIP_SPAWN_TIME": repr(time.time()),
            STORAGE_ENV: self.cfg.storage,
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


def full_training_files(cfg) -> tuple[dict, str | None]:
    """The study tuned on the tuning subset (``train_tuning_*``); the final run should train on the
    full training split (``train_*``). Returns ``(changes to the data section, warning or None)``,
    the file names found by the same rule as every command (a converted ``.npy`` wins)."""
    from xclip_jax.data import resolve_file
    from xclip_jax.errors import UserError

    data, base = cfg.data, Path(cfg.base_data_dir)
    names = {f"train_{part}": getattr(data, f"train_{part}")
             for part in ("image_embeddings", "text_embeddings", "metadata")}
    if data.synthetic is not None or not all("train_tuning_" in n for n in names.values()):
        return {}, None
    changes = {}
    for key, name in names.items():
        full = name.replace("train_tuning_", "train_")
        try:
            found = resolve_file(base / full) if key != "train_metadata" else base / full
        except UserError:
            continue
        if found.is_file():
            changes[key] = str(found.relative_to(base))
    if len(changes) == 3:
        return changes, None
    return {}, (f"best_config.yaml trains on the tuning subset ({names['train_image_embeddings']} …): no full "
                f"training set train_* was found in {base}; make it with python -m xclip_jax.data split, "
                "or edit the data section of best_config.yaml")


def best_train_config(cfg, trial):
    """The complete training config of the best trial, for a full run on the full data; and a warning
    when the full training set is not there (the config then keeps the tuning subset)."""
    from xclip_jax.config import trial_config

    tc = trial_config(cfg, trial.params, trial_number=trial.number, experiment_name=f"{cfg.study_name}_best")
    changes, warning = full_training_files(cfg)
    if changes:
        tc = dataclasses.replace(tc, data=dataclasses.replace(tc.data, **changes))
    training = dataclasses.replace(tc.training, num_epochs=cfg.final_epochs, patience=cfg.final_patience)
    return dataclasses.replace(tc, training=training, output_dir="outputs"), warning


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
    tc, warning = best_train_config(cfg, best)
    header = (f"# Best configuration from study {cfg.study_name!r}: trial {best.number}, "
              f"validation R@1 = {best.value:.4f} ({len(study.trials)} trials)\n")
    if warning:
        header += f"# NOTE: {warning}\n"
        written.warnings.append(warning)
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


def run_study(cfg, *, progress: bool = True, add_trials: int | None = None) -> dict:
    """Run (or resume) the study of a typed TuneConfig; returns counts, wall time and outputs.

    ``add_trials`` runs that many trials more than the study has finished (as each rerun of the
    original tool did), whatever ``n_trials`` says.
    """
    from xclip_jax.study import counts, pruning_warning

    warning = pruning_warning(cfg)
    if warning:
        print(f"warning: {warning}", file=sys.stderr)
    driver = Driver(cfg, progress=progress)
    driver.prepare()
    finished = counts(driver.study)["finished"]
    if add_trials is not None:
        driver.cfg = cfg = dataclasses.replace(cfg, n_trials=finished + add_trials)
        print(f"study {cfg.study_name}: {finished} trials finished; adding {add_trials} (n_trials {cfg.n_trials})")
    elif finished >= cfg.n_trials:
        print(f"study {cfg.study_name} already has {finished} finished trials (n_trials {cfg.n_trials}): nothing to "
              "run, outputs refreshed; to run more add --add-trials N (or raise n_trials)")
    elif finished:
        print(f"study {cfg.study_name}: resuming with {finished} of {cfg.n_trials} trials finished")
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
    parser.add_argument("--add-trials", type=int, metavar="N",
                        help="run N trials more than the study has finished (what rerunning the original did)")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    args = parser.parse_args(argv)
    if args.add_trials is not None and args.add_trials < 1:
        raise UserError(f"--add-trials {args.add_trials}: give a number of trials >= 1")
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
    result = run_study(cfg, progress=not args.no_progress, add_trials=args.add_trials)
    for warning in getattr(result["outputs"], "warnings", ()):
        print(f"warning: {warning}", file=sys.stderr)
    c = result["counts"]
    failed = c["fail"] + c["retried"]
    requeued = f" ({c['retried']} of them re-queued: interrupted, stale or disk full)" if c["retried"] else ""
    print(f"study {cfg.study_name}: {c['complete']} complete, {c['pruned']} pruned, {failed} failed{requeued} "
          f"in {result['wall_seconds']:.1f} s; outputs in {cfg.output_dir}")
    if result["halt"]:
        raise UserError(result["halt"])
    return 130 if result["interrupted"] else 0


if __name__ == "__main__":
    raise SystemExit(cli(main)())
