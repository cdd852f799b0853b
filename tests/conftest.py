"""Test-wide settings and the helpers the tuning, fault and error tests share."""

import jax

# Compare against float64 references at full float32 matmul precision: on GPUs JAX's default
# lets float32 matmuls run in TF32 (10-bit mantissa), which is a speed choice, not the formula.
jax.config.update("jax_default_matmul_precision", "highest")

import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import textwrap  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import optuna  # noqa: E402
import pytest  # noqa: E402
import yaml  # noqa: E402
from optuna.trial import TrialState  # noqa: E402

from xclip_jax.errors import cli  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def shared_compilation_cache(tmp_path_factory):
    """One persistent JAX compilation cache for every trial process the tests start.

    The tests start many trial processes with the same tiny shapes; sharing the cache between
    them (as the tuner does in a real study) makes all but the first compile of each program a
    cache hit. It lives in the session's temp dir, so nothing leaks between runs.
    """
    os.environ["XCLIP_JAX_CACHE"] = str(tmp_path_factory.mktemp("jax_cache"))
    yield


# ----------------------------------------------------------------------------- a tiny study

TUNE = textwrap.dedent("""\
    study_name: tiny
    n_trials: {n_trials}
    n_jobs: 2
    storage: sqlite:///{dir}/study.db
    data:
      synthetic: {{images: 300, captions: 5, image_dim: 16, text_dim: 24, val_images: 60, test_images: 20,
                  noise: 0.5, seed: 0}}
    search_space:
      head_type: {{type: categorical, choices: [siglip, clip, mlp]}}
      hidden_dim: {{type: categorical, choices: [16, 32]}}
      loss_type: {{type: categorical, choices: [softmax_infonce, sigmoid_infonce]}}
      learning_rate: {{type: float, low: 1.0e-4, high: 3.0e-2, log: true}}
      batch_size: {{type: categorical, choices: [64, 128]}}
    fixed: {{output_dim: 16}}
    pruner: {{type: SuccessiveHalvingPruner, min_resource: 1, reduction_factor: 2, min_early_stopping_rate: 0}}
    sampler: {{type: tpe, seed: 7, n_startup_trials: 4}}
    max_epochs: 4
    max_patience: 3
    output_dir: {dir}/results
    checkpoint_dir: {dir}/checkpoints
    final_epochs: 2
    heartbeat_interval: 1
    grace_period: 5
    baselines: false
""")


def write(tmp, n_trials=6, **patch):
    """The tiny study's config in ``tmp`` (top-level keys replaced by ``patch``); returns its path."""
    raw = yaml.safe_load(TUNE.format(n_trials=n_trials, dir=tmp))
    raw.update(patch)
    path = Path(tmp) / "tune.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def env(tmp):
    e = dict(os.environ)
    e.setdefault("XCLIP_JAX_CACHE", str(Path(tmp) / "jax_cache"))
    e["PYTHONUNBUFFERED"] = "1"
    return e


# The driver runs as `python -m xclip_jax.tune` would, then proves it never imported jax, flax or optax.
_DRIVER = textwrap.dedent("""\
    import sys
    from xclip_jax import tune
    from xclip_jax.errors import cli
    try:
        code = cli(tune.main)(sys.argv[1:])
    except SystemExit as e:
        code = e.code
    heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("jax", "jaxlib", "flax", "optax", "orbax"))
    if heavy:
        print("the driver imported", heavy[:5], file=sys.stderr)
        code = 99
    sys.exit(code)
""")


def tune_command(cfg_path, *extra):
    return [sys.executable, "-c", _DRIVER, str(cfg_path), "--no-progress", *extra]


def driver(tmp, cfg_path, *extra, env_patch=None):
    """Start the tuning driver on ``cfg_path`` (stdout and stderr together, text)."""
    e = env(tmp)
    e.update(env_patch or {})
    return subprocess.Popen(tune_command(cfg_path, *extra), env=e, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def tune_run(tmp, cfg_path, *extra, timeout=600, env_patch=None):
    """Run the tuning driver to its end; returns the CompletedProcess."""
    e = env(tmp)
    e.update(env_patch or {})
    return subprocess.run(tune_command(cfg_path, *extra), env=e, capture_output=True, text=True, timeout=timeout)


def load(tmp, name="tiny", storage=None):
    return optuna.load_study(study_name=name, storage=storage or f"sqlite:///{tmp}/study.db")


def wait_for(pred, timeout=120, what="condition"):
    end = time.time() + timeout
    while time.time() < end:
        got = pred()
        if got:
            return got
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def running_with_pid(tmp, n=1):
    """The study's RUNNING trials once at least ``n`` of them have recorded their process id."""
    try:
        trials = load(tmp).get_trials(states=(TrialState.RUNNING,))
    except Exception:
        return None
    with_pid = [t for t in trials if "pid" in t.user_attrs]
    return with_pid if len(with_pid) >= n else None


def run_cli(main, argv, capsys):
    """Run a CLI's main through the error wrapper: it must exit 2 with one line and no traceback."""
    with pytest.raises(SystemExit) as e:
        cli(main)(argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err
