"""The house: every import points down the layers (no circle), and the driver never imports jax."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "xclip_jax"

# Lower layers first; a module may import its own layer's modules or lower ones, never higher.
LAYERS = [
    {"errors", "spec", "padding", "ids", "losses", "memory"},                      # the core's plain parts; padded widths
    {"heads", "metrics"},                                                # the core
    {"config", "data", "figures", "storage", "runtime", "pool", "model"},  # edges, I/O, processes; a trial's model
    {"tune_config", "step", "encode", "baselines"},                      # tuning config; the step; evaluation; baselines
    {"checkpoint", "programs", "space", "initial", "plan", "study", "study_plots", "tune_cli", "verdict", "final_pick"},         # checkpoints, kept programs; the study policy
    {"evaluate", "fit", "report", "export"},                             # evaluation, the fit loop; study outputs; export
    {"train"},                                                           # the fit loop and the training CLI
    {"runner", "tune"},                                                  # a trial process; the driver
]
RANK = {module: rank for rank, layer in enumerate(LAYERS) for module in layer}


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE).with_suffix("")
    return rel.parts[0]  # a package (data) counts as one module


def _imports(path: Path) -> set[str]:
    """The xclip_jax modules a file imports, anywhere in it (function-level imports too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            parts = node.module.split(".")
            if parts[0] == "xclip_jax":
                found |= {parts[1]} if len(parts) > 1 else {alias.name for alias in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("xclip_jax.")}
    return found


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        if path.name == "__init__.py" and path.parent == PACKAGE:
            continue  # the package's lazy `from xclip_jax import train_step` convenience
        name = _module_name(path)
        graph.setdefault(name, set()).update(_imports(path) - {name})
    return graph


def test_every_module_has_a_layer():
    assert set(_graph()) == set(RANK), set(_graph()) ^ set(RANK)


def test_imports_point_down_the_layers():
    upward = [(m, dep) for m, deps in _graph().items() for dep in deps if RANK[dep] > RANK[m]]
    assert not upward, f"imports from a lower layer to a higher one: {upward}"


def test_no_import_circle():
    graph, seen, stack = _graph(), set(), []

    def visit(m):
        if m in stack:
            raise AssertionError(f"import circle: {' -> '.join(stack[stack.index(m):] + [m])}")
        if m in seen:
            return
        stack.append(m)
        for dep in sorted(graph[m]):
            visit(dep)
        stack.pop()
        seen.add(m)

    for module in sorted(graph):
        visit(module)


@pytest.mark.parametrize("module", ["tune", "report", "data", "study", "pool", "runtime", "tune_config", "tune_cli", "verdict",
                                    "spec", "padding", "space", "final_pick", "memory", "plan"])
def test_the_driver_side_imports_no_jax(module):
    code = (f"import sys, xclip_jax.{module}; "
            "heavy = [m for m in sys.modules if m.split('.')[0] in ('jax', 'jaxlib', 'flax', 'optax', 'orbax')]; "
            "assert not heavy, heavy[:5]")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


# The modules allowed past MAX_LINES, each with its reason. Everything else is split when it grows
# (a docstring's say-so is not a reason).
MAX_LINES = 420
LONG_MODULES: dict[str, str] = {}


def test_modules_stay_small():
    too_long = {}
    for path in PACKAGE.rglob("*.py"):
        name = str(path.relative_to(PACKAGE))
        lines = path.read_text().count("\n")
        if lines > MAX_LINES and name not in LONG_MODULES:
            too_long[name] = lines
    assert not too_long, f"over {MAX_LINES} lines: {too_long}; split them (or name one in LONG_MODULES, with why)"
