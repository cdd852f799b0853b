"""The kept, compiled programs: a failed compile reaches every thread that waits for it, and a
``Programs`` that is gone frees its programs."""

import gc
import threading
import time
import weakref

import pytest

from xclip_jax.programs import Programs


def test_a_failed_compile_reaches_the_waiting_thread_as_its_own_error():
    programs = Programs()
    go = threading.Event()

    def lower():
        go.wait(10)
        raise ValueError("RESOURCE_EXHAUSTED: out of memory while compiling the epoch")

    errors = {}

    def get(name):
        try:
            programs._get(("epoch", "same key"), lower, fast=False)
        except BaseException as e:  # noqa: BLE001 - recorded for the assertions
            errors[name] = e

    owner = threading.Thread(target=get, args=("owner",))  # e.g. the compile-ahead thread
    owner.start()
    while not programs._pending:
        time.sleep(0.01)
    waiter = threading.Thread(target=get, args=("waiter",))  # the trial that needs the same program
    waiter.start()
    time.sleep(0.2)
    go.set()
    owner.join(10)
    waiter.join(10)
    assert isinstance(errors["waiter"], ValueError) and "RESOURCE_EXHAUSTED" in str(errors["waiter"])
    assert isinstance(errors["owner"], ValueError)
    assert not programs._pending
    with pytest.raises(ValueError, match="RESOURCE_EXHAUSTED"):  # a later call tries again, and meets it
        programs._get(("epoch", "same key"), lambda: lower(), fast=False)


def test_programs_that_are_gone_are_freed():
    """JAX keeps its event listeners for the life of the process; ours must not keep the programs."""
    programs = Programs()
    programs.copy_fn({"w": __import__("numpy").zeros((3, 2), "float32")})
    gone = weakref.ref(programs)
    del programs
    gc.collect()
    assert gone() is None
