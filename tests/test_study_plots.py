"""The study's plots: every trial visible in the parallel coordinates, and one plotly.js shared by the
studies of an output root."""

import optuna
import pytest
from matplotlib import colors

from tests.test_report import _build_study
from xclip_jax import report, study_plots

optuna.logging.set_verbosity(optuna.logging.WARNING)
pytestmark = pytest.mark.filterwarnings("ignore:Some regimes:UserWarning")


def _lightness(color: str) -> float:
    if color.startswith("rgb"):
        r, g, b = (float(v) / 255 for v in color[color.index("(") + 1:-1].split(","))
    else:
        r, g, b = colors.to_rgb(color)
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


def test_the_parallel_coordinates_draw_no_trial_near_white(tmp_path):
    study = _build_study(f"sqlite:///{tmp_path}/s.db")
    path = tmp_path / "plots" / "parallel_coordinate.html"
    path.parent.mkdir()
    study_plots._write_html("parallel_coordinate", study, {}, path)
    import plotly.io

    html = path.read_text()
    assert "plotly-" in html and "cdn.plot.ly" not in html
    study_plots._write_png("parallel_coordinate", study, {}, tmp_path / "plots" / "p.png")
    # the lines the page draws: none as pale as the plot's background (#E5ECF6, lightness ~0.92)
    import optuna.visualization as vis

    fig = vis.plot_parallel_coordinate(study)
    study_plots._visible_lines(fig)
    lines = [t.line.color for t in fig.data if t.mode == "lines"]
    assert lines and max(_lightness(c) for c in lines) < 0.8, lines
    assert plotly.io.to_json(fig)


def test_studies_of_one_output_root_share_one_plotly_js(tmp_path):
    root = tmp_path / "optuna_results"
    for name in ("a", "b"):
        report.write_report(_build_study(f"sqlite:///{tmp_path}/{name}.db", name=name), root / name)
    js = list(root.glob("plotly-*.min.js"))
    assert len(js) == 1 and js[0].stat().st_size > 1_000_000
    assert not list(root.glob("*/plots/*.js"))
    for name in ("a", "b"):
        assert f'src="../../{js[0].name}"' in (root / name / "plots" / "parallel_coordinate.html").read_text()
