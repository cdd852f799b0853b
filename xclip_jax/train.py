"""``python -m xclip_jax.train CONFIG``: one config trained end to end.

``run_training`` loads the data, builds the state (``init: cca`` applied), runs the fit loop
(``xclip_jax.fit``) with hooks that compute the validation loss, save the best heads and save a
resumable state, then writes the history, the curves and the final evaluation.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import jax

from xclip_jax.baselines import with_head_init
from xclip_jax.fit import FitState, Hook, fit
from xclip_jax.spec import RunSpec
from xclip_jax.step import TrainingDiverged, TrainState, create_train_state, eval_loss, to_device

# ----------------------------------------------------------------------------- the training CLI's hooks


def validation_loss(val_data) -> Hook:
    """Adds the epoch's validation loss to its record (one compiled program more; trials skip it)."""

    def hook(record, fs, state):
        record["val_loss"] = float(eval_loss(state(), val_data))

    return hook


def save_best(save) -> Hook:
    """Calls ``save(params, epoch, val_r1)`` whenever the epoch is the best so far."""

    def hook(record, fs, state):
        if fs.improved_at(record["epoch"]):
            save(fs.best_params, record["epoch"], record["val_r1"])

    return hook


def throughput(rows: int, device: str) -> Hook:
    """Adds the device and the training rows per second to each epoch's record."""
    from xclip_jax.runtime import rows_per_second

    def hook(record, fs, state):
        record.update(device=device, rows_per_second=rows_per_second(rows, record["train_time"]))

    return hook


def save_for_resume(directory: Path, config: dict) -> Hook:
    """Saves the train state, the fit state and the config after every epoch (``--resume``)."""
    from xclip_jax import checkpoint

    def hook(record, fs, state):
        checkpoint.save_state(directory, state(), {**fs.to_json(), "config": config}, step=record["epoch"])

    return hook


# ----------------------------------------------------------------------------- from a config


def check_fits(cfg, train_set) -> None:
    """Config-vs-data checks (``spec.fit_problems``): an error in one line, or warnings."""
    from xclip_jax.errors import UserError, warn
    from xclip_jax.spec import fit_problems

    errors, warnings = fit_problems(cfg.model, cfg.loss, cfg.training, image_dim=train_set.image_dim,
                                    text_dim=train_set.text_dim, rows=train_set.rows)
    if errors:
        raise UserError(errors[0])
    for message in warnings:
        warn(message)


# Keys that may change between an interrupted run and its --resume: they do not change what the
# epochs already trained computed (where the run stops, what the final evaluation writes, where).
SAFE_ON_RESUME = ("training.num_epochs", "training.patience", "evaluation.", "device", "output_dir",
                  "experiment_name")


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def check_resumable(saved: dict | None, current: dict) -> None:
    """Refuse to resume with a changed config, except keys that are safe to change (applied, and
    said in one line each)."""
    from xclip_jax.errors import UserError

    if saved is None:  # a resume state from before configs were recorded
        return
    old, new = _flat(saved), _flat(current)
    changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
    unsafe = [k for k in changed if not k.startswith(SAFE_ON_RESUME)]
    if unsafe:
        said = ", ".join(f"{k} ({old.get(k)!r} -> {new.get(k)!r})" for k in unsafe[:4])
        more = f" and {len(unsafe) - 4} more" if len(unsafe) > 4 else ""
        raise UserError(f"cannot --resume: the config changed {said}{more} since the interrupted run; revert "
                        "them, or train anew without --resume (or under another experiment_name)")
    for k in changed:
        print(f"resume: {k} {old.get(k)!r} -> {new.get(k)!r} (applied)")


def _resumed(resume_dir: Path, ckpt_dir: Path, state: TrainState, config: dict):
    """The train state and fit state of an interrupted run (after checking its config), or None."""
    from xclip_jax import checkpoint
    from xclip_jax.errors import warn

    saved = checkpoint.read_state_extra(resume_dir)
    if saved is None:
        warn(f"--resume: no interrupted run in {resume_dir}; training from epoch 0")
        return None
    check_resumable(saved.get("config"), config)
    state, saved = checkpoint.restore_state(resume_dir, state)
    best_params, _ = checkpoint.load_raw(ckpt_dir)
    fs = FitState.from_json(saved, best_params)
    print(f"resuming from epoch {fs.epoch + 1} (best so far: epoch {fs.best_epoch + 1}, val R@1 {fs.best_r1:.4f})")
    return jax.device_put(state), fs


def run_training(cfg, out_dir, *, resume: bool = False, progress: bool = True) -> dict:
    """Train one config end to end (the training CLI): data → state → fit → best checkpoint →
    history, curves, and the final evaluation (``xclip_jax.evaluate.write_evaluation``).

    Args:
      cfg: a typed TrainConfig. out_dir: where everything goes (``checkpoint/``, ``resume/``, …).
      resume: continue from ``out_dir/resume`` if present (same final result as an uninterrupted run).

    Returns:
      A summary dict: best_epoch, best_val_r1, stopped, epochs, compile_seconds, train_seconds,
      metrics (test and val).
    """
    import json

    from xclip_jax import checkpoint
    from xclip_jax.config import settings_line, to_dict
    from xclip_jax.data import load_sets
    from xclip_jax.errors import UserError
    from xclip_jax.evaluate import write_evaluation
    from xclip_jax.figures import plot_curves
    from xclip_jax.runtime import device_info, device_line, rows_per_second

    out_dir = Path(out_dir)
    ckpt_dir, resume_dir = out_dir / "checkpoint", out_dir / "resume"
    if not resume and (checkpoint.latest_step(ckpt_dir) is not None or checkpoint.latest_step(resume_dir) is not None):
        # a new run's checkpoints would mix with the earlier run's (the newest step wins): keep the earlier run
        raise UserError(f"{out_dir} holds an earlier run's checkpoint; continue it with --resume, train anew "
                        f"with --output-dir DIR (or another experiment_name), or remove {out_dir} first")
    sets = load_sets(cfg.data, cfg.base_data_dir)
    check_fits(cfg, sets["train"])
    print(settings_line(cfg, sets["train"].image_dim, sets["train"].text_dim))
    device = device_info(jax.config.jax_default_device or jax.devices()[0])
    print(device_line(device))
    out_dir.mkdir(parents=True, exist_ok=True)  # once the config and the data are known to be good
    train_data, val_data = to_device(sets["train"]), to_device(sets["val"])
    spec = RunSpec.of(cfg, sets["train"].image_dim, sets["train"].text_dim)
    state = with_head_init(create_train_state(spec, seed=cfg.seed), [cfg.model], sets["train"])
    config = to_dict(cfg)
    resumed = _resumed(resume_dir, ckpt_dir, state, config) if resume else None
    state, fit_state = resumed if resumed else (state, None)

    def save(params, epoch, r1):
        checkpoint.save_heads(ckpt_dir, params, config, checkpoint.heads_metadata(sets["train"], epoch, r1), step=epoch)

    hooks = (throughput(sets["train"].rows, device_line(device).removeprefix("device: ")), validation_loss(val_data),
             save_best(save), save_for_resume(resume_dir, config))
    state, fs = fit(state, train_data, val_data, fit_state, num_epochs=cfg.training.num_epochs,
                    patience=cfg.training.patience, hooks=hooks, ks=tuple(cfg.evaluation.top_k), progress=progress)
    if fs.stopped.startswith("diverged"):  # the best epoch before it, if any, is saved in checkpoint/
        raise TrainingDiverged.at(fs.stopped)
    (out_dir / "training_history.json").write_text(json.dumps(fs.history, indent=2))
    summary = {"best_epoch": fs.best_epoch, "best_val_r1": fs.best_r1, "stopped": fs.stopped,
               "epochs": len(fs.history), "compile_seconds": fs.compile_seconds, "train_seconds": fs.train_seconds(),
               "device": device,
               "rows_per_second": rows_per_second(sets["train"].rows * len(fs.history), fs.train_seconds()),
               "no_test_set": "test" not in sets}
    if fs.best_params is not None:
        plot_curves(fs.history, fs.best_epoch, out_dir / "training_curves.png")
        metrics = write_evaluation(cfg, spec, fs.best_params, sets, out_dir)
        summary["metrics"] = {"best_epoch": fs.best_epoch, "best_val_r1": fs.best_r1, **metrics,
                              "device": device, "rows_per_second": summary["rows_per_second"]}
        (out_dir / "metrics.json").write_text(json.dumps(summary["metrics"], indent=2))
    return summary


# ----------------------------------------------------------------------------- the CLI

INTERRUPTED = ("interrupted: the last finished epoch is saved; run the same command with --resume to continue "
               "from there")


def select_device(device: str):
    """The JAX device a config's ``device`` names (None: JAX's default). ``cuda``/``gpu`` on a machine
    where JAX sees no GPU warns in one line and trains on the CPU, as the original fell back."""
    from xclip_jax.errors import UserError, install_hint, warn

    if device == "auto":
        return None
    kind, _, index = device.partition(":")
    platform = "cpu" if kind == "cpu" else "gpu"
    try:
        devices = jax.devices(platform)
    except RuntimeError:
        warn(f"device: {device}, but JAX sees no GPU (install with {install_hint('cuda12')}); training on the CPU")
        return jax.devices("cpu")[0]
    if int(index or 0) >= len(devices):
        raise UserError(f"device: {device}, but JAX sees {len(devices)} {platform} device(s); "
                        f"use {kind}:0 to {kind}:{len(devices) - 1}")
    return devices[int(index or 0)]


def parser():
    """``python -m xclip_jax.train``'s argument parser."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m xclip_jax.train",
        description="Train one configuration end to end: both heads with early stopping on validation R@1, then "
                    "the best epoch's checkpoint, the training history and curves, and the test and val metrics, "
                    "all under output_dir/experiment_name. It prints the resolved settings (defaults filled in) "
                    "at start.")
    parser.add_argument("config", help="training YAML (the original's keys are accepted), e.g. a study's "
                                       "best_config.yaml")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted run from its last epoch")
    parser.add_argument("--output-dir", metavar="DIR", help="write under DIR instead of the config's output_dir")
    parser.add_argument("--num-epochs", type=int, metavar="N", help="train at most N epochs instead of the config's "
                                                                  "training.num_epochs")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    return parser


def next_line(out_dir: Path) -> str:
    """The line that ends a training run: what to do with its heads."""
    import shlex

    ckpt = shlex.quote(str(out_dir / "checkpoint"))
    return (f"next: python -m xclip_jax.export {ckpt} --format safetensors   (the heads for other code; --format torch "
            f"writes the original's best_model.pt); python -m xclip_jax.evaluate {ckpt} --set NAME --data-dir DIR "
            "scores them on another set")


def main(argv=None):
    """``python -m xclip_jax.train CONFIG [--resume] [--output-dir DIR] [--num-epochs N] [--no-progress]``."""
    from xclip_jax.config import load_train_config
    from xclip_jax.errors import UserError
    from xclip_jax.metrics import format_table

    args = parser().parse_args(argv)
    if args.num_epochs is not None and args.num_epochs < 1:
        raise UserError(f"--num-epochs {args.num_epochs}: give a number of epochs >= 1")
    cfg = load_train_config(args.config)
    if args.output_dir:
        cfg = dataclasses.replace(cfg, output_dir=args.output_dir)
    if args.num_epochs is not None:
        cfg = dataclasses.replace(cfg, training=dataclasses.replace(cfg.training, num_epochs=args.num_epochs))
    out_dir = Path(cfg.output_dir) / cfg.experiment_name
    try:
        with jax.default_device(select_device(cfg.device)):
            summary = run_training(cfg, out_dir, resume=args.resume, progress=not args.no_progress)
    except TrainingDiverged as e:
        raise UserError(str(e)) from None
    rate = f"; {summary['rows_per_second']:,.0f} training rows/s" if summary["rows_per_second"] else ""
    # counted from 1, as the export and the curves count (the history's records count from 0)
    print(f"best epoch {summary['best_epoch'] + 1} of {summary['epochs']} (val R@1 {summary['best_val_r1']:.4f}, "
          f"{summary['stopped']}){rate} on {summary['device']['backend']}")
    for split in ("test", "val"):
        if split in summary.get("metrics", {}):
            print(f"\n{split}:\n{format_table(summary['metrics'][split])}")
    if summary["no_test_set"]:
        from xclip_jax.data import no_test_set

        print(f"warning: {no_test_set(cfg.data, cfg.base_data_dir)}", file=sys.stderr)
    print(f"\noutputs in {out_dir}")
    if "metrics" in summary:  # a best epoch was saved
        print(next_line(out_dir))
    return 0


if __name__ == "__main__":
    from xclip_jax.errors import cli

    raise SystemExit(cli(main, interrupted=INTERRUPTED)())
