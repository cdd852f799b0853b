"""What the tuning driver and its trial processes share, below both: the folders a study owns, the
header of a trial's ``cfg.yaml``, the host's name, and how the storage URL reaches a trial."""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from xclip_jax.errors import UserError

TRIAL_HEADER = "# trial {number} of study {study}\n"  # the first line of each trial's cfg.yaml
MARKER = ".study_name"  # in checkpoint_dir and output_dir: the study that owns the folder
STORAGE_ENV = "XCLIP_STORAGE_URL"  # the storage URL (password included) reaches trials this way, never in a file


def host_name() -> str:
    """This machine's name in trial attributes (``XCLIP_HOSTNAME`` overrides, e.g. in containers)."""
    return os.environ.get("XCLIP_HOSTNAME") or socket.gethostname()


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


def owner(directory: Path, kind: str) -> str | None:
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
    taken = {kind: (folder, name) for kind, folder in folders.items()
             if (name := owner(Path(folder), kind)) not in (None, study_name)}
    if not taken:
        return
    what = {"checkpoint_dir": "the trial checkpoints", "output_dir": "the outputs"}
    said = "; ".join(f"{kind} {folder} holds {what[kind]} of study '{name}'" for kind, (folder, name) in taken.items())
    flags = " and ".join(f"--{kind.replace('_', '-')}" for kind in taken)
    raise UserError(f"{said}: study '{study_name}' would overwrite them; give it its own {' and '.join(taken)} "
                    f"({flags})")


def claim(folders: dict, study_name: str) -> None:
    """Mark each folder as this study's (after ``check_owners`` passed)."""
    for folder in folders.values():
        marker = Path(folder) / MARKER
        if not marker.exists():
            marker.write_text(study_name + "\n")


def runner_env(storage: str) -> dict:
    """The environment of the processes a study starts (runners, baselines): no preallocation of the
    card (processes share it), one persistent compilation cache, the storage URL (never in a file)."""
    env = dict(os.environ)
    env.update({
        "XLA_PYTHON_CLIENT_PREALLOCATE": "false",
        "JAX_COMPILATION_CACHE_DIR": os.environ.get("XCLIP_JAX_CACHE", str(Path.home() / ".cache" / "xclip_jax" / "jax")),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
        STORAGE_ENV: storage,
        "PYTHONUNBUFFERED": "1",
    })
    return env


def start_baselines(cache_dir: Path, log_path: Path, env: dict) -> subprocess.Popen:
    """``python -m xclip_jax.baselines`` on a study's data cache, writing its ``baselines.json``."""
    log = open(log_path, "w")
    return subprocess.Popen([sys.executable, "-m", "xclip_jax.baselines", "--cache", str(cache_dir), "--out",
                             str(cache_dir / "baselines.json")], stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, env=env, start_new_session=True)


# Where a study writes when its config names no folder: a folder of its own under each of these, so
# that studies run one after another (the original's configs, say) never share one.
FOLDER_ROOTS = {"output_dir": "optuna_results", "checkpoint_dir": "checkpoints"}


def default_folder(kind: str, study_name: str) -> str:
    """A study's ``kind`` folder (output_dir, checkpoint_dir) when its config names none:
    ``optuna_results/<study_name>`` or ``checkpoints/<study_name>``, or the root itself where it already
    holds this study's files (a study begun when the roots were every study's folders)."""
    root = FOLDER_ROOTS[kind]
    if owner(Path(root), kind) == study_name:
        return root
    if not study_name or Path(study_name).name != study_name or study_name in (".", ".."):
        raise UserError(f"study_name {study_name!r} can't name a folder; set {kind} in the config")
    return str(Path(root) / study_name)


def output_root(output_dir) -> Path:
    """Where the files a study's outputs can share with other studies' live (one plotly.js, one copy
    of each data set): the folder that holds the studies' own folders (``optuna_results/`` of
    ``optuna_results/<study>``), else the study's output_dir itself."""
    folder = Path(output_dir)
    return folder.parent if folder.parent.name == FOLDER_ROOTS["output_dir"] else folder


def with_study_folders(cfg):
    """A tuning config with each folder it leaves null filled in (:func:`default_folder`)."""
    changes = {kind: default_folder(kind, cfg.study_name) for kind in FOLDER_ROOTS if getattr(cfg, kind) is None}
    return dataclasses.replace(cfg, **changes) if changes else cfg


# ----------------------------------------------------------------------------- the machine


def cores() -> int:
    """The CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _proc_field(path: str, field: str) -> str | None:
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(field):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def _host() -> tuple[str, float | None]:
    """The CPU's model name with its cores, and the host's memory in GiB (None when unknown)."""
    import platform

    name = _proc_field("/proc/cpuinfo", "model name") or platform.processor() or "CPU"
    kib = _proc_field("/proc/meminfo", "MemTotal")
    return f"{name} ({cores()} cores)", int(kib.split()[0]) / 2**20 if kib else None


def nvidia_cards() -> dict[int, tuple[str, int]]:
    """The NVIDIA cards ``nvidia-smi`` lists, ``{index: (name, memory bytes)}`` (no jax); empty without it."""
    try:
        done = subprocess.run(["nvidia-smi", "--query-gpu=index,name,memory.total", "--format=csv,noheader,nounits"],
                              capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return {}
    cards = {}
    for line in done.stdout.splitlines() if done.returncode == 0 else ():
        fields = [f.strip() for f in line.split(",")]
        if len(fields) == 3 and fields[0].isdigit() and fields[2].isdigit():
            cards[int(fields[0])] = (fields[1], int(fields[2]) * 2**20)
    return cards


def gpu_memory_bytes(devices=None) -> int | None:
    """The memory of the smallest of the study's GPUs (``devices``: their indices; None: all); None
    where there is no NVIDIA GPU."""
    cards = nvidia_cards()
    picked = [cards[i][1] for i in (devices if devices else cards) if i in cards]
    return min(picked) if picked else None


def device_info(jax_device=None) -> dict:
    """What runs the work: ``{"backend", "device", "memory_gb"}``. From ``jax_device`` where one is
    given (its platform, kind and memory); else judged without jax, as the tuning driver must (the
    backend its trial processes will take, ``nvidia-smi`` for a card)."""
    from xclip_jax.padding import expected_backend

    if jax_device is not None:
        backend, device, memory = jax_device.platform, jax_device.device_kind, None
        try:
            memory = (jax_device.memory_stats() or {}).get("bytes_limit")
            memory = memory / 2**30 if memory else None
        except Exception:  # a backend without memory statistics
            pass
    else:
        backend, device, memory = expected_backend(), None, None
        if backend == "gpu":
            cards = nvidia_cards()
            device, memory = (cards[min(cards)][0], cards[min(cards)][1] / 2**30) if cards else ("GPU", None)
    if backend == "cpu":
        device, memory = _host()
    return {"backend": backend, "device": device, "memory_gb": None if memory is None else round(memory, 1)}


def device_line(info: dict) -> str:
    """``device: cpu backend, Intel(R) Xeon(R) … (2 cores), 23.4 GiB memory``."""
    memory = f"{info['memory_gb']:.1f} GiB memory" if info.get("memory_gb") else "memory unknown"
    return f"device: {info['backend']} backend, {info['device']}, {memory}"


def cores_warning(n_jobs: int, backend: str) -> str | None:
    """A warning when more trial processes than CPU cores would share a CPU (on a GPU the card's
    memory limits ``n_jobs``, not the cores)."""
    have = cores()
    if backend != "cpu" or n_jobs <= have:
        return None
    return (f"n_jobs {n_jobs} is above this machine's {have} CPU cores: the trial processes take turns on them "
            f"(the same results, every start-up and epoch slower); set n_jobs: {have} (or --n-jobs {have})")


def announce_study(cfg) -> dict:
    """A study's start-up lines about where it runs: the device (stdout), and warnings (stderr) for
    more trial processes than cores and for a config without a test set. Returns the device info."""
    from xclip_jax.data import no_test_set

    info = device_info()
    print(f"{device_line(info)}; {cfg.n_jobs} trial process{'es' if cfg.n_jobs > 1 else ''} at once")
    for warning in (cores_warning(cfg.n_jobs, info["backend"]), no_test_set(cfg.data, cfg.base_data_dir)):
        if warning:
            print(f"warning: {warning}", file=sys.stderr)
    return info


def rows_per_second(rows_trained: float, seconds: float) -> float | None:
    """Training rows per second (None without time to divide by)."""
    return round(rows_trained / seconds, 1) if seconds > 0 else None
