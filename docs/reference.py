"""The reference tables of the docs, generated from the code at build time (an MkDocs hook).

Config keys come from the config dataclasses: each field's default from its definition, its allowed
names from ``xclip_jax.config.CHOICES``, its meaning from the ``Attributes:`` section of its class's
docstring. Command-line flags come from each command's ``parser()``. A page asks for a table with a
line ``<!-- reference: NAME -->`` (NAME in :data:`TABLES`). A key or a flag without a description stops
the build (and ``tests/test_docs.py``), so the reference cannot fall behind the code.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import importlib
import inspect
import re
import typing
from pathlib import Path

from xclip_jax.config import ALIASES, CHOICES, DataConfig, EvaluationConfig, SyntheticData, TrainConfig
from xclip_jax.spec import HeadSpec, LossSpec, TrainingSpec
from xclip_jax.tune_config import (
    DEFAULT_CONDITIONS,
    PARAM_ALIASES,
    PARAM_PATHS,
    SECTION_TYPES,
    ParamSpace,
    PrunerConfig,
    SamplerConfig,
    TuneConfig,
)

# Each config table: its heading's key path and its class, in the order the pages show them.
TRAIN_SECTIONS = {"": TrainConfig, "model": HeadSpec, "loss": LossSpec, "training": TrainingSpec,
                  "evaluation": EvaluationConfig, "data": DataConfig, "data.synthetic": SyntheticData}
TUNE_SECTIONS = {"": TuneConfig, "search_space.NAME": ParamSpace, "pruner": PrunerConfig, "sampler": SamplerConfig}
# Each command: its module (which has ``parser()``) and how it is run.
COMMANDS = {
    "data": "xclip_jax.data.cli",
    "tune": "xclip_jax.tune_cli",
    "train": "xclip_jax.train",
    "evaluate": "xclip_jax.evaluate",
    "export": "xclip_jax.export",
    "report": "xclip_jax.report",
    "baselines": "xclip_jax.baselines.cli",
}


class MissingDescription(Exception):
    """A config key or a command-line flag that the reference cannot describe."""


# ----------------------------------------------------------------------------- config keys


def attribute_docs(cls) -> dict[str, str]:
    """``{field: description}`` from the ``Attributes:`` section of ``cls``'s docstring (Google style:
    ``name: text`` or ``name, other: text``, continuation lines indented further)."""
    lines = (inspect.getdoc(cls) or "").splitlines()
    if "Attributes:" not in lines:
        return {}
    docs: dict[str, str] = {}
    current: list[str] = []
    for line in lines[lines.index("Attributes:") + 1:]:
        if not line.startswith("  "):  # a blank line or the next section ends it
            break
        entry = re.match(r"  (\w+(?:, \w+)*): (.*)", line)
        if entry:
            current = entry.group(1).split(", ")
            for name in current:
                docs[name] = entry.group(2).strip()
        else:
            for name in current:
                docs[name] += " " + line.strip()
    return docs


def missing_descriptions() -> list[str]:
    """Every config key, of both configs, whose class describes it nowhere (``Class.field``)."""
    classes = {*TRAIN_SECTIONS.values(), *TUNE_SECTIONS.values()}
    return sorted(f"{cls.__name__}.{f.name}" for cls in classes for f in dataclasses.fields(cls)
                  if not attribute_docs(cls).get(f.name))


def _markdown(text: str) -> str:
    """Docstring text for a table cell: reST roles and double backticks as Markdown, pipes outside
    code escaped (a table's cells split there; inside code they do not)."""
    parts = re.sub(r":\w+:`~?([^`]+)`", r"`\1`", text).replace("``", "`").split("`")
    return "`".join(part if i % 2 else part.replace("|", "\\|") for i, part in enumerate(parts))


def _yaml(value) -> str:
    if value is None:
        return "`null`"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, (tuple, list)):
        return f"`[{', '.join(map(str, value))}]`"
    if isinstance(value, dict):
        return "`{}`" if not value else f"`{value}`"
    return f"`{value}`"


def _default(f: dataclasses.Field, path: str, sections: dict, prefix: str) -> str:
    if f.default is not dataclasses.MISSING:
        return _yaml(f.default)
    value = f.default_factory()
    if dataclasses.is_dataclass(value):
        sub = f"{path}.{f.name}" if path else f.name
        return f"[its section](#{_anchor(prefix, sub)})" if sub in sections else "its defaults"
    return _yaml(value)


def _anchor(prefix: str, path: str) -> str:
    """The heading id of a section's table: ``train-data-synthetic``, ``tune-top-level``."""
    return f"{prefix}-" + (re.sub(r"[^a-z0-9]+", "-", path.lower()).strip("-") or "top-level")


def _kind(cls, name: str) -> str:
    tp = typing.get_type_hints(cls)[name]
    args = [a for a in typing.get_args(tp) if a is not type(None)] if typing.get_args(tp) else [tp]
    if dataclasses.is_dataclass(args[0]):
        return "section"
    names = {int: "integer", float: "number", str: "string", bool: "true/false", dict: "mapping", tuple: "list"}
    kind = " or ".join(names.get(typing.get_origin(a) or a, str(a)) for a in args)
    return kind + (" or null" if type(None) in typing.get_args(tp) else "")


def config_table(sections: dict, prefix: str, heading_level: int = 3) -> str:
    """One table per section (headings ``#{prefix}-{section}``): every key, its type, default, allowed
    names and meaning."""
    out = []
    missing = missing_descriptions()
    if missing:
        raise MissingDescription(f"config keys without a description: {', '.join(missing)}; describe each in the "
                                 "Attributes section of its class's docstring")
    for path, cls in sections.items():
        docs = attribute_docs(cls)
        title = f"`{path}:`" if path else "Top level"
        out.append(f"{'#' * heading_level} {title} {{#{_anchor(prefix, path)}}}\n")
        summary = (inspect.getdoc(cls) or "").split("\n\n")[0].replace("\n", " ")
        out.append(_markdown(summary) + "\n")
        out.append("| key | type | default | meaning |\n|---|---|---|---|")
        aliases = {new: old for old, new in ALIASES.get(cls.__name__, {}).items()}
        for f in dataclasses.fields(cls):
            meaning = _markdown(docs[f.name])
            allowed = CHOICES.get(cls, {}).get(f.name)
            if allowed:
                meaning += " One of " + ", ".join(f"`{a}`" for a in allowed) + "."
            if f.name in aliases:
                meaning += f" The original's name `{aliases[f.name]}` is accepted."
            out.append(f"| `{f.name}` | {_kind(cls, f.name)} | {_default(f, path, sections, prefix)} | {meaning} |")
        out.append("")
    return "\n".join(out)


def searchable_table() -> str:
    """The names a search space (and ``fixed``) may use, where each lands in a trial's training config,
    and when it is sampled by default."""
    out = ["| name | sets | sampled when | meaning |", "|---|---|---|---|"]
    aliases = {new: old for old, new in PARAM_ALIASES.items()}
    for name, (section, key) in PARAM_PATHS.items():
        cls = SECTION_TYPES[section]
        cond = DEFAULT_CONDITIONS.get(name)
        when = "; ".join(f"`{k}` in {', '.join(f'`{v}`' for v in vs)}" for k, vs in cond.items()) if cond else "always"
        meaning = _markdown(attribute_docs(cls)[key])
        if name in aliases:
            meaning += f" The original's name `{aliases[name]}` is accepted."
        out.append(f"| `{name}` | `{section}.{key}` | {when} | {meaning} |")
    return "\n".join(out) + "\n"


# ----------------------------------------------------------------------------- command-line flags


def parsers() -> dict[str, argparse.ArgumentParser]:
    """``{command: its parser}``, subcommands as ``data synth`` etc."""
    found = {}
    for command, module in COMMANDS.items():
        parser = importlib.import_module(module).parser()
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        found[command] = parser
        for action in subs:
            for name, sub in action.choices.items():
                found[f"{command} {name}"] = sub
    return found


def _arguments(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions
            if not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction))]


def missing_help() -> list[str]:
    """Every flag or argument of every command without a help text (``command --flag``)."""
    return [f"{command} {(a.option_strings or [a.dest])[-1]}" for command, parser in parsers().items()
            for a in _arguments(parser) if not (a.help or "").strip()]


def _flag(a: argparse.Action) -> str:
    if not a.option_strings:
        return f"`{a.metavar or a.dest.upper()}`"
    value = f" {a.metavar or a.dest.upper()}" if a.nargs != 0 else ""
    return ", ".join(f"`{name}{value}`" for name in a.option_strings)


def cli_reference(heading_level: int = 2) -> str:
    """Each command: its usage, what it does, and a table of its arguments and flags."""
    missing = missing_help()
    if missing:
        raise MissingDescription(f"command-line flags without a help text: {', '.join(missing)}; give each "
                                 "add_argument a help=")
    out = []
    for command, parser in parsers().items():
        out.append(f"{'#' * (heading_level + (' ' in command))} `{command}`\n")
        usage = " ".join(parser.format_usage().split()).removeprefix("usage: ")
        out.append(f"```\n{usage}\n```\n")
        if parser.description:
            out.append(_markdown(parser.description) + "\n")
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        for action in subs:
            out.append("| subcommand | what it does |\n|---|---|")
            out += [f"| `{c.dest}` | {_markdown(c.help or '')} |" for c in action._choices_actions]
            out.append("")
        rows = _arguments(parser)
        if rows:
            out.append("| argument | default | meaning |\n|---|---|---|")
            for a in rows:
                default = "" if a.default is None or a.default is False or a.required else _yaml(a.default)
                required = " (required)" if a.required and a.option_strings else ""
                out.append(f"| {_flag(a)} | {default} | {_markdown(a.help)}{required} |")
            out.append("")
    return "\n".join(out)


# ----------------------------------------------------------------------------- the module layers

ROOT = Path(__file__).resolve().parents[1]


def layers_table() -> str:
    """The package's modules, lowest layer first (``tests/test_layout.py``'s ``LAYERS``, which that
    test enforces), each with the first paragraph of its docstring."""
    tree = ast.parse((ROOT / "tests" / "test_layout.py").read_text())
    layers = next(ast.literal_eval(node.value) for node in tree.body
                  if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "LAYERS")
    out = ["| layer | module | what it holds |", "|---|---|---|"]
    for rank, layer in enumerate(layers):
        for name in sorted(layer):
            path = ROOT / "xclip_jax" / name
            path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
            doc = ast.get_docstring(ast.parse(path.read_text())) or ""
            if not doc:
                raise MissingDescription(f"xclip_jax/{name} has no docstring")
            out.append(f"| {rank} | `{name}` | {_markdown(doc.split(chr(10) * 2)[0].replace(chr(10), ' '))} |")
    return "\n".join(out) + "\n"


# ----------------------------------------------------------------------------- jitted functions


def runtime_docstring(path: str, heading_level: int = 2) -> str:
    """The heading, signature and docstring of a jitted function (``xclip_jax.step.train_step``): its
    docstring is set when the module runs, which reading the source (mkdocstrings) does not see."""
    module, name = path.rsplit(".", 1)
    obj = getattr(importlib.import_module(module), name)
    doc = inspect.cleandoc(obj.__doc__ or "")
    if not doc:
        raise MissingDescription(f"{path} has no docstring")
    signature = str(inspect.signature(getattr(obj, "__wrapped__", obj))).replace("'", "")
    text = re.sub(r":\w+:`~?([^`]+)`", r"`\1`", doc).replace("``", "`")
    return f"{'#' * heading_level} `{name}`\n\n```python\n{name}{signature}\n```\n\n{text}\n"


# ----------------------------------------------------------------------------- the MkDocs hook

TABLES = {
    "config-train": lambda: config_table(TRAIN_SECTIONS, "train"),
    "config-tune": lambda: config_table(TUNE_SECTIONS, "tune"),
    "searchable": searchable_table,
    "cli": cli_reference,
    "layers": layers_table,
}
MARKER = re.compile(r"^<!-- reference: ([\w-]+) -->$", re.MULTILINE)
DOCSTRING = re.compile(r"^<!-- docstring: ([\w.]+) -->$", re.MULTILINE)


def on_page_markdown(markdown: str, **kwargs) -> str:
    """MkDocs hook: each ``<!-- reference: NAME -->`` line becomes the generated table NAME, each
    ``<!-- docstring: module.function -->`` that jitted function's documentation."""
    markdown = MARKER.sub(lambda m: TABLES[m.group(1)](), markdown)
    return DOCSTRING.sub(lambda m: runtime_docstring(m.group(1)), markdown)
