"""The tuning driver: ``python -m xclip_jax.tune CONFIG [overrides]``.

It checks everything first (folders, the stored study's space, the data, every search-space choice
against the data), then creates the study and runs its trials on a process pool (``pool``: runner
processes, at most ``n_jobs`` at once, sharing the card and a persistent compilation cache). The
study policy (ask, tell, stale trials, retries) is ``study``; the outputs are ``report``'s. The
driver keeps its trials' heartbeats, records crashed or killed trials FAIL with their reason,
stops cleanly on Ctrl-C and resumes toward ``n_trials`` when rerun. It never imports jax.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import statistics
import sys
import time
from pathlib import Path

from xclip_jax import initial, plan, space
from xclip_jax import study as st
from xclip_jax.errors import UserError, cli, disk_full, mask_secrets
from xclip_jax import final_pick
from xclip_jax.pool import Pool, log_tail
from xclip_jax.report import record_output_dir
from xclip_jax.verdict import (
    bundle_line,
    next_step,
    outcome_line,
    report_baselines,
    throughput_line,
    top_table,
    top_trials,
    trial_line,
)
from xclip_jax.runtime import (
    STORAGE_ENV,
    announce_study,
    check_owners,
    check_writable,
    claim,
    host_name,
    output_root,
    runner_env,
    start_baselines,
    with_study_folders,
)
from xclip_jax.storage import make_storage, new_sqlite_file
from xclip_jax.padding import for_backend


class Driver:
    """Runs one study's trials on this machine: a process pool steered by the study policy."""

    def __init__(self, cfg, *, progress: bool = True):
        import optuna

        self.cfg = cfg
        self.halt: str | None = None  # why no more trials start (a full disk), for the final error
        self.out = Path(cfg.output_dir)
        self.progress = progress
        self.storage = None  # opened in prepare(): a new SQLite file only once every check has passed
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.study = None
        self.jobs: dict[str, list] = {}  # running job (its lead's trial id) -> [(trial id, number)] of its trials
        self.ran: list[int] = []  # ids of the trials this driver ran to their end
        self.lengths: dict[str, list[float]] = {"all": [], "complete": []}  # seconds of this run's trials
        self.host = host_name()

    # -- setup -------------------------------------------------------------------------------

    def prepare(self) -> None:
        """Every check first (folders, the stored study's space, the data, the search space against the
        data), creating nothing; only then create the folders, the storage's SQLite file, the study,
        store its space, claim the folders and cache the data."""
        from xclip_jax import data
        from xclip_jax.config import dump_yaml

        cfg = self.cfg
        folders = {"checkpoint_dir": Path(cfg.checkpoint_dir), "output_dir": self.out}
        check_owners(folders, cfg.study_name)
        existing = None
        if not new_sqlite_file(cfg.storage):  # a server, or a file that is there: open it now, it may hold the study
            self._open_storage()
            if (existing := st.find_study(self.storage, cfg.study_name)) is not None:
                space.check_space(existing, cfg)
        design = initial.design(self.storage, existing, cfg)  # checked now: enqueued once the study exists
        self.cache_dir = data.cache_dir(cfg.data, cfg.base_data_dir, output_root(self.out) / "data_cache")
        if data.cached_splits(self.cache_dir):
            sets = data.read_cache(self.cache_dir)
            for line in data.cached_sources(self.cache_dir):
                print(f"{line} (cached in {self.cache_dir})")
        else:
            sets = data.load_sets(cfg.data, cfg.base_data_dir)  # test too: the baselines' table scores it
        train = sets["train"]
        self.dims, self.rows = (train.image_dim, train.text_dim), train.rows
        skipped = space.check_combinations(cfg, self.rows, self.dims)
        if skipped:
            print(f"warning: {skipped}", file=sys.stderr)
        self.plan = plan.plan_sets(cfg, sets)  # refuses a choice no runner can hold, before anything is stored
        self.cfg = cfg = dataclasses.replace(cfg, padding=self.plan.padding)
        print(self.plan.table())
        # Every check passed: from here on things are created and stored.
        for folder in folders.values():
            check_writable(folder)
        if self.storage is None:
            self._open_storage()
        self.study = st.open_study(self.storage, cfg)  # safe to race: drivers started at one moment
        line = initial.enqueue(self.study, design)
        if line:
            print(line)
        claim(folders, cfg.study_name)
        record_output_dir(self.study, self.out)
        data.write_cache(sets, self.cache_dir)
        self.plan.write(self.out)
        self.logs = self.out / "logs"
        self.logs.mkdir(exist_ok=True)
        config_path = self.out / "tune_config.yaml"
        # The storage URL reaches trial processes through their environment, never through a file.
        dump_yaml(dataclasses.replace(cfg, storage=mask_secrets(cfg.storage)), config_path,
                  header="# the resolved tuning config that trial processes read (they get the storage URL "
                         f"from ${STORAGE_ENV})\n")
        self.baselines = self._start_baselines()
        self.pool = Pool([sys.executable, "-m", "xclip_jax.runner", str(config_path), str(self.cache_dir)],
                         size=cfg.n_jobs, env=self._runner_env(), devices=cfg.devices,
                         memory_limit_bytes=int(cfg.trial_memory_limit_gb * 2**30) if cfg.trial_memory_limit_gb else None,
                         max_jobs=cfg.runner_max_trials, job_timeout=cfg.trial_timeout,
                         max_rss_bytes=int(cfg.runner_max_memory_gb * 2**30) if cfg.runner_max_memory_gb else None)

    def _open_storage(self) -> None:
        self.storage = make_storage(self.cfg.storage, heartbeat=(self.cfg.heartbeat_interval, self.cfg.grace_period))

    def _start_baselines(self):
        """The closed-form baselines of the study's data, once per data cache (its ``baselines.json``):
        computed by a child process, since the driver never imports jax, while the first trials run."""
        if not self.cfg.baselines or (self.cache_dir / "baselines.json").exists():
            return None
        return start_baselines(self.cache_dir, self.logs / "baselines.log", self._runner_env())

    def _baseline_results(self, wait: bool) -> list | None:
        """The baselines' results (waiting for their process when ``wait``), stored with the study."""
        process, self.baselines = self.baselines, None
        if self.cfg.baselines:
            return st.store_baselines(self.study, self.cache_dir / "baselines.json", process, wait)
        return None

    def _runner_env(self) -> dict:
        return runner_env(self.cfg.storage)

    # -- trials ------------------------------------------------------------------------------

    def launch(self) -> None:
        """Ask for the next trial (and, with ``batch_trials``, its companions) and hand it to the pool."""
        trial = st.ask_trial(self.study, self.storage, self.cfg, self.dims, self.rows)
        if trial is None:  # another driver asked at the same moment and the study's total is reached
            return
        trials = [trial]
        if self.cfg.batch_trials > 1:
            c = st.counts(self.study)
            room = self.cfg.n_trials - (c["finished"] + c["running"])
            size = self.plan.bundle_size(self.cfg, trial.params, self.dims)
            trials += st.ask_companions(self.study, self.storage, self.cfg, trial, min(size - 1, room), self.dims)
        tids = [st.trial_id(t) for t in trials]
        for t in trials:
            t.set_user_attr("driver_host", self.host)
            t.set_user_attr("driver_pid", os.getpid())
        try:
            self.pool.submit(str(tids[0]), {"trial_ids": tids}, self.logs / f"trial_{trial.number:05d}.log")
        except OSError as e:  # e.g. no room for its log: the trials never ran, their parameters run again
            for tid in tids:
                st.fail_trial(self.study, self.storage, tid, f"could not start: {e}", retry="always")
            if disk_full(str(e)):
                self._halt_for_disk(trial.number, str(e))
                return
            raise
        self.jobs[str(tids[0])] = [(tid, t.number) for tid, t in zip(tids, trials)]
        if len(trials) > 1:
            from tqdm.auto import tqdm

            tqdm.write(bundle_line([t.number for t in trials]))

    def reap(self, events) -> list[str]:
        """Record how finished jobs ended: a trial its runner did not tell about (killed, crashed,
        out of memory, timed out) is FAIL with the reason (every member of a lost bundle); one
        stopped by a full disk is retried."""
        from optuna.trial import TrialState

        lines = []
        for event in events:
            for tid, number in self.jobs.pop(event.job, ()):  # (a final pick's runs are no trials)
                self.ran.append(tid)
                if event.kind == "lost" and self.storage.get_trial(tid).state == TrialState.RUNNING:
                    self._fail_lost(tid, number, event)
                t = self.storage.get_trial(tid)
                lines.append(trial_line(self.study, t))
                if t.datetime_complete and t.datetime_start and t.state in (TrialState.COMPLETE, TrialState.PRUNED):
                    # its length without its compiles: a later trial of a key compiled before skips them
                    seconds = ((t.datetime_complete - t.datetime_start).total_seconds()
                               - (t.user_attrs.get("compile_seconds") or 0.0))
                    self.lengths["all"].append(seconds)
                    if t.state == TrialState.COMPLETE:
                        self.lengths["complete"].append(seconds)
        return lines

    def _fail_lost(self, tid: int, number: int, event) -> None:
        cause = disk_full(event.reason) or disk_full(log_tail(event.log_path) if event.log_path else "")
        if not event.started:  # queued behind a job that took its runner down: never ran
            st.fail_trial(self.study, self.storage, tid, f"{event.reason}; its parameters run again", retry="always")
        elif cause:  # not the trial's fault: run its parameters again, start no more
            reason = event.reason if cause in event.reason else f"{cause} ({event.reason})"
            st.fail_trial(self.study, self.storage, tid, reason, retry="always")
            self._halt_for_disk(number, reason)
        elif event.reason == "interrupted":  # never the parameters' fault, however often it happens
            st.fail_trial(self.study, self.storage, tid, "interrupted (Ctrl-C); its parameters run again on resume",
                          retry="always")
        else:
            st.fail_trial(self.study, self.storage, tid, event.reason, retry="never")

    def budget_spent(self, elapsed: float) -> bool:
        """With ``budget_minutes``: whether a trial started now would end past the budget, with the
        final pick's runs after it (lengths, without compiles: the median of this run's trials, and of
        its complete ones)."""
        if self.cfg.budget_minutes is None:
            return False
        trial = statistics.median(self.lengths["all"]) if self.lengths["all"] else 0.0
        full = statistics.median(self.lengths["complete"]) if self.lengths["complete"] else trial
        runs = self.cfg.final_pick_trials * self.cfg.final_pick_seeds if self.cfg.final_pick == "rerun" else 0
        return elapsed + trial + full * runs / self.cfg.n_jobs > self.cfg.budget_minutes * 60

    def compiling_ahead(self) -> int:
        """Trials handed to a runner while it trains another: it compiles their programs meanwhile
        (``compile_ahead``), and they start when the current one ends."""
        return sum(len(self.jobs.get(job.id, ())) for worker in self.pool.workers for job in worker.jobs[1:])

    def housekeeping(self) -> None:
        """Heartbeats for our trials; fail the trials of drivers that are gone."""
        ours = {tid for job in self.pool.busy() for tid, _ in self.jobs.get(job, ())}  # every member of a bundle
        for tid in ours:
            self.storage.record_heartbeat(tid)
        st.fail_lost_trials(self.study, self.storage, self.cfg, ours, self.host)

    def _halt_for_disk(self, number: int, reason: str) -> None:
        if self.halt is None:
            self.halt = (f"disk full: trial {number} failed ({reason}); no more trials were started and its "
                         f"parameters are queued. Free space under {self.cfg.checkpoint_dir} and {self.cfg.output_dir} "
                         "(or move them to another disk), then rerun the same command to resume")
            from tqdm.auto import tqdm

            tqdm.write("disk full: starting no more trials; waiting for the running ones")

    # -- the loop ----------------------------------------------------------------------------

    def run(self) -> dict:
        from tqdm.auto import tqdm

        cfg = self.cfg
        start = time.time()
        bar = tqdm(total=cfg.n_trials if cfg.budget_minutes is None else None, desc=cfg.study_name, unit="trial",
                   disable=not self.progress,
                   initial=min(st.counts(self.study)["finished"], cfg.n_trials))
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
                for line in self.reap(self.pool.poll()):
                    tqdm.write(line)
                now = time.time()
                if now - last_beat >= min(cfg.heartbeat_interval, 2):
                    self.housekeeping()
                    last_beat = now
                c = st.counts(self.study)
                ahead = self.compiling_ahead()
                shown = (c["finished"], c["running"], c["pruned"], c["fail"], ahead)
                if shown != last_shown:  # redraw on change only: logs stay readable
                    last_shown = shown
                    bar.n = min(c["finished"], cfg.n_trials)
                    # a trial queued on a runner is RUNNING to Optuna, but it is compiling, not training yet
                    counts = {"running": c["running"] - ahead, **({"compiling": ahead} if ahead else {}),
                              "pruned": c["pruned"], "failed": c["fail"]}
                    bar.set_postfix(**counts, best=self._best(), refresh=False)
                    bar.refresh()
                out_of_time = cfg.timeout is not None and now - start > cfg.timeout
                budget_left = (c["finished"] + c["running"] < cfg.n_trials if cfg.budget_minutes is None
                               else not self.budget_spent(now - start))
                if not self.halt and not out_of_time and budget_left and self.pool.has_room():
                    self.launch()
                    continue
                if not self.pool.busy() and (self.halt or out_of_time or not budget_left):
                    if c["running"] == 0 or out_of_time or self.halt:
                        break
                time.sleep(0.2)
            if not (self.halt or out_of_time):
                self.pick_final(stop)
        except KeyboardInterrupt:
            interrupted = True
            tqdm.write("interrupted: stopping running trials (they will run again on resume)")
            for line in self.reap(self.pool.stop()):
                tqdm.write(line)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            bar.close()
        self.pool.close()
        baselines = self._baseline_results(wait=not interrupted)
        return {**self._finish(start, interrupted), "baselines": baselines}

    def pick_final(self, stop: list) -> None:
        """``final_pick: rerun``: the top trials trained again with fresh seeds (``final_pick.run``)."""
        from tqdm.auto import tqdm

        final_pick.run(self.pool, self.study, self.cfg, self.dims, self.logs, stop, tqdm.write, self.plan.members)

    def _finish(self, start: float, interrupted: bool) -> dict:
        from xclip_jax.report import write_outputs

        wall = time.time() - start
        throughput = st.record_throughput(self.study, [self.storage.get_trial(t) for t in self.ran], self.cfg.n_jobs,
                                          wall)
        try:
            outputs = write_outputs(self.study, self.cfg)
        except OSError as e:
            if not (self.halt and disk_full(str(e))):
                raise
            outputs = {}  # the disk is full: the next run writes them
        return {"interrupted": interrupted, "counts": st.counts(self.study), "wall_seconds": wall,
                "best_value": None if self._best() == "-" else self.study.best_value,
                "top_trials": top_trials(self.study, self.study.user_attrs.get(st.BASELINES_ATTR)),
                "final_pick": self.study.user_attrs.get(final_pick.FINAL_PICK_ATTR),
                "outputs": outputs, "halt": self.halt, "throughput": throughput}

    def _best(self) -> str:
        try:
            return f"{self.study.best_value:.4f}"
        except ValueError:
            return "-"


def run_study(cfg, *, progress: bool = True, add_trials: int | None = None) -> dict:
    """Run (or resume) the study of a typed TuneConfig; returns counts, wall time and outputs.

    ``add_trials`` runs that many trials more than the study has finished (as each rerun of the
    original tool did), whatever ``n_trials`` says.
    """
    warning = st.pruning_warning(cfg)
    if warning:
        print(f"warning: {warning}", file=sys.stderr)
    cfg, chosen = for_backend(with_study_folders(cfg))
    cfg, searched = initial.implicit_init(cfg)
    for line in (chosen, searched):
        if line:
            print(line)
    ran = cfg  # what the caller gets back: the config as given, with init searched where it is
    driver = Driver(cfg, progress=progress)
    driver.prepare()
    announce_study(cfg)  # once every check has passed: a refused config gets its one line only
    finished = (before := st.counts(driver.study))["finished"]
    if cfg.budget_minutes is not None:  # the budget ends the study, not a count
        driver.cfg = cfg = dataclasses.replace(cfg, n_trials=finished + 10**9)
        print(f"study {cfg.study_name}: a budget of {cfg.budget_minutes:g} minutes: trials start while one more fits "
              f"({finished} finished before)")
    elif add_trials is not None:
        driver.cfg = cfg = dataclasses.replace(cfg, n_trials=finished + add_trials)
        print(f"study {cfg.study_name}: {finished} trials finished; adding {add_trials} (n_trials {cfg.n_trials})")
    elif finished >= cfg.n_trials:
        print(f"study {cfg.study_name} already has {finished} finished trials (n_trials {cfg.n_trials}): nothing to "
              "run, outputs refreshed; to run more add --add-trials N (or raise n_trials)")
    elif finished:
        print(f"study {cfg.study_name}: resuming with {finished} of {cfg.n_trials} trials finished")
    return {**driver.run(), "cfg": ran, "counts_before": before}


def main(argv=None):
    """``python -m xclip_jax.tune [CONFIG | --config CONFIG] [--storage URL] [--n-trials N] …`` (the flags:
    ``tune_cli.command_line``)."""
    from xclip_jax.tune_cli import command_line

    cfg, args, config_path = command_line(argv)
    if args.plan:
        return plan.show(cfg)
    result = run_study(cfg, progress=not args.no_progress, add_trials=args.add_trials)
    cfg = result["cfg"]  # the config the study ran (init searched where it is), for the advice below
    for warning in getattr(result["outputs"], "warnings", ()):
        print(f"warning: {warning}", file=sys.stderr)
    print(outcome_line(cfg, result))
    if result["throughput"]["trials"]:
        print(throughput_line(result["throughput"]))
    for line in (top_table(result.get("top_trials") or [], cfg), final_pick.pick_line(result.get("final_pick"))):
        if line:
            print(line)
    report_baselines(result.get("best_value"), result.get("baselines"), cfg, args.overrides)
    if result["halt"]:
        raise UserError(result["halt"])
    line = next_step(cfg, config_path, result, args.overrides)
    if line:
        print(line)
    if result["interrupted"]:
        import shlex

        print(f"interrupted: to resume, run the same command: python -m xclip_jax.tune "
              f"{shlex.join(sys.argv[1:] if argv is None else argv)}")
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(cli(main)())
