"""A pool of worker processes that run jobs one after another, knowing nothing of what a job is.

The driver side (:class:`Pool`) starts workers on demand, up to ``size`` at once, each with its
environment, device, memory cap and the parent-death signal (:func:`worker_setup`), and hands each idle worker a job: an
id, a JSON payload and the file its output goes to. The worker side (:func:`serve`) reads jobs from
its stdin, runs each with its stdout and stderr in the job's log, and writes one JSON line back per
finished job. A worker that dies mid-job loses it: :meth:`Pool.poll` reports the job ``lost`` with
the reason (the signal or exit status, and the error line of the job's log). A worker is retired
after ``max_jobs`` jobs, or when its resident memory grows past ``max_rss_bytes``; ``max_jobs=1``
is one process per job.

Nothing here imports jax or Optuna: the pool is tested with plain Python workers.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from xclip_jax.errors import mask_secrets

RESULT_FD_ENV = "XCLIP_RESULT_FD"  # the pipe a worker writes its results to (stdout and stderr go to logs)
PARENT_ENV = "XCLIP_POOL_PID"  # the driver: a worker ends when it does
MEMORY_ENV = "XCLIP_MEMORY_LIMIT_BYTES"  # the worker's address-space cap
INDEX_ENV = "XCLIP_WORKER_INDEX"  # how many workers the pool started before this one
NEVER_STARTED = "its worker ended before it started"


# ----------------------------------------------------------------------------- why a process ended

# What JAX prints after an exception when it filters its own frames from the traceback: a note,
# not the error.
_JAX_NOTE = ("For simplicity, JAX has removed its internal frames", "--------------------")
_EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt)\b")


def log_tail(path: Path, size: int = 65536) -> str:
    """The last ``size`` bytes of a log (library messages can be long, and shutdown noise may follow
    the error that matters)."""
    try:
        with open(path, "rb") as fh:
            fh.seek(max(fh.seek(0, os.SEEK_END) - size, 0))
            return fh.read().decode(errors="replace")
    except OSError:
        return ""


def error_line(log: str) -> str:
    """The line of a log that says what went wrong: the last exception line (``XError: message``),
    else the last line that is not JAX's traceback-filter note."""
    lines = [ln.strip() for ln in log.splitlines() if ln.strip()]
    lines = [ln for ln in lines if not ln.startswith(_JAX_NOTE)]
    for line in reversed(lines):
        if _EXCEPTION_LINE.match(line):
            return line[:300]
    return lines[-1][:300] if lines else ""


def exit_reason(rc: int, log: str) -> str:
    """Why a process ended, in one line: its signal or exit status and its log's error line."""
    last = mask_secrets(error_line(log))
    if rc < 0:
        name = signal.Signals(-rc).name if -rc in signal.Signals._value2member_map_ else str(-rc)
        why = f"killed by {name}"
        if -rc == signal.SIGKILL:
            why += " (out of memory, or killed by hand)"
        return f"{why}; last output: {last}" if last else why
    return f"exit status {rc}: {last}" if last else f"exit status {rc}"


# ----------------------------------------------------------------------------- the driver's side


@dataclasses.dataclass
class Event:
    """What :meth:`Pool.poll` saw: a job ``done`` (with the worker's ``result``) or ``lost`` (with a
    ``reason``; ``started`` says whether the worker had begun it or it was still queued) and the log
    its output went to."""

    kind: str
    job: str
    log_path: Path
    result: dict | None = None
    reason: str | None = None
    started: bool = True


@dataclasses.dataclass
class Job:
    id: str
    log_path: Path
    started: float  # when the worker began it (for a queued job: when it was queued)


@dataclasses.dataclass(eq=False)
class Worker:
    proc: subprocess.Popen
    results: object  # the read end of the worker's result pipe
    device: int | None
    buffer: bytes = b""
    jobs_done: int = 0
    jobs: list = dataclasses.field(default_factory=list)  # the running job first, then at most one queued
    retiring: bool = False
    ahead: bool = False  # it takes its next job while running one (it said so in a result)


def rss_bytes(pid: int) -> int:
    """A process's resident memory (0 when it is gone or the OS does not say)."""
    try:
        with open(f"/proc/{pid}/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


class Pool:
    """Worker processes running ``command``, at most ``size`` at once.

    Args:
      command: the worker's argv (it must call :func:`serve`).
      size: workers at once. env: their environment. devices: GPU indices; each new worker gets
        ``CUDA_VISIBLE_DEVICES`` = the one with the fewest live workers.
      memory_limit_bytes: address-space cap of each worker. max_jobs: jobs a worker runs before it
        is retired (1 = a process per job). max_rss_bytes: retire a worker whose resident memory is
        over this after a job. job_timeout: kill a worker whose job runs longer (seconds).

    A worker whose results say ``"ahead": true`` is handed its next job while it runs one (it
    prepares that job meanwhile, e.g. compiles it); every other worker gets one job at a time.
    """

    def __init__(self, command: list[str], *, size: int, env: dict | None = None, devices=None,
                 memory_limit_bytes: int | None = None, max_jobs: int = 1, max_rss_bytes: int | None = None,
                 job_timeout: float | None = None):
        self.command = list(command)
        self.size = size
        self.env = dict(os.environ if env is None else env)
        self.devices = list(devices) if devices else None
        self.memory_limit_bytes = memory_limit_bytes
        self.max_jobs = max_jobs
        self.max_rss_bytes = max_rss_bytes
        self.job_timeout = job_timeout
        self.workers: list[Worker] = []
        self.started_workers = 0

    # -- handing out jobs ------------------------------------------------------------------

    def busy(self) -> dict[str, Worker]:
        """The jobs in progress or queued, by id."""
        return {job.id: w for w in self.workers for job in w.jobs}

    def _takes_job(self, worker: Worker) -> bool:
        if worker.retiring or worker.jobs_done + len(worker.jobs) >= self.max_jobs:
            return False
        return not worker.jobs or (worker.ahead and len(worker.jobs) == 1)

    @staticmethod
    def _occupies(worker: Worker) -> bool:
        # A retired worker still counts (toward size, and on its device) while it has a job: one
        # retired for its memory after a job runs the job it had queued before it exits.
        return not worker.retiring or bool(worker.jobs)

    def has_room(self) -> bool:
        """Whether a job submitted now would be taken: by an idle worker, a worker that takes its next
        job ahead, or a new worker."""
        live = [w for w in self.workers if self._occupies(w)]
        return len(live) < self.size or any(self._takes_job(w) for w in live)

    def submit(self, job: str, payload: dict, log_path: Path) -> Worker:
        """Run ``payload`` as job ``job`` on an idle worker (started if none), output to ``log_path``.

        Raises:
          OSError: the worker could not be started (e.g. no room for its log); nothing is running.
        """
        idle = [w for w in self.workers if self._takes_job(w)]
        worker = min(idle, key=lambda w: len(w.jobs)) if idle else self._start(log_path)
        worker.jobs.append(Job(job, Path(log_path), time.time()))
        line = json.dumps({"job": job, "log": str(log_path), **payload}) + "\n"
        try:
            worker.proc.stdin.write(line.encode())
            worker.proc.stdin.flush()
        except OSError:  # it died while idle: poll() reports the job lost with its exit reason
            pass
        return worker

    def _start(self, first_log: Path) -> Worker:
        env = dict(self.env)
        env["XCLIP_SPAWN_TIME"] = repr(time.time())
        device = self._pick_device()
        if device is not None:
            env["CUDA_VISIBLE_DEVICES"] = str(device)
        read_fd, write_fd = os.pipe()
        env[RESULT_FD_ENV] = str(write_fd)
        env[PARENT_ENV] = str(os.getpid())
        env[INDEX_ENV] = str(self.started_workers)
        if self.memory_limit_bytes:
            env[MEMORY_ENV] = str(int(self.memory_limit_bytes))
        try:
            with open(first_log, "w") as log:  # what the worker prints before its first job goes here too
                proc = subprocess.Popen(self.command, stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT,
                                        env=env, start_new_session=True, pass_fds=(write_fd,))
        except BaseException:
            os.close(read_fd)
            raise
        finally:
            os.close(write_fd)
        os.set_blocking(read_fd, False)
        worker = Worker(proc, os.fdopen(read_fd, "rb", buffering=0), device)
        self.workers.append(worker)
        self.started_workers += 1
        return worker

    def _pick_device(self) -> int | None:
        if not self.devices:
            return None
        # A retired worker with no job left is exiting: its device is free.
        load = collections.Counter(w.device for w in self.workers if self._occupies(w) and w.proc.poll() is None)
        return min(self.devices, key=load.__getitem__)

    # -- watching them ---------------------------------------------------------------------

    def poll(self) -> list[Event]:
        """Finished and lost jobs since the last call (non-blocking); retires and reaps workers."""
        events = []
        for worker in list(self.workers):
            events += self._read_results(worker)
            running = worker.jobs[0] if worker.jobs else None
            if running and self.job_timeout and time.time() - running.started > self.job_timeout:
                self._kill(worker)
                worker.proc.wait()
                # Read first, as stop() does: a result written between the read above and the kill
                # is the job's, and its queued job (if any) then never started.
                events += self._read_results(worker)
                events += self._lose_all(worker, "trial_timeout exceeded",
                                         started=bool(worker.jobs) and worker.jobs[0] is running)
            rc = worker.proc.poll()
            if rc is None:
                continue
            events += self._read_results(worker)  # a last line written just before it exited
            if worker.jobs:
                events += self._lose_all(worker, exit_reason(rc, log_tail(worker.jobs[0].log_path)))
            self._forget(worker)
        return events

    def _lose_all(self, worker: Worker, reason: str, started: bool = True) -> list[Event]:
        """The worker is gone: its running job (when ``started``) is lost with ``reason``, a queued one
        never started."""
        events = [Event("lost", job.id, job.log_path, reason=reason if i == 0 and started else NEVER_STARTED,
                        started=i == 0 and started) for i, job in enumerate(worker.jobs)]
        worker.jobs.clear()
        return events

    def _read_results(self, worker: Worker) -> list[Event]:
        try:
            chunk = worker.results.read()
        except (BlockingIOError, ValueError):
            chunk = None
        if chunk:
            worker.buffer += chunk
        events = []
        while b"\n" in worker.buffer:
            line, worker.buffer = worker.buffer.split(b"\n", 1)
            result = json.loads(line)
            job = worker.jobs.pop(0)
            assert result.pop("job") == job.id, "a worker answers its jobs in order"
            events.append(Event("done", job.id, job.log_path, result=result))
            worker.jobs_done += 1
            worker.ahead = bool(result.get("ahead"))
            if worker.jobs:  # the queued job starts now
                worker.jobs[0].started = time.time()
            if worker.jobs_done >= self.max_jobs or (
                    self.max_rss_bytes and rss_bytes(worker.proc.pid) > self.max_rss_bytes):
                self._retire(worker)
        return events

    def _retire(self, worker: Worker) -> None:
        """No more jobs for this worker: its stdin closes, and it exits once its queue is done."""
        worker.retiring = True
        try:
            worker.proc.stdin.close()
        except OSError:
            pass

    def _forget(self, worker: Worker) -> None:
        self.workers.remove(worker)
        worker.results.close()
        if worker.proc.stdin and not worker.proc.stdin.closed:
            try:
                worker.proc.stdin.close()
            except OSError:
                pass

    def _kill(self, worker: Worker, sig=signal.SIGKILL) -> None:
        try:
            os.killpg(worker.proc.pid, sig)
        except ProcessLookupError:
            pass

    def close(self, grace: float = 10.0) -> None:
        """Retire every idle worker and wait for them to exit (jobs in progress are not touched)."""
        idle = [w for w in self.workers if not w.jobs]
        for worker in idle:
            self._retire(worker)
        deadline = time.time() + grace
        for worker in idle:
            try:
                worker.proc.wait(timeout=max(deadline - time.time(), 0.1))
            except subprocess.TimeoutExpired:
                self._kill(worker)
                worker.proc.wait()
            self._forget(worker)

    def stop(self, grace: float = 10.0) -> list[Event]:
        """End every worker within ``grace`` seconds (SIGTERM, then SIGKILL); returns the jobs that
        finished meanwhile and the ones lost (reason ``interrupted``)."""
        for worker in self.workers:
            if worker.proc.poll() is None:
                self._kill(worker, signal.SIGTERM)
        deadline = time.time() + grace
        for worker in self.workers:
            try:
                worker.proc.wait(timeout=max(deadline - time.time(), 0.1))
            except subprocess.TimeoutExpired:
                self._kill(worker)
                worker.proc.wait()
        events = []
        for worker in list(self.workers):
            events += self._read_results(worker)
            events += [dataclasses.replace(e, reason="interrupted") for e in self._lose_all(worker, "interrupted")]
            self._forget(worker)
        return events


# ----------------------------------------------------------------------------- the worker's side


def worker_setup() -> None:
    """What a worker does first, before its heavy imports: cap its address space (the pool's
    ``memory_limit_bytes``) and ask Linux to SIGTERM it when the driver dies (a lost driver must not
    leave orphans), exiting at once if the driver is already gone. Done here rather than between
    fork and exec, so that a driver with threads can start workers safely."""
    import ctypes
    import resource

    limit = os.environ.pop(MEMORY_ENV, None)
    if limit:
        resource.setrlimit(resource.RLIMIT_AS, (int(limit), int(limit)))
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.environ.get(PARENT_ENV) and os.getppid() != int(os.environ[PARENT_ENV]):
        raise SystemExit("the driver that started this worker is gone")


def serve(start) -> None:
    """The worker's loop. First :func:`worker_setup`, then ``start() -> (run_job, prepare_job)`` (the
    worker's own set-up, its heavy imports after the memory cap; ``prepare_job`` may be None); then
    for each job line on stdin, run ``run_job(job) -> dict`` with stdout and stderr in the job's log,
    and write ``{"job": id, **result}`` to the result pipe. Returns when the pool closes stdin. An
    exception in ``run_job`` ends the worker (the pool reports the job lost).

    Jobs are read by a thread as they arrive; ``prepare_job(job)``, when given, runs there for each
    (exceptions ignored: the job itself will meet them), so a worker that says ``"ahead": true`` in
    its results can prepare its next job while it runs the current one.
    """
    import queue
    import threading

    worker_setup()
    run_job, prepare_job = start()
    results = os.fdopen(int(os.environ.pop(RESULT_FD_ENV)), "w", buffering=1)
    jobs: queue.Queue = queue.Queue()

    def read():
        for line in sys.stdin:
            job = json.loads(line)
            jobs.put(job)
            if prepare_job is not None:
                try:
                    prepare_job(job)
                except Exception:  # noqa: BLE001 - the job's own run reports it
                    pass
        jobs.put(None)

    threading.Thread(target=read, name="jobs", daemon=True).start()
    while (job := jobs.get()) is not None:
        _redirect_output(job["log"])
        result = run_job(job)
        sys.stdout.flush()
        sys.stderr.flush()
        results.write(json.dumps({"job": job["job"], **result}) + "\n")


def _redirect_output(log_path: str) -> None:
    """Point this process's stdout and stderr (the file descriptors, so native libraries' output too)
    at the job's log; the first job's log already is."""
    sys.stdout.flush()
    sys.stderr.flush()
    if os.path.exists(log_path) and os.fstat(1).st_ino == os.stat(log_path).st_ino:
        return
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
