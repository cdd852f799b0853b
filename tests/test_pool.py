"""The process pool on its own, with plain Python workers (no jax, no Optuna)."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from xclip_jax.pool import Pool, exit_reason

# A worker: each job says what to do ("echo", "crash", "die", "hog", "sleep") and how long to take.
WORKER = textwrap.dedent("""\
    import os, signal, sys, time
    from xclip_jax.pool import serve

    def run(job):
        print("running", job["job"], "in", os.getpid(), "device", os.environ.get("CUDA_VISIBLE_DEVICES"))
        time.sleep(job.get("seconds", 0))
        if job["do"] == "crash":
            raise ValueError("bad job " + job["job"])
        if job["do"] == "die":
            os.kill(os.getpid(), signal.SIGKILL)
        if job["do"] == "hog":
            global ballast
            ballast = bytearray(job.get("mb", 64) << 20)
        return {"pid": os.getpid(), "value": job["job"] * 2, "ahead": job.get("ahead", False)}

    def prepare(job):
        with open(job["log"] + ".prepared", "w") as fh:  # what a runner does for its next job meanwhile
            fh.write(str(os.getpid()))

    serve(lambda: (run, prepare))
""")


def _pool(tmp_path, **kw):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    kw.setdefault("size", 2)
    return Pool([sys.executable, str(script)], **kw)


def _drain(pool, jobs, timeout=60):
    """Poll until every job in ``jobs`` has an event; returns {job: event}."""
    got, end = {}, time.time() + timeout
    while set(got) != set(jobs) and time.time() < end:
        for event in pool.poll():
            got[event.job] = event
        time.sleep(0.02)
    assert set(got) == set(jobs), (got, jobs)
    return got


def test_a_warm_worker_runs_jobs_one_after_another(tmp_path):
    pool = _pool(tmp_path, size=1, max_jobs=10)
    pids = set()
    for job in "abc":
        pool.submit(job, {"do": "echo"}, tmp_path / f"{job}.log")
        (event,) = _drain(pool, [job]).values()
        assert event.kind == "done" and event.result["value"] == job * 2
        pids.add(event.result["pid"])
    assert len(pids) == 1 and pool.started_workers == 1
    # each job's output went to its own log
    assert all((tmp_path / f"{j}.log").read_text().startswith(f"running {j}") for j in "abc")
    pool.close()
    assert not pool.workers


def test_max_jobs_one_is_a_process_per_job(tmp_path):
    pool = _pool(tmp_path, size=2, max_jobs=1)
    for job in "ab":
        pool.submit(job, {"do": "echo"}, tmp_path / f"{job}.log")
    events = _drain(pool, "ab")
    assert events["a"].result["pid"] != events["b"].result["pid"]
    pool.submit("c", {"do": "echo"}, tmp_path / "c.log")
    assert _drain(pool, "c")["c"].result["pid"] not in {e.result["pid"] for e in events.values()}
    assert pool.started_workers == 3
    pool.close()


def test_a_crashed_or_killed_worker_loses_only_its_job(tmp_path):
    pool = _pool(tmp_path, size=3, max_jobs=10)
    pool.submit("ok", {"do": "echo", "seconds": 0.5}, tmp_path / "ok.log")
    pool.submit("crash", {"do": "crash"}, tmp_path / "crash.log")
    pool.submit("die", {"do": "die"}, tmp_path / "die.log")
    events = _drain(pool, ["ok", "crash", "die"])
    assert events["ok"].kind == "done"
    assert events["crash"].kind == "lost" and events["crash"].reason == "exit status 1: ValueError: bad job crash"
    assert events["die"].kind == "lost" and events["die"].reason.startswith("killed by SIGKILL")
    # a fresh worker replaces the lost ones
    pool.submit("again", {"do": "echo"}, tmp_path / "again.log")
    assert _drain(pool, ["again"])["again"].kind == "done"
    pool.close()


def test_job_timeout_kills_the_worker(tmp_path):
    pool = _pool(tmp_path, size=1, max_jobs=10, job_timeout=0.5)
    pool.submit("slow", {"do": "echo", "seconds": 30}, tmp_path / "slow.log")
    event = _drain(pool, ["slow"], timeout=20)["slow"]
    assert event.kind == "lost" and event.reason == "trial_timeout exceeded"
    assert not pool.busy()


def test_a_worker_over_its_memory_bound_is_retired(tmp_path):
    pool = _pool(tmp_path, size=1, max_jobs=10, max_rss_bytes=48 << 20)
    pool.submit("hog", {"do": "hog"}, tmp_path / "hog.log")
    first = _drain(pool, ["hog"])["hog"].result["pid"]
    pool.submit("next", {"do": "echo"}, tmp_path / "next.log")
    assert _drain(pool, ["next"])["next"].result["pid"] != first
    pool.close()


def test_memory_cap_and_devices(tmp_path):
    pool = _pool(tmp_path, size=2, max_jobs=1, memory_limit_bytes=128 << 20)
    pool.submit("small", {"do": "echo"}, tmp_path / "small.log")
    pool.submit("hog", {"do": "hog", "mb": 256}, tmp_path / "hog.log")
    events = _drain(pool, ["small", "hog"])
    # 256 MB more does not fit under a 128 MB address-space cap
    assert events["small"].kind == "done"
    assert events["hog"].kind == "lost" and "MemoryError" in events["hog"].reason, events
    pool = _pool(tmp_path, size=2, max_jobs=1, devices=[3, 5])
    pool.submit("a", {"do": "echo", "seconds": 0.3}, tmp_path / "a.log")
    pool.submit("b", {"do": "echo", "seconds": 0.3}, tmp_path / "b.log")
    _drain(pool, "ab")
    devices = {(tmp_path / f"{j}.log").read_text().split("device ")[1].strip() for j in "ab"}
    assert devices == {"3", "5"}  # two workers at once never share a device


def test_stop_ends_workers_and_reports_their_jobs_interrupted(tmp_path):
    pool = _pool(tmp_path, size=2, max_jobs=10)
    pool.submit("a", {"do": "echo", "seconds": 60}, tmp_path / "a.log")
    pool.submit("b", {"do": "echo", "seconds": 60}, tmp_path / "b.log")
    time.sleep(1.0)
    t0 = time.time()
    events = {e.job: e for e in pool.stop(grace=5)}
    assert time.time() - t0 < 5
    assert {e.reason for e in events.values()} == {"interrupted"} and set(events) == {"a", "b"}
    assert not pool.workers


def test_workers_follow_a_dead_driver(tmp_path):
    """The parent-death signal: a driver killed with SIGKILL leaves no worker behind."""
    script = tmp_path / "driver.py"
    script.write_text(textwrap.dedent(f"""\
        import sys, time
        sys.path.insert(0, {str(tmp_path)!r})
        from xclip_jax.pool import Pool
        pool = Pool([sys.executable, {str(tmp_path / 'worker.py')!r}], size=1, max_jobs=5)
        worker = pool.submit("a", {{"do": "echo", "seconds": 60}}, {str(tmp_path / 'a.log')!r})
        print(worker.proc.pid, flush=True)
        time.sleep(60)
    """))
    (tmp_path / "worker.py").write_text(WORKER)
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    worker_pid = int(proc.stdout.readline())
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    end = time.time() + 20
    while time.time() < end and os.path.exists(f"/proc/{worker_pid}") and \
            "Z" not in open(f"/proc/{worker_pid}/stat").read().split()[2]:
        time.sleep(0.1)
    assert not os.path.exists(f"/proc/{worker_pid}") or "Z" in open(f"/proc/{worker_pid}/stat").read().split()[2]


def test_exit_reason_is_the_error_not_the_jax_note():
    """A trial that dies inside jitted code: its log ends with JAX's traceback-filter note."""
    code = "import jax, jax.numpy as jnp\n@jax.jit\ndef f(x):\n    raise ValueError('shape 7 is wrong')\nf(jnp.ones(3))"
    log = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stderr
    assert "For simplicity, JAX has removed" in log.strip().splitlines()[-1]  # what the log's last line is
    assert exit_reason(1, log) == "exit status 1: ValueError: shape 7 is wrong"
    assert exit_reason(-9, "x\n") == "killed by SIGKILL (out of memory, or killed by hand); last output: x"


@pytest.mark.parametrize("secret_line", ["OperationalError: postgresql://bob:hunter2@db/x refused"])
def test_exit_reason_masks_passwords(secret_line):
    assert "hunter2" not in exit_reason(1, secret_line) and "bob:***@" in exit_reason(1, secret_line)


def test_a_worker_that_takes_jobs_ahead_gets_its_next_one_while_running(tmp_path):
    pool = _pool(tmp_path, size=1, max_jobs=10)
    pool.submit("a", {"do": "echo", "ahead": True}, tmp_path / "a.log")
    _drain(pool, ["a"])  # its result says it takes jobs ahead
    pool.submit("b", {"do": "echo", "seconds": 1.0, "ahead": True}, tmp_path / "b.log")
    assert pool.has_room()  # b runs, and the same worker takes c now, queued behind it
    pool.submit("c", {"do": "echo", "ahead": True}, tmp_path / "c.log")
    assert len(pool.workers) == 1 and not pool.has_room()
    time.sleep(0.5)
    assert (tmp_path / "c.log.prepared").exists()  # prepared while b still ran
    events = _drain(pool, ["b", "c"])
    assert events["b"].result["pid"] == events["c"].result["pid"]
    # a worker that dies with a job queued: the running one is lost with the reason, the queued one never started
    pool.submit("d", {"do": "die", "seconds": 0.5, "ahead": True}, tmp_path / "d.log")
    pool.submit("e", {"do": "echo"}, tmp_path / "e.log")
    events = _drain(pool, ["d", "e"])
    assert events["d"].kind == events["e"].kind == "lost"
    assert events["d"].started and "SIGKILL" in events["d"].reason
    assert not events["e"].started
    pool.close()


def test_a_worker_that_does_not_take_jobs_ahead_gets_one_at_a_time(tmp_path):
    pool = _pool(tmp_path, size=1, max_jobs=10)
    pool.submit("a", {"do": "echo", "seconds": 0.5}, tmp_path / "a.log")
    assert not pool.has_room()


def test_a_worker_retired_for_memory_still_counts_while_it_runs_its_queued_job(tmp_path):
    """A worker over its memory bound after a job is retired, but runs the job it had queued (ahead):
    until it does, it holds its place in the pool and its device."""
    pool = _pool(tmp_path, size=1, max_jobs=10, max_rss_bytes=96 << 20, devices=[0, 1])
    pool.submit("a", {"do": "echo", "ahead": True}, tmp_path / "a.log")
    _drain(pool, ["a"])
    worker = pool.submit("b", {"do": "hog", "mb": 160, "seconds": 0.5, "ahead": True}, tmp_path / "b.log")
    pool.submit("c", {"do": "echo", "seconds": 3.0}, tmp_path / "c.log")  # queued ahead on the same worker
    _drain(pool, ["b"])
    assert worker.retiring and [job.id for job in worker.jobs] == ["c"]
    assert not pool.has_room()  # a new worker now would be one more than size
    assert pool._pick_device() == 1  # and its device is still busy
    assert _drain(pool, ["c"])["c"].kind == "done"
    wait_until = time.time() + 10
    while pool.workers and time.time() < wait_until:
        pool.poll()
        time.sleep(0.05)
    assert pool.has_room() and pool._pick_device() == 0


def test_a_result_written_just_before_a_timeout_kill_is_recorded(tmp_path, monkeypatch):
    """poll() saw no result, found the job over its timeout and killed the worker; a result line
    written in between is the job's: it is recorded as done, nothing escapes poll(), and the job
    queued behind it is lost as never started."""
    pool = _pool(tmp_path, size=1, max_jobs=10, job_timeout=1.5)
    pool.submit("a", {"do": "echo", "ahead": True}, tmp_path / "a.log")
    _drain(pool, ["a"])  # its result tells the pool that this worker takes its next job ahead
    kill = pool._kill

    def late_kill(worker, *args):
        time.sleep(1.0)  # the job (2 s) writes its result meanwhile
        kill(worker, *args)

    monkeypatch.setattr(pool, "_kill", late_kill)
    pool.submit("b", {"do": "echo", "seconds": 2.0}, tmp_path / "b.log")
    pool.submit("c", {"do": "echo", "seconds": 5.0}, tmp_path / "c.log")  # killed with the worker: not its fault
    events = _drain(pool, ["b", "c"], timeout=20)
    assert events["b"].kind == "done" and events["b"].result["value"] == "bb"
    assert events["c"].kind == "lost" and not events["c"].started
    assert not pool.workers
