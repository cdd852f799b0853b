"""``python -m xclip_jax.tune``'s command line: the config's path (positional, ``--config`` or the
default), the flags that override the config's keys, and the others (``--add-trials``, progress)."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from xclip_jax.config import ConfigError
from xclip_jax.errors import UserError
from xclip_jax.runtime import with_study_folders
from xclip_jax.tune_config import TuneConfig, load_tune_config, validate_tune

DEFAULT_CONFIG = "configs/default.yaml"


def _config_path(positional: str | None, option: str | None) -> str:
    """The config named on the command line (positionally or with ``--config``), else the default."""
    if positional and option and positional != option:
        raise UserError(f"two configs given ({positional} and --config {option}); give one")
    path = positional or option
    if path:
        return path
    if Path(DEFAULT_CONFIG).is_file():
        return DEFAULT_CONFIG
    raise UserError(f"no config given and no {DEFAULT_CONFIG} here; run python -m xclip_jax.tune CONFIG "
                    "(e.g. configs/quickstart.yaml from the repository)")


# Command-line flags that override the config's key of the same name.
OVERRIDES = ("storage", "study_name", "n_trials", "n_jobs", "timeout", "output_dir", "checkpoint_dir", "max_epochs",
             "max_patience", "batch_trials", "warm_start_from", "device_memory_gb")


def parser() -> argparse.ArgumentParser:
    """``python -m xclip_jax.tune``'s argument parser."""
    parser = argparse.ArgumentParser(
        prog="python -m xclip_jax.tune",
        description="Run or resume an Optuna study that tunes projection heads: each trial trains in a runner "
                    "process, and the study writes its best config, results, summary and plots into output_dir. "
                    "Rerunning the same command resumes the study. A flag named after a config key (--n-trials: "
                    "n_trials) overrides it.")
    parser.add_argument("config", nargs="?", help=f"tuning YAML (the original's keys are accepted); default "
                                                  f"{DEFAULT_CONFIG} when it exists")
    parser.add_argument("--config", dest="config_option", metavar="CONFIG", help="the same, as the original's flag")
    parser.add_argument("--storage", metavar="URL", help="Optuna storage URL, e.g. sqlite:///optuna.db or "
                                                         "postgresql+psycopg://user@host/db")
    parser.add_argument("--study-name", metavar="NAME", help="the study to run or resume in the storage")
    parser.add_argument("--n-trials", type=int, metavar="N",
                        help="the study's total: trials it has finished count toward it (a rerun runs the rest); "
                             "to run N more than it has, use --add-trials")
    parser.add_argument("--n-jobs", type=int, metavar="N", help="trial processes at once on this machine")
    parser.add_argument("--timeout", type=float, metavar="SECONDS",
                        help="start no trial after this many seconds of this run")
    parser.add_argument("--output-dir", metavar="DIR", help="where the best config, results, summary and plots go "
                                                         "(default: optuna_results/STUDY)")
    parser.add_argument("--checkpoint-dir", metavar="DIR", help="where each trial's checkpoint goes "
                                                             "(default: checkpoints/STUDY)")
    parser.add_argument("--max-epochs", type=int, metavar="N", help="epochs per trial")
    parser.add_argument("--max-patience", type=int, metavar="N",
                        help="stop a trial after N epochs without a better validation R@1")
    parser.add_argument("--batch-trials", type=lambda v: v if v == "auto" else int(v), metavar="K",
                        help="train K trials of one head, loss and batch size in one program (1: each alone; auto: "
                             "1 on either backend until bundles are measured to keep search quality)")
    parser.add_argument("--warm-start-from", metavar="STUDY",
                        help="run the best trials of STUDY (same storage) that fit this space first")
    parser.add_argument("--device-memory-gb", type=float, metavar="GB",
                        help="the card's memory to plan with, shared among the runners (default: the device's)")
    parser.add_argument("--plan", action="store_true",
                        help="print the study's memory plan, write plan.json into the output folder and exit "
                             "(reads the data, trains nothing)")
    parser.add_argument("--add-trials", type=int, metavar="N",
                        help="run N trials more than the study has finished (what rerunning the original did); "
                             "an addition, where --n-trials is the total")
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress bar (each finished trial still prints its line)")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    return parser


def command_line(argv=None) -> tuple[TuneConfig, argparse.Namespace, str]:
    """``python -m xclip_jax.tune``'s command line: the typed config (its YAML, with the flags named after
    its keys applied and checked like the YAML, and the study's folders filled in), the other flags
    (``overrides``: the keys the flags set, ``{key: value}``), and the config's path."""
    args = parser().parse_args(argv)
    if args.add_trials is not None and args.add_trials < 1:
        raise UserError(f"--add-trials {args.add_trials}: give a number of trials >= 1")
    if args.add_trials is not None and args.n_trials is not None:
        raise UserError(f"--n-trials {args.n_trials} and --add-trials {args.add_trials}: give one (--n-trials: the "
                        "study's total; --add-trials: that many more than it has finished)")
    config_path = _config_path(args.config, args.config_option)
    cfg = load_tune_config(config_path)
    overrides = {key: getattr(args, key) for key in OVERRIDES if getattr(args, key) is not None}
    if overrides:
        try:
            cfg = validate_tune(dataclasses.replace(cfg, **overrides))
        except ValueError as e:
            raise ConfigError(f"command-line override: {e}") from None
    args.overrides = overrides
    return with_study_folders(cfg), args, config_path
