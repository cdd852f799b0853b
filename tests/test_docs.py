"""The docs: the configuration and command-line references are generated from the code, and every
config key and flag has a description there; the README stays short."""

import argparse
import dataclasses
import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def reference():
    """``docs/reference.py``, the MkDocs hook that generates the reference tables."""
    spec = importlib.util.spec_from_file_location("docs_reference", ROOT / "docs" / "reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_config_key_has_a_description(reference):
    assert reference.missing_descriptions() == []


def test_every_flag_has_a_help_text(reference):
    assert reference.missing_help() == []


def test_the_configuration_reference_lists_every_key(reference):
    for sections, prefix in ((reference.TRAIN_SECTIONS, "train"), (reference.TUNE_SECTIONS, "tune")):
        table = reference.config_table(sections, prefix)
        for cls in sections.values():
            for f in dataclasses.fields(cls):
                assert f"| `{f.name}` |" in table, (cls.__name__, f.name)
    assert "One of `siglip`, `clip`, `mlp`, `attention`, `linear`." in reference.config_table(
        reference.TRAIN_SECTIONS, "train")
    searchable = reference.searchable_table()
    for name in reference.PARAM_PATHS:
        assert f"| `{name}` |" in searchable, name


def test_the_cli_reference_lists_every_flag_of_every_command(reference):
    text = reference.cli_reference()
    for command, parser in reference.parsers().items():
        assert f"`{command}`" in text
        for action in parser._actions:
            for flag in action.option_strings:
                if flag not in ("-h", "--help"):
                    assert f"`{flag}" in text, (command, flag)
    assert "`--num-epochs N`" in text


def test_a_key_without_a_description_stops_the_build(reference, monkeypatch):
    @dataclasses.dataclass(frozen=True)
    class Section:
        """A section.

        Attributes:
          described: it is.
        """

        described: int = 1
        undescribed: int = 2

    monkeypatch.setitem(reference.TRAIN_SECTIONS, "extra", Section)
    assert reference.missing_descriptions() == ["Section.undescribed"]
    with pytest.raises(reference.MissingDescription, match="Section.undescribed"):
        reference.config_table(reference.TRAIN_SECTIONS, "train")


def test_a_flag_without_help_stops_the_build(reference, monkeypatch):
    parser = argparse.ArgumentParser(prog="python -m xclip_jax.x")
    parser.add_argument("--bare")
    real = reference.parsers
    monkeypatch.setattr(reference, "parsers", lambda: {**real(), "x": parser})
    assert reference.missing_help() == ["x --bare"]
    with pytest.raises(reference.MissingDescription, match="x --bare"):
        reference.cli_reference()


def test_every_marker_in_the_pages_names_a_table(reference):
    pages = list((ROOT / "docs").rglob("*.md"))
    markers = [m.group(1) for page in pages for m in reference.MARKER.finditer(page.read_text())]
    assert set(markers) == set(reference.TABLES)
    for page in pages:
        for m in reference.DOCSTRING.finditer(page.read_text()):
            assert reference.runtime_docstring(m.group(1))


def test_the_readme_is_short_and_links_into_the_docs():
    text = (ROOT / "README.md").read_text()
    assert len(text) <= 8000, len(text)
    for link in ("docs/getting-started.md", "docs/reference/configuration.md", "docs/reference/cli.md"):
        assert f"]({link})" in text and (ROOT / link).is_file()


def test_the_site_loads_nothing_from_another_server():
    """Offline readers see every page whole: diagrams are SVG files drawn from the .dot beside each (no
    mermaid from a CDN), and the theme takes no web fonts."""
    config = (ROOT / "mkdocs.yml").read_text()
    assert "\n  font: false\n" in config and "mermaid" not in config.split("markdown_extensions:")[1]
    pages = {page: page.read_text() for page in (ROOT / "docs").rglob("*.md")}
    assert not [page for page, text in pages.items() if "```mermaid" in text]
    drawn = [m for text in pages.values() for m in re.findall(r"\]\((?:\.\./)?(diagrams/[\w-]+\.svg)\)", text)]
    assert len(drawn) >= 3
    for svg in drawn:
        assert (ROOT / "docs" / svg).is_file() and (ROOT / "docs" / svg).with_suffix(".dot").is_file(), svg


def test_the_api_pages_cite_nothing_a_reader_has_not():
    """The heads' and losses' docstrings say the formulas, not "SPEC §2" (a file no reader has); every
    head field is documented, so the API page lists it."""
    import ast

    for path in (ROOT / "xclip_jax").rglob("*.py"):
        assert "SPEC §" not in path.read_text(), path
    tree = ast.parse((ROOT / "xclip_jax" / "heads.py").read_text())
    for cls in (n for n in tree.body if isinstance(n, ast.ClassDef) and n.name in ("Head", "ClipHead")):
        for field, after in zip(cls.body, cls.body[1:] + [None]):
            if isinstance(field, ast.AnnAssign):
                assert isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant), (cls.name,
                                                                                              field.target.id)


def test_keys_stay_whole_and_code_blocks_show_their_ends():
    css = (ROOT / "docs" / "stylesheets" / "extra.css").read_text()
    assert "td:first-child code {\n  white-space: nowrap;" in css
    assert "pre > code {\n  white-space: pre-wrap;" in css
    assert "stylesheets/extra.css" in (ROOT / "mkdocs.yml").read_text()
    readme = (ROOT / "README.md").read_text()
    block = readme.split("<!-- --8<-- [start:quickstart] -->")[1].split("```bash\n")[1].split("```")[0]
    assert max(len(line) for line in block.splitlines()) <= 72


def test_the_home_page_states_the_measured_time():
    home = (ROOT / "docs" / "index.md").read_text()
    assert "two minutes" not in home and "2–6 min on 2 CPU cores" in home
    assert "2–6 min on 2 CPU cores" in (ROOT / "README.md").read_text()
