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


def test_programs_are_keyed_on_what_they_use():
    """The evaluation depends on the heads alone (not the loss, batch size or optimiser); no program
    depends on a field its head or loss ignores (an attention head's hidden_dim, a softmax loss's
    queue size)."""
    import jax
    import jax.numpy as jnp

    from xclip_jax.spec import HeadSpec, LossSpec, TrainingSpec
    from xclip_jax.step import DeviceData, RunSpec, create_train_state

    data = DeviceData(jnp.ones((6, 8)), jnp.ones((12, 12)), jnp.repeat(jnp.arange(6), 2))
    programs = Programs()
    a = RunSpec(HeadSpec("clip", 8, 16), LossSpec("softmax_infonce"), TrainingSpec(batch_size=4), 8, 12)
    b = RunSpec(HeadSpec("clip", 8, 16), LossSpec("queue_infonce", queue_size=8),
                  TrainingSpec(batch_size=2, learning_rate=0.5, max_grad_norm=3.0), 8, 12)
    params = create_train_state(a, 0).params
    before = programs.counters()[0]
    assert programs.eval_fn(a, params, data) is programs.eval_fn(b, params, data)
    assert programs.counters()[0] == before + 1
    attention = [RunSpec(HeadSpec("attention", 8, hidden, num_heads=2), LossSpec(), TrainingSpec(batch_size=4), 8, 12)
                 for hidden in (16, 64)]
    assert attention[0].static() == attention[1].static()
    softmax = [RunSpec(HeadSpec("clip", 8), LossSpec(queue_size=q), TrainingSpec(batch_size=4), 8, 12) for q in (8, 16)]
    assert softmax[0].static() == softmax[1].static()
    state = jax.eval_shape(lambda: create_train_state(attention[0], 0))
    assert programs.epoch_fn(state, data) is programs.epoch_fn(jax.eval_shape(
        lambda: create_train_state(attention[1], 0)), data)
