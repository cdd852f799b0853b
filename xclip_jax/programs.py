"""The compiled programs of training, compiled ahead of time, keyed on what they are built for, and kept.

Three programs train any bundle of members (a single trial is a bundle of one): the state's
initialisation (keyed on the heads alone), the epoch (on the whole ``ProgramKey``) and the
validation (on the heads and their dtype), each also on the member count and the data's shapes.
A warm trial runner keeps one :class:`Programs` for all its trials, so a trial whose key it has seen
compiles nothing, and it can compile the programs of its next trials in another thread while the
current one trains. The training CLI's fit uses the same three.
"""

from __future__ import annotations

import threading
import time
import weakref
from concurrent.futures import Future

import jax

from xclip_jax.encode import evaluate_members
from xclip_jax.metrics import DEFAULT_CHUNK_SIZE
from xclip_jax.model import HParams, hparams, stack
from xclip_jax.spec import ProgramKey, RunSpec
from xclip_jax.step import DeviceData, TrainState, _init_program, fresh_states, run_epochs

# What a program that runs briefly (state init, the evaluation) is compiled with on a CPU: most of
# XLA's optimisations off. They cost much of its compile time and little of its run time; the epoch
# program, which runs for the whole trial, keeps them (see benchmarks/RESULTS.md).
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _abstract(tree):
    """Shapes and dtypes (weak types too) of arrays or ShapeDtypeStructs: what a program is keyed on."""
    return jax.eval_shape(lambda t: t, tree)


def _shape_key(tree) -> tuple:
    leaves, treedef = jax.tree.flatten(_abstract(tree))
    return treedef, tuple((x.shape, str(x.dtype), x.weak_type) for x in leaves)


class Programs:
    """The compiled programs of training (state init, epoch, evaluation, params copy), compiled ahead
    of time, keyed on static shapes only, and kept: a warm trial runner compiles nothing for a trial
    whose shapes it has seen. Safe to fill from another thread (a runner compiles its next trial's
    programs while the current one trains); counts what it compiled and what came from JAX's
    persistent cache.
    """

    def __init__(self, fast_compile: bool | None = None):
        from jax import monitoring

        self._compiled: dict[tuple, Future] = {}  # a compile in progress too: who needs it waits
        self._lock = threading.Lock()
        # Per thread: a runner's main thread trains one trial while another thread compiles the next.
        self._counts = threading.local()
        self.fast_compile = jax.default_backend() == "cpu" if fast_compile is None else fast_compile
        # JAX keeps its listeners for the life of the process: the one registered here holds this
        # object only weakly, and goes when the object does, so its compiled programs can be freed.
        me = weakref.ref(self)

        def listener(event: str, **_):
            programs = me()
            if programs is not None:
                programs._on_event(event)

        monitoring.register_event_listener(listener)
        weakref.finalize(self, monitoring.unregister_event_listener, listener)

    def _count(self, compiled=0, hits=0, seconds=0.0) -> None:
        c = self._counts
        c.compiled, c.hits, c.seconds = (getattr(c, "compiled", 0) + compiled, getattr(c, "hits", 0) + hits,
                                         getattr(c, "seconds", 0.0) + seconds)

    def _on_event(self, event: str):
        # Only hits of this class's own compiles count: other jitted code in the trial (the CCA warm
        # start's moments, say) also loads from the persistent cache, on the same thread.
        if event == "/jax/compilation_cache/cache_hits" and getattr(self._counts, "compiling", False):
            self._count(hits=1)

    def counters(self) -> tuple[int, int, float]:
        """This thread's (programs compiled, persistent-cache hits among them, seconds compiling):
        diff two of these."""
        self._count()
        c = self._counts
        return c.compiled, c.hits, c.seconds

    def _get(self, key, lower, fast: bool):
        with self._lock:
            future = self._compiled.get(key)
            owner = future is None
            if owner:
                future = self._compiled[key] = Future()
        if owner:  # else another thread compiles it (or did): its program, or its error
            t0, options = time.perf_counter(), FAST_COMPILE if fast and self.fast_compile else None
            self._counts.compiling = True
            try:
                future.set_result(lower().compile(compiler_options=options))
                self._count(compiled=1, seconds=time.perf_counter() - t0)
            except BaseException as e:
                with self._lock:
                    del self._compiled[key]  # a later call compiles it again
                future.set_exception(e)
            finally:
                self._counts.compiling = False
        return future.result()

    def init_fn(self, key: ProgramKey, members: int):
        """The initialisation of ``members`` members of ``key``'s heads: ``init_fn(hp_K)`` gives
        ``(params, opt_state, rng)`` for ``step.fresh_states``."""
        init = key.init_key()
        hp = _abstract(_example_hparams(members))
        return self._get(("init", init, members), lambda: _init_program.lower(init, hp), fast=True)

    def epoch_fn(self, states: TrainState, data: DeviceData):
        """``step.run_epochs`` compiled for these states and data (``states`` may be abstract)."""
        active = jax.ShapeDtypeStruct((_members(states),), bool)
        return self._get(("epoch", states.key, _shape_key((states, data))),
                         lambda: run_epochs.lower(_abstract(states), _abstract(data), active), fast=False)

    def eval_fn(self, key: ProgramKey, members: int, data: DeviceData, chunk_size: int = DEFAULT_CHUNK_SIZE):
        """The validation of ``members`` members of ``key``'s heads on ``data``: ``eval_fn(params_K, hp_K,
        data)``, its outputs fetched and read with ``encode.member_metrics``."""
        heads = key.heads_key()  # it depends on the heads alone, not on the loss or the optimiser
        states = jax.eval_shape(lambda: fresh_states(key, _example_hparams(members)))
        return self._get(("eval", heads, members, chunk_size, _shape_key(data)),
                         lambda: evaluate_members.lower(heads, states.params, states.hp, _abstract(data),
                                                        chunk_size=chunk_size), fast=True)

    def prepare(self, key: ProgramKey, members: int, data: DeviceData, val_data: DeviceData) -> None:
        """Compile every program a bundle of ``members`` of ``key`` on these sets needs, without running
        any: what a runner does for its next job while the current one trains."""
        self.init_fn(key, members)
        states = jax.eval_shape(lambda: fresh_states(key, _example_hparams(members)))
        self.epoch_fn(states, data)
        self.eval_fn(key, members, val_data)


def _members(tree) -> int:
    return jax.tree.leaves(tree)[0].shape[0]


def _example_hparams(members: int) -> HParams:
    """Host hyperparameters of ``members`` members: their shapes and dtypes are every trial's."""
    from xclip_jax.spec import HeadSpec, LossSpec, TrainingSpec

    return stack([hparams(RunSpec(HeadSpec(), LossSpec(), TrainingSpec(), 2, 2), 0)] * members)


def analysed_bytes(key: ProgramKey, members: int, train, val) -> dict[str, int]:
    """XLA's own figure of the epoch and the validation of ``members`` of ``key`` on sets of these
    sizes (``memory.Rows``): each compiled program's arguments + temporaries, compiled from abstract
    shapes (nothing is allocated or run): what ``memory``'s formula is held against."""
    def data(rows) -> DeviceData:
        return DeviceData(jax.ShapeDtypeStruct((rows.images, key.image_dim), "float32"),
                          jax.ShapeDtypeStruct((rows.rows, key.text_dim), "float32"),
                          jax.ShapeDtypeStruct((rows.rows,), "int32"))

    programs = Programs()
    states = jax.eval_shape(lambda: fresh_states(key, _example_hparams(members)))
    analyses = {"epoch": programs.epoch_fn(states, data(train)).memory_analysis(),
                "eval": programs.eval_fn(key, members, data(val)).memory_analysis()}
    return {name: m.argument_size_in_bytes + m.temp_size_in_bytes for name, m in analyses.items()}
