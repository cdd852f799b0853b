"""Padded widths: what a compiled program is keyed on, and the bucket each trial's widths pad to.

A program is keyed on a :class:`~xclip_jax.spec.ProgramKey`: the head and loss types, the data's
dims, the batch size, the dtype and the *padded* widths (output, hidden, attention layers, queue
slots), and the most attention heads (the space's largest, under any policy: it sets only how many
dropout decisions a step draws). A trial's real widths travel as data (``model.HParams``), so every trial whose widths pad
to the same buckets trains in the same program. Plain Python (no jax): the tuning driver groups
trials into bundles with it.

The policies (``padding:`` in a tuning config):

* ``exact``: each width is its own bucket (no padded FLOPs; a program per combination of widths);
* ``pow2``: a width pads to the next power of two, at most the space's largest choice;
* ``max``: every width pads to the space's largest choice (one program per head, loss and batch).

Which is fastest depends on the device: padded FLOPs cost a CPU time where a GPU has them nearly
free, and a compile costs both (the measurements: benchmarks/RESULTS.md).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from pathlib import Path

from xclip_jax.spec import ProgramKey, RunSpec, hidden_width

PADDINGS = ("exact", "pow2", "max")
# The padding of a study on a CPU when its config says auto: padded FLOPs cost a CPU what a compile
# saves (benchmarks/RESULTS.md); a GPU pads to the space's maximum, where they are nearly free.
CPU_PADDING = "exact"
# The searchable widths a program is padded in (every other spec field is static or data).
WIDTH_FIELDS = ("output_dim", "hidden_dim", "num_layers", "queue_size")


def bucket(value: int, values, policy: str) -> int:
    """The padded size of ``value`` under ``policy``, among the sizes a field can take (``values``)."""
    top = max(values, default=value)
    if policy == "exact" or value >= top:
        return value
    if policy == "max":
        return top
    return min(1 << (value - 1).bit_length(), top)


@dataclasses.dataclass(frozen=True)
class Buckets:
    """A padding policy over the sizes each width can take in a study (``{field: (size, ...)}``;
    a field not listed pads to itself). ``hidden_dim`` may hold None: half of each input dim."""

    policy: str = "exact"
    sizes: tuple = ()  # ((field, (size, ...)), ...): hashable

    def __post_init__(self):
        if self.policy not in PADDINGS:
            raise ValueError(f"padding must be one of {', '.join(PADDINGS)}, got {self.policy!r}")

    @classmethod
    def of(cls, policy: str, sizes: dict) -> Buckets:
        return cls(policy, tuple(sorted((f, tuple(v)) for f, v in sizes.items())))

    def pad(self, field: str, value: int, in_dim: int | None = None) -> int:
        """The bucket of ``value`` for ``field`` (a hidden width of None is ``in_dim // 2``)."""
        values = dict(self.sizes).get(field, (value,))
        if field == "hidden_dim":
            values = [hidden_width(v, in_dim) for v in values]
        return bucket(value, values, self.policy)

    def most(self, field: str, value: int) -> int:
        """The largest size ``field`` takes (at least ``value``), whatever the policy: for a size that
        costs no FLOPs (the attention heads, whose dropout draws one decision per head)."""
        return max((value, *dict(self.sizes).get(field, ())))

    def spread(self, field: str, dims=(0, 0)) -> bool:
        """Whether the sizes of ``field`` fall into more than one bucket (trials that differ in it may
        need different programs)."""
        values = dict(self.sizes).get(field, ())
        if field != "hidden_dim":
            return len({self.pad(field, v) for v in values}) > 1
        return any(len({self.pad(field, hidden_width(v, d), d) for v in values}) > 1 for d in dims)


EXACT = Buckets()


def program_key(spec: RunSpec, buckets: Buckets = EXACT) -> ProgramKey:
    """The key of the programs that train ``spec``, its widths padded to ``buckets`` (default: their
    own sizes). Widths a head or loss does not have are 0."""
    head, loss, training = spec.head, spec.loss, spec.training
    dims = (spec.image_dim, spec.text_dim)
    hidden = (tuple(buckets.pad("hidden_dim", head.hidden_width(d), d) for d in dims)
              if head.type in ("clip", "mlp") else (0, 0))
    return ProgramKey(head=head.type, image_dim=spec.image_dim, text_dim=spec.text_dim,
                      output_dim=buckets.pad("output_dim", head.output_dim), hidden=hidden,
                      num_layers=buckets.pad("num_layers", head.num_layers) if head.type == "attention" else 0,
                      num_heads=buckets.most("num_heads", head.num_heads) if head.type == "attention" else 0,
                      dtype=training.dtype, loss=loss.type,
                      queue_size=buckets.pad("queue_size", loss.queue_size) if loss.type == "queue_infonce" else 0,
                      batch_size=training.batch_size)


def expected_backend() -> str:
    """The backend the trial processes' JAX will take, judged without importing jax: "gpu" where a CUDA
    plugin of jax is installed, an NVIDIA device is there and ``JAX_PLATFORMS`` does not rule it out;
    else "cpu"."""
    platforms = os.environ.get("JAX_PLATFORMS", "")
    if platforms and not any(p in platforms for p in ("cuda", "gpu")):
        return "cpu"
    plugin = any(importlib.util.find_spec(m) is not None for m in ("jax_cuda12_plugin", "jax_cuda13_plugin"))
    device = Path("/dev/nvidia0").exists() or Path("/proc/driver/nvidia/gpus").exists()
    return "gpu" if plugin and device else "cpu"


def resolve(policy: str, backend: str | None = None) -> str:
    """A config's ``padding`` with ``auto`` made the policy of ``backend`` (default: the expected one)."""
    if policy != "auto":
        return policy
    return "max" if (backend or expected_backend()) == "gpu" else CPU_PADDING


# Trials trained in one program with batch_trials: auto: one, on either backend. A CPU runs a bundle's
# members one after another inside each step (a bundle's epoch costs K epochs); on a GPU they would
# train at once, but search quality does not depend on the device and bundles lost it: over the 8
# choosing seeds of the real set, K = 4 handed over a mean test R@1 0.011 below one member's, with
# twice the spread, and padded to the maximum (a GPU's) seeds 0-2 lost 0.024 (benchmarks/RESULTS.md).
# A GPU gets more than one only once a measurement shows it within 0.005 of one member's mean and no
# worse on the worst seed.
AUTO_BATCH_TRIALS = {"cpu": 1, "gpu": 1}


def for_backend(cfg):
    """A tuning config with its ``auto`` settings made the expected backend's (``padding``,
    ``batch_trials``), and the start-up line that says what ``batch_trials: auto`` became (or None)."""
    backend = expected_backend()
    cfg = dataclasses.replace(cfg, padding=resolve(cfg.padding, backend))
    if cfg.batch_trials != "auto":
        return cfg, None
    k = AUTO_BATCH_TRIALS[backend]
    why = ("bundles of companions lost search quality (benchmarks/RESULTS.md)" if backend == "gpu"
           else "a CPU's bundle epoch costs K epochs")
    return dataclasses.replace(cfg, batch_trials=k), f"batch_trials: auto -> {k} ({why})"


def study_buckets(cfg) -> Buckets:
    """What a tuning study's widths pad to: its ``padding`` over the sizes each width can take (its
    search-space values, else its fixed value; a width neither names is the default, itself)."""
    sizes = {}
    for field in (*WIDTH_FIELDS, "num_heads"):
        if field in cfg.search_space:
            sizes[field] = tuple(cfg.search_space[field].values())
        elif field in cfg.fixed:
            sizes[field] = (cfg.fixed[field],)
    return Buckets.of(resolve(cfg.padding), sizes)
