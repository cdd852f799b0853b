"""The compiled programs of training, compiled ahead of time, keyed on static shapes only, and kept.

A warm trial runner keeps one :class:`Programs` for all its trials, so a trial whose shapes it has
seen compiles nothing, and it can compile its next trial's programs in another thread while the
current one trains. The training CLI's fit uses one too (its epoch, evaluation and params copy; its state comes from
``step.create_train_state``).
"""

from __future__ import annotations

import threading
import time
import weakref

import jax
import jax.numpy as jnp

from xclip_jax.metrics import DEFAULT_CHUNK_SIZE
from xclip_jax.step import (
    DeviceData,
    RunSpec,
    TrainState,
    _bundle_eval_program,
    _eval_program,
    _fresh_bundle,
    _fresh_state,
    bundle_args,
    run_bundle_epoch,
    run_epoch,
    state_args,
)

_copy_params = jax.jit(lambda tree: jax.tree.map(jnp.copy, tree))

# What a program that runs briefly (state init, the evaluation, a params copy) is compiled with on a
# CPU: most of XLA's optimisations off. They cost much of its compile time and little of its run
# time; the epoch program, which runs for the whole trial, keeps them (see benchmarks/RESULTS.md).
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _abstract(tree):
    """Shapes and dtypes (weak types too) of arrays or ShapeDtypeStructs: what a program is keyed on."""
    return jax.eval_shape(lambda t: t, tree)


def _shape_key(tree) -> tuple:
    leaves, treedef = jax.tree.flatten(_abstract(tree))
    return treedef, tuple((x.shape, str(x.dtype), x.weak_type) for x in leaves)


class _Compiling:
    """A compile in progress: the threads that need the same program wait for it, and get its error
    when it fails (the owner may be a thread that compiles ahead and reports to no one)."""

    def __init__(self):
        self.done = threading.Event()
        self.error: BaseException | None = None


class Programs:
    """The compiled programs of training (state init, epoch, evaluation, params copy), compiled ahead
    of time, keyed on static shapes only, and kept: a warm trial runner compiles nothing for a trial
    whose shapes it has seen. Safe to fill from another thread (a runner compiles its next trial's
    programs while the current one trains); counts what it compiled and what came from JAX's
    persistent cache.
    """

    def __init__(self, fast_compile: bool | None = None):
        from jax import monitoring

        self._compiled: dict = {}
        self._pending: dict[tuple, _Compiling] = {}
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
            if key in self._compiled:
                return self._compiled[key]
            compiling = self._pending.get(key)
            owner = compiling is None
            if owner:
                compiling = self._pending[key] = _Compiling()
        if not owner:  # another thread compiles it right now: its program, or its error
            compiling.done.wait()
            if compiling.error is not None:
                raise compiling.error
            return self._compiled[key]
        try:
            t0 = time.perf_counter()
            options = FAST_COMPILE if fast and self.fast_compile else None
            self._counts.compiling = True
            try:
                compiled = lower().compile(compiler_options=options)
            finally:
                self._counts.compiling = False
            with self._lock:
                self._compiled[key] = compiled
            self._count(compiled=1, seconds=time.perf_counter() - t0)
            return compiled
        except BaseException as e:
            compiling.error = e
            raise
        finally:
            with self._lock:
                del self._pending[key]
            compiling.done.set()

    def init_fn(self, spec: RunSpec):
        """The state-init program of ``spec``: ``init_fn(*state_args(spec, seed)[1:])`` is
        ``create_train_state(spec, seed)``."""
        static_spec = spec.static()
        return self._get(("init", static_spec), lambda: _fresh_state.lower(*state_args(spec, 0)), fast=True)

    def epoch_fn(self, state: TrainState, data: DeviceData):
        """``run_epoch`` compiled for these shapes (``state`` may be abstract)."""
        key = ("epoch", state.spec, _shape_key((state, data)))
        return self._get(key, lambda: run_epoch.lower(_abstract(state), _abstract(data)), fast=False)

    def eval_fn(self, spec: RunSpec, params, data: DeviceData, chunk_size: int = DEFAULT_CHUNK_SIZE):
        """The evaluation program (``params`` may be abstract); run it with :func:`run_eval`."""
        spec = spec.heads_only()  # it depends on the heads alone, not on the loss or the optimiser
        return self._get(("eval", spec, chunk_size, _shape_key((params, data))),
                         lambda: _eval_program.lower(spec, _abstract(params), _abstract(data), chunk_size), fast=True)

    def copy_fn(self, params):
        """A program that copies ``params`` (safe from the next epoch's donation)."""
        return self._get(("copy", _shape_key(params)), lambda: _copy_params.lower(_abstract(params)), fast=True)

    # -- bundles: K same-shape trials in one program (a leading member axis) ----------------

    def bundle_init_fn(self, spec: RunSpec, size: int):
        """The init program of a bundle of ``size`` members of ``spec``'s shapes."""
        return self._get(("bundle_init", spec.static(), size),
                         lambda: _fresh_bundle.lower(*bundle_args([spec] * size, range(size))), fast=True)

    def bundle_epoch_fn(self, states: TrainState, data: DeviceData):
        """``run_bundle_epoch`` compiled for these shapes (``states`` may be abstract)."""
        size = jax.tree.leaves(states)[0].shape[0]
        key = ("bundle_epoch", states.spec, _shape_key((states, data)))
        return self._get(key, lambda: run_bundle_epoch.lower(_abstract(states), _abstract(data),
                                                             jax.ShapeDtypeStruct((size,), bool)), fast=False)

    def bundle_eval_fn(self, spec: RunSpec, params_K, data: DeviceData, chunk_size: int = DEFAULT_CHUNK_SIZE):
        """The evaluation of every member at once; run it with ``step.run_bundle_eval``."""
        spec = spec.heads_only()
        return self._get(("bundle_eval", spec, chunk_size, _shape_key((params_K, data))),
                         lambda: _bundle_eval_program.lower(spec, _abstract(params_K), _abstract(data), chunk_size),
                         fast=True)

    def keep_best_fn(self, params_K):
        """``keep_best(best_K, params_K, improved_K)``: each member's best params so far."""
        size = jax.tree.leaves(params_K)[0].shape[0]
        return self._get(("keep_best", _shape_key(params_K)),
                         lambda: _keep_best.lower(_abstract(params_K), _abstract(params_K),
                                                  jax.ShapeDtypeStruct((size,), bool)), fast=True)

    def prepare(self, spec: RunSpec, data: DeviceData, val_data: DeviceData, size: int = 1) -> None:
        """Compile every program a trial (``size`` 1) or a bundle of ``spec`` on these sets needs,
        without running any: what a runner does for its next job while the current one trains."""
        if size > 1:
            self.bundle_init_fn(spec, size)
            states = jax.eval_shape(lambda *a: _fresh_bundle(spec.static(), *a),
                                    *bundle_args([spec] * size, range(size))[1:])
            self.bundle_epoch_fn(states, data)
            self.bundle_eval_fn(spec, states.params, val_data)
            self.keep_best_fn(states.params)
            return
        args = state_args(spec, 0)
        self.init_fn(spec)
        state = jax.eval_shape(lambda *a: _fresh_state(args[0], *a), *args[1:])
        self.epoch_fn(state, data)
        self.eval_fn(spec, state.params, val_data)
        self.copy_fn(state.params)


@jax.jit
def _keep_best(best_K, params_K, improved_K):
    # Not donated: the first call passes the params themselves as the best so far.
    return jax.tree.map(lambda b, p: jnp.where(improved_K.reshape((-1,) + (1,) * (p.ndim - 1)), p, b),
                        best_K, params_K)
