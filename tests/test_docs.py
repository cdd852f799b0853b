"""The docs: the configuration and command-line references are generated from the code, and every
config key and flag has a description there; the README stays short."""

import argparse
import dataclasses
import importlib.util
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
