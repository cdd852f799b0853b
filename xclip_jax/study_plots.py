"""A study's parameter importances and its plots: for each of :data:`PLOT_NAMES`, ``NAME.html`` (plotly, with
``plotly.min.js`` beside it so the folder works offline) and ``NAME.png`` (optuna's matplotlib
plots). A plot the study can't support yet, or whose drawing fails, is skipped with a reason."""

from __future__ import annotations

import logging
import math
import sys
import warnings
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

logger = logging.getLogger("xclip_jax.report")

PLOT_NAMES = (
    "optimization_history",
    "param_importances",
    "parallel_coordinate",
    "intermediate_values",
)
# The parallel-coordinate plot draws the most important parameters only: a study's dozen axes
# crowd a picture of the default size until their labels overlap.
PARALLEL_AXES = 6


def _complete_trials(study: optuna.Study):
    return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))


def _why_no_importances(complete: list[FrozenTrial]) -> str | None:
    """Reason importances can't be computed from `complete`, or None when they can."""
    if len(complete) < 2:
        return f"needs at least 2 COMPLETE trials, the study has {len(complete)}"
    names = set().union(*(t.params for t in complete))
    if not names:
        return "no trial suggested any parameter"
    for name in names:
        # A conditional param that is present in only some trials varies too: its
        # presence is decided by another param.
        present = [t.params[name] for t in complete if name in t.params]
        if len(present) < len(complete) or len({repr(v) for v in present}) > 1:
            return None
    return "no parameter takes more than one value across COMPLETE trials"


def importances(study: optuna.Study) -> dict[str, float]:
    """Parameter importances of the COMPLETE trials, normalised to sum to 1.

    Uses :func:`optuna.importance.get_param_importances` (its default evaluator, which
    also rates conditional parameters). Returns ``{}`` rather than raising when they
    can't be computed: fewer than 2 COMPLETE trials, no parameter varies, or the
    evaluator fails or yields non-finite numbers.
    """
    reason = _why_no_importances(_complete_trials(study))
    if reason is not None:
        logger.info("parameter importances skipped: %s", reason)
        return {}
    try:
        result = optuna.importance.get_param_importances(study)
    except Exception as e:  # an evaluator failure must not cost the rest of the report
        logger.warning("parameter importances could not be computed: %s", e)
        return {}
    result = {str(k): float(v) for k, v in result.items()}
    if not all(math.isfinite(v) for v in result.values()):
        logger.warning("parameter importances were not finite; skipped")
        return {}
    return result




def _why_no_plot(name: str, study: optuna.Study, imps: dict[str, float]) -> str | None:
    """Reason plot `name` can't be made for `study`, or None when it can.

    Optuna draws an empty figure (and logs a warning) for most of these cases; an
    empty file is less useful than a clear note about what the study is missing.
    """
    complete = _complete_trials(study)
    if len(study.directions) != 1:
        return "multi-objective studies are not supported by this report's plots"
    if name == "optimization_history":
        if not complete:
            return "no COMPLETE trial"
    elif name == "param_importances":
        if not imps:
            return "parameter importances unavailable (see importances.json)"
    elif name == "parallel_coordinate":
        # One line across the axes says nothing about the search space, and
        # matplotlib warns about the zero-height axis ranges it implies.
        if len(complete) < 2:
            return f"needs at least 2 COMPLETE trials, the study has {len(complete)}"
        if not any(t.params for t in complete):
            return "no trial suggested any parameter"
    elif name == "intermediate_values":
        if not any(t.intermediate_values for t in study.get_trials(deepcopy=False)):
            return "no trial reported intermediate values (trial.report)"
    return None


class _Precomputed(optuna.importance.BaseImportanceEvaluator):
    """Evaluator that hands back importances computed once by :func:`importances`."""

    def __init__(self, imps: dict[str, float]):
        self._imps = dict(imps)

    def evaluate(self, study, params=None, *, target=None) -> dict[str, float]:
        return {k: v for k, v in self._imps.items() if params is None or k in params}


def parallel_params(study: optuna.Study, imps: dict[str, float]) -> list[str]:
    """The parameters the parallel-coordinate plot draws: the :data:`PARALLEL_AXES` most important
    (importances.json's order), then, without importances, the others by name."""
    names = sorted(set().union(*(t.params for t in _complete_trials(study))))
    ranked = [n for n in imps if n in names] + [n for n in names if n not in imps]
    return ranked[:PARALLEL_AXES]


def _plot_kwargs(name: str, study: optuna.Study, imps: dict[str, float]) -> dict:
    # Left alone, each importance plot re-runs the evaluator: twice the cost, its
    # warnings repeated, and numbers that could drift from importances.json.
    if name == "param_importances":
        return {"evaluator": _Precomputed(imps)}
    if name == "parallel_coordinate":
        return {"params": parallel_params(study, imps)}
    return {}


def _write_html(name: str, study: optuna.Study, imps: dict, path: Path) -> None:
    import optuna.visualization as vis

    fig = getattr(vis, f"plot_{name}")(study, **_plot_kwargs(name, study, imps))
    if name == "optimization_history":
        for label, value in _baseline_lines(study):
            fig.add_hline(y=value, line_dash="dot", line_color="grey", annotation_text=label,
                          annotation_position="bottom right")
    # "directory" puts one plotly.min.js beside the pages: works offline (no CDN)
    # without embedding ~4 MB of JavaScript in every page.
    fig.write_html(str(path), include_plotlyjs="directory")


def _write_png(name: str, study: optuna.Study, imps: dict, path: Path) -> None:
    import optuna.visualization.matplotlib as vis_mpl
    from matplotlib import pyplot as plt

    with warnings.catch_warnings():
        # Optuna marks every matplotlib plot experimental; the warning would be
        # repeated for each PNG of every report and tells the reader nothing.
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        ax = getattr(vis_mpl, f"plot_{name}")(study, **_plot_kwargs(name, study, imps))
    fig = _figure_of(ax)
    if name == "optimization_history":
        for i, (label, value) in enumerate(_baseline_lines(study)):
            ax.axhline(value, linestyle=":", color=f"C{i + 2}", label=label)
        if _baseline_lines(study):  # beside the plot, as optuna places its own legend: no point hidden
            ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.02, 1.0))
    if name == "parallel_coordinate":
        _readable_axes(ax)
    try:
        fig.savefig(path, dpi=120, bbox_inches="tight")
    finally:
        plt.close(fig)  # figures otherwise accumulate in pyplot for the process' life


def _baseline_lines(study: optuna.Study) -> list[tuple[str, float]]:
    """(label, validation R@1) of each closed-form baseline the study stored: lines on its history."""
    return [(f"{b['name']} {b['val']['r1']:.3f}", b["val"]["r1"]) for b in study.user_attrs.get("xclip_baselines") or []]


def _readable_axes(ax) -> None:
    """Room for each axis' labels: the figure widens with the axes, a suffix that every choice of an
    axis shares (``_infonce``) is dropped, and a parameter a trial did not use reads ``n/a``."""
    fig = ax.figure
    axes = [a for a in fig.axes if a is not ax and a.get_label() != "<colorbar>"]  # one per parameter
    fig.set_size_inches(2.5 + 1.9 * len(axes), 5)
    for axis in axes:
        labels = [label.get_text() for label in axis.get_yticklabels()]
        named = [text for text in labels if text and text != "None"]
        suffix = _shared_suffix(named) if len(named) > 1 else ""
        if suffix or "None" in labels:
            axis.set_yticks(axis.get_yticks())
            axis.set_yticklabels(["n/a" if text == "None" else text[:len(text) - len(suffix)] for text in labels])


def _shared_suffix(labels: list[str]) -> str:
    """The ``_…`` ending every label shares (``_infonce``), or ``""``."""
    tail = labels[0][labels[0].rfind("_"):] if "_" in labels[0] else ""
    return tail if tail and all(text.endswith(tail) and len(text) > len(tail) for text in labels) else ""


def _figure_of(ax: Any):
    if hasattr(ax, "figure"):
        return ax.figure
    # Some optuna plots return an array of Axes.
    return next(iter(getattr(ax, "flat", ax))).figure


def _ensure_headless_matplotlib() -> None:
    # Optuna's matplotlib plots go through pyplot; pick the file-only Agg backend
    # unless pyplot is already in use, in which case the caller (e.g. a notebook)
    # chose a backend and the figures are only created and closed, never shown.
    if "matplotlib.pyplot" not in sys.modules:
        import matplotlib

        matplotlib.use("Agg")




def write_plots(study: optuna.Study, imps: dict[str, float], plots_dir: Path) -> tuple[list[Path], dict[str, str]]:
    """Draw every plot the study supports into ``plots_dir``; returns (files written, {skipped: reason})."""
    plots_dir = Path(plots_dir)
    plots_dir.mkdir(parents=True, exist_ok=True)
    written, skipped = [], {}
    _ensure_headless_matplotlib()
    for name in PLOT_NAMES:
        reason = _why_no_plot(name, study, imps)
        if reason is not None:
            skipped[name] = reason
            logger.warning("plot %s skipped: %s", name, reason)
            continue
        for ext, writer in {"html": _write_html, "png": _write_png}.items():
            path = plots_dir / f"{name}.{ext}"
            try:
                writer(name, study, imps, path)
            except Exception as e:  # one broken plot must not lose the others
                skipped[f"{name}.{ext}"] = f"{type(e).__name__}: {e}"
                logger.warning("plot %s.%s skipped: %s: %s", name, ext, type(e).__name__, e)
                path.unlink(missing_ok=True)
                continue
            written.append(path)
    js = plots_dir / "plotly.min.js"
    if js.exists() and any(p.suffix == ".html" for p in written):
        written.append(js)
    return written, skipped
