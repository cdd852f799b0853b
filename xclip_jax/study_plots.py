"""A study's parameter importances and its plots: for each of :data:`PLOT_NAMES`, ``NAME.html`` (plotly, with
one ``plotly-VERSION.min.js`` per output root, so that the folder works offline) and ``NAME.png`` (optuna's matplotlib
plots; the intermediate values are drawn here, coloured by state and value, so that a hundred trials
stay readable). A plot the study can't support yet, or whose drawing fails, is skipped with a reason."""

from __future__ import annotations

import logging
import math
import os
import sys
import warnings
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from xclip_jax.runtime import output_root

logger = logging.getLogger("xclip_jax.report")

PLOT_NAMES = (
    "optimization_history",
    "param_importances",
    "parallel_coordinate",
    "intermediate_values",
)
# The parallel-coordinate plot draws the most important parameters only: a study's dozen axes
# crowd a picture of the default size until their labels overlap. The head type is always one.
PARALLEL_AXES = 6
ALWAYS_DRAWN = ("head_type",)
# The intermediate-values plot names the best few complete trials; the others are coloured by their
# final value (complete) or greyed (pruned), so that 20 or 100 trials stay readable.
LEGEND_TRIALS = 5


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
    """The parameters the parallel-coordinate plot draws: :data:`ALWAYS_DRAWN` (the head type), then
    the most important (importances.json's order), then, without importances, the others by name;
    :data:`PARALLEL_AXES` in all."""
    names = sorted(set().union(*(t.params for t in _complete_trials(study))))
    ranked = [n for n in ALWAYS_DRAWN if n in names] + [n for n in imps if n in names] + [n for n in names if n not in imps]
    return list(dict.fromkeys(ranked))[:PARALLEL_AXES]


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

    if name == "intermediate_values":
        fig = _intermediate_plotly(study)
    else:
        fig = getattr(vis, f"plot_{name}")(study, **_plot_kwargs(name, study, imps))
    if name == "optimization_history":
        for label, value in _baseline_lines(study):
            fig.add_hline(y=value, line_dash="dot", line_color="grey", annotation_text=label,
                          annotation_position="bottom right")
    if name == "parallel_coordinate":
        _visible_lines(fig)
    # One plotly.js per output root, shared by its studies' pages: they work offline (no CDN) without
    # ~4.8 MB of JavaScript in every page or every study.
    fig.write_html(str(path), include_plotlyjs=os.path.relpath(shared_plotly_js(path.parent), path.parent))


# The parallel coordinates' colours: optuna's Blues draws the worst trials near white, unseen on the
# plot's background; viridis without its palest end shows every trial.
VISIBLE_SCALE_END = 0.85


def _visible_lines(fig) -> None:
    """Recolour optuna's parallel-coordinate lines (plotly) and their colour bar on a scale that every
    value shows on: a line's place on the objective axis (its first point, 0..1) is its colour."""
    from plotly.colors import sample_colorscale

    def scale(t: float) -> str:
        return sample_colorscale("Viridis", [VISIBLE_SCALE_END * t])[0]

    bar = next((t for t in fig.data if getattr(t.marker, "showscale", None)), None)
    reverse = bool(bar is not None and bar.marker.reversescale)
    for trace in fig.data:
        if trace.mode == "lines" and trace.y:
            t = float(trace.y[0])
            trace.line.color = scale(1.0 - t if reverse else t)
    if bar is not None:
        bar.marker.colorscale = [[i / 10, scale(i / 10)] for i in range(11)]


def shared_plotly_js(plots_dir: Path) -> Path:
    """plotly.js, written once per output root (``runtime.output_root`` of the plots' study folder) and
    named by its version, so that the studies there share one copy."""
    import plotly.offline

    root = output_root(Path(plots_dir).parent)
    path = root / f"plotly-{plotly.offline.get_plotlyjs_version()}.min.js"
    if not path.exists():
        root.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
        tmp.write_text(plotly.offline.get_plotlyjs(), encoding="utf-8")
        tmp.replace(path)  # another report writing it at the same moment writes the same bytes
    return path


def _write_png(name: str, study: optuna.Study, imps: dict, path: Path) -> None:
    import numpy as np
    import optuna.visualization.matplotlib as vis_mpl
    from matplotlib import colormaps, colors
    from matplotlib import pyplot as plt

    with warnings.catch_warnings():
        # Optuna marks every matplotlib plot experimental; the warning would be
        # repeated for each PNG of every report and tells the reader nothing.
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if name == "intermediate_values":
            ax = _intermediate_matplotlib(study)
        else:
            ax = getattr(vis_mpl, f"plot_{name}")(study, **_plot_kwargs(name, study, imps))
    fig = _figure_of(ax)
    if name == "optimization_history":
        for i, (label, value) in enumerate(_baseline_lines(study)):
            ax.axhline(value, linestyle=":", color=f"C{i + 2}", label=label)
        if _baseline_lines(study):  # beside the plot, as optuna places its own legend: no point hidden
            ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.02, 1.0))
    if name == "parallel_coordinate":
        _readable_axes(ax)
        for lines in ax.collections:  # optuna's Blues: the worst trials white on white
            lines.set_cmap(colors.ListedColormap(colormaps["viridis"](np.linspace(0, VISIBLE_SCALE_END, 256))))
    try:
        fig.savefig(path, dpi=120, bbox_inches="tight")
    finally:
        plt.close(fig)  # figures otherwise accumulate in pyplot for the process' life


def _baseline_lines(study: optuna.Study) -> list[tuple[str, float]]:
    """(label, validation R@1) of each closed-form baseline the study stored: lines on its history."""
    return [(f"{b['name']} {b['val']['r1']:.3f}", b["val"]["r1"]) for b in study.user_attrs.get("xclip_baselines") or []]


def _readable_axes(ax) -> None:
    """Room for each axis' labels: the figure widens with the axes, a suffix that every choice of an
    axis shares (``_infonce``) is dropped, a parameter a trial did not use reads ``n/a``, and each
    label sits on a white box above the lines that cross it."""
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
        axis.set_zorder(ax.get_zorder() + 1)  # the labels above the lines, which belong to ax
        axis.patch.set_visible(False)
        axis.tick_params(axis="y", which="both", labelsize=8)
        for label in axis.get_yticklabels(which="both"):
            label.set_bbox({"facecolor": "white", "edgecolor": "none", "alpha": 0.85, "pad": 1.0})


def _curves(study: optuna.Study) -> tuple[list[FrozenTrial], list[int], tuple[float, float] | None]:
    """The trials that reported intermediate values, the numbers of the best complete ones (best
    first) and the range of the complete trials' values (None when none completed)."""
    trials = [t for t in study.get_trials(deepcopy=False) if t.intermediate_values]
    complete = [t for t in trials if t.state == TrialState.COMPLETE and t.value is not None and math.isfinite(t.value)]
    maximize = study.direction == optuna.study.StudyDirection.MAXIMIZE
    best = [t.number for t in sorted(complete, key=lambda t: t.value, reverse=maximize)[:LEGEND_TRIALS]]
    values = [t.value for t in complete]
    return trials, best, (min(values), max(values)) if values else None


def _curve_style(t: FrozenTrial, best: list[int], span) -> dict:
    """How one trial's curve is drawn: a complete trial in the colour of its final value (the best few
    thicker, on top, in the legend), a pruned one thin and grey, any other dotted red."""
    from matplotlib import colormaps, colors

    if t.state == TrialState.COMPLETE and span is not None and t.value is not None and math.isfinite(t.value):
        low, high = span
        color = colors.to_hex(colormaps["viridis"]((t.value - low) / (high - low) if high > low else 1.0))
        top = t.number in best
        return {"color": color, "width": 2.4 if top else 1.1, "dash": "solid", "z": 3 if top else 2,
                "label": f"#{t.number} {t.value:.3f}" if top else None}
    if t.state == TrialState.PRUNED:
        return {"color": "#b4b4b4", "width": 0.8, "dash": "solid", "z": 1, "label": None}
    return {"color": "#d62728", "width": 0.8, "dash": "dot", "z": 1, "label": None}


def _curve_points(t: FrozenTrial) -> tuple[list[int], list[float]]:
    steps = sorted(t.intermediate_values)
    return steps, [t.intermediate_values[s] for s in steps]


def _intermediate_matplotlib(study: optuna.Study):
    """Each trial's validation R@1 per epoch, coloured by state and final value (see ``_curve_style``)."""
    from matplotlib import colormaps, colors
    from matplotlib import pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    trials, best, span = _curves(study)
    fig, ax = plt.subplots(figsize=(8, 5))
    for t in trials:
        style, (steps, values) = _curve_style(t, best, span), _curve_points(t)
        ax.plot(steps, values, color=style["color"], linewidth=style["width"], zorder=style["z"],
                linestyle=":" if style["dash"] == "dot" else "-", label=style["label"])
        if t.state == TrialState.PRUNED:
            ax.plot(steps[-1:], values[-1:], marker="x", markersize=4, color="#8c8c8c", zorder=1)
    labelled = sorted((line for line in ax.get_lines() if not line.get_label().startswith("_")),
                      key=lambda line: best.index(int(line.get_label()[1:].split()[0])))
    counts = {state: sum(t.state == state for t in trials) for state in (TrialState.PRUNED, TrialState.FAIL)}
    extra = [Line2D([], [], color="#b4b4b4", marker="x", label=f"pruned ({counts[TrialState.PRUNED]})")]
    if counts[TrialState.FAIL]:
        extra.append(Line2D([], [], color="#d62728", linestyle=":", label=f"failed ({counts[TrialState.FAIL]})"))
    ax.legend(handles=labelled + extra, title="best trials", fontsize="small", loc="upper left",
              bbox_to_anchor=(1.25, 1.0))
    if span is not None:
        bar = fig.colorbar(plt.cm.ScalarMappable(colors.Normalize(*span), colormaps["viridis"]), ax=ax, pad=0.02)
        bar.set_label("final value (complete trials)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(xlabel="epoch", ylabel="validation R@1", title=f"Intermediate values ({len(trials)} trials)")
    return ax


def _intermediate_plotly(study: optuna.Study):
    """The same picture as ``_intermediate_matplotlib``, interactive: a legend entry per best trial and
    one for the pruned ones (a click hides them), each curve's trial in its hover text."""
    import plotly.graph_objects as go

    trials, best, span = _curves(study)
    fig = go.Figure()
    shown_pruned = False
    for t in sorted(trials, key=lambda t: (_curve_style(t, best, span)["z"], -best.index(t.number)
                                            if t.number in best else 0)):
        style, (steps, values) = _curve_style(t, best, span), _curve_points(t)
        pruned = t.state == TrialState.PRUNED
        name = style["label"] or ("pruned" if pruned else f"#{t.number}")
        fig.add_trace(go.Scatter(
            x=steps, y=values, mode="lines", name=name, line={"color": style["color"], "width": style["width"],
                                                              "dash": style["dash"]},
            legendgroup="pruned" if pruned else None, showlegend=bool(style["label"]) or (pruned and not shown_pruned),
            legendrank=best.index(t.number) if t.number in best else 1000,
            hovertemplate=f"trial {t.number} ({t.state.name.lower()})<br>epoch %{{x}}<br>R@1 %{{y:.4f}}<extra></extra>"))
        shown_pruned = shown_pruned or pruned
    if span is not None:  # the colour scale of the complete trials' final values
        fig.add_trace(go.Scatter(x=[None], y=[None], mode="markers", showlegend=False, hoverinfo="skip", marker={
            "colorscale": "Viridis", "cmin": span[0], "cmax": span[1], "color": [span[0]], "showscale": True,
            "colorbar": {"title": {"text": "final value"}, "x": 1.0, "xanchor": "left"}}))
    fig.update_layout(title=f"Intermediate values ({len(trials)} trials)", xaxis_title="epoch",
                      yaxis_title="validation R@1", legend={"title": {"text": "best trials"}, "x": 1.12},
                      template="plotly_white")
    fig.update_xaxes(dtick=1)
    return fig


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
    if any(p.suffix == ".html" for p in written):
        written.append(shared_plotly_js(plots_dir))
    return written, skipped
