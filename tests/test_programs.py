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
    while not programs._compiled:  # the owner's compile is in progress
        time.sleep(0.01)
    waiter = threading.Thread(target=get, args=("waiter",))  # the trial that needs the same program
    waiter.start()
    time.sleep(0.2)
    go.set()
    owner.join(10)
    waiter.join(10)
    assert isinstance(errors["waiter"], ValueError) and "RESOURCE_EXHAUSTED" in str(errors["waiter"])
    assert isinstance(errors["owner"], ValueError)
    assert not programs._compiled  # the failed compile is not kept
    with pytest.raises(ValueError, match="RESOURCE_EXHAUSTED"):  # a later call tries again, and meets it
        programs._get(("epoch", "same key"), lambda: lower(), fast=False)


def test_programs_that_are_gone_are_freed():
    """JAX keeps its event listeners for the life of the process; ours must not keep the programs."""
    from xclip_jax.spec import ProgramKey

    programs = Programs()
    programs.init_fn(ProgramKey("linear", 3, 2, output_dim=2), 1)
    gone = weakref.ref(programs)
    del programs
    gc.collect()
    assert gone() is None


def test_programs_are_keyed_on_what_they_use():
    """The initialisation depends on the heads alone (not the loss, batch size, dtype or optimiser),
    the evaluation on the heads and their dtype; nothing depends on a value that is data: the learning
    rate, clipping, loss switches, dropout, temperature, the number of attention heads, a field its head
    or loss ignores (an attention head's hidden_dim, a softmax loss's queue size), or a width that pads
    to the same bucket."""
    import jax
    import jax.numpy as jnp

    from xclip_jax.model import hparams, stack
    from xclip_jax.padding import Buckets, program_key
    from xclip_jax.spec import HeadSpec, LossSpec, RunSpec, TrainingSpec
    from xclip_jax.step import DeviceData, fresh_states

    data = DeviceData(jnp.ones((6, 8)), jnp.ones((12, 12)), jnp.repeat(jnp.arange(6), 2))
    programs = Programs()

    def key(spec, buckets=Buckets()):
        return program_key(spec, buckets)

    a = RunSpec(HeadSpec("clip", 8, 16), LossSpec("softmax_infonce"), TrainingSpec(batch_size=4), 8, 12)
    b = RunSpec(HeadSpec("clip", 8, 16, dropout=0.3), LossSpec("queue_infonce", 0.2, True, queue_size=8,
                                                               mask_batch_duplicates=False),
                TrainingSpec(batch_size=2, learning_rate=0.5, max_grad_norm=3.0, dtype="bfloat16"), 8, 12)
    before = programs.counters()[0]
    assert programs.init_fn(key(a), 2) is programs.init_fn(key(b), 2)
    assert programs.eval_fn(key(a), 2, data) is not programs.eval_fn(key(b), 2, data)  # the dtype
    assert programs.eval_fn(key(a), 2, data) is programs.eval_fn(
        key(RunSpec(a.head, b.loss, TrainingSpec(batch_size=2), 8, 12)), 2, data)
    assert programs.counters()[0] == before + 3
    attention = [RunSpec(HeadSpec("attention", 8, hidden, num_heads=heads), LossSpec(), TrainingSpec(batch_size=4), 8, 12)
                 for hidden, heads in ((16, 2), (64, 4))]
    softmax = [RunSpec(HeadSpec("clip", 8), LossSpec(queue_size=q), TrainingSpec(batch_size=4), 8, 12) for q in (8, 16)]
    widths = Buckets.of("max", {"output_dim": (8, 32), "num_layers": (1, 3)})
    padded = [RunSpec(HeadSpec("attention", o, num_layers=n), LossSpec(), TrainingSpec(batch_size=4), 8, 12)
              for o, n in ((8, 1), (32, 3), (16, 2))]
    heads = Buckets.of("exact", {"num_heads": (2, 4)})  # a study's heads: its most, whatever the padding
    for specs, buckets in ((attention, heads), (softmax, Buckets()), (padded, widths)):
        keys = {key(s, buckets) for s in specs}
        assert len(keys) == 1, keys
        k = keys.pop()
        states = [jax.eval_shape(lambda s=s: fresh_states(k, stack([hparams(s, 0)]))) for s in specs]
        assert programs.epoch_fn(states[0], data) is programs.epoch_fn(states[1], data)
    assert key(padded[0]) != key(padded[1])  # without padding, each width is its own program
