"""docs/configuration.md's table is generated from engine/config.py's field docstrings and must match."""

import dataclasses

from engine import config, config_doc


def test_the_reference_table_matches_the_dataclasses():
    page = config_doc.PAGE.read_text()
    assert config_doc.page_table(page) == config_doc.table(), (
        "docs/configuration.md's configuration table is stale: run python -m engine.config_doc --write"
    )


def test_the_table_lives_on_the_reference_page_only():
    assert config_doc.PAGE == config_doc.PAGE.parents[1] / "docs" / "configuration.md"
    assert config_doc.BEGIN not in (config_doc.PAGE.parents[1] / "README.md").read_text()


def test_every_field_has_a_docstring_and_a_row():
    table = config_doc.table()
    for name, cls in config_doc.sections():
        docs = config_doc.field_docs(cls)
        for f in dataclasses.fields(cls):
            assert docs.get(f.name), f"{cls.__name__}.{f.name} has no docstring"
            assert f"| `{name}.{f.name}` |" in table


def test_a_changed_docstring_or_default_is_drift(monkeypatch):
    page = config_doc.PAGE.read_text()
    monkeypatch.setattr(config.OptimConfig.__dataclass_fields__["lr"], "default", 3e-4)
    assert config_doc.page_table(page) != config_doc.table()
    monkeypatch.undo()
    real = config_doc.field_docs
    monkeypatch.setattr(
        config_doc,
        "field_docs",
        lambda cls: {**real(cls), "steps": "x"} if cls is config.OptimConfig else real(cls),
    )
    assert config_doc.page_table(page) != config_doc.table()


def test_write_regenerates_a_stale_table(tmp_path, monkeypatch):
    stale = tmp_path / "configuration.md"
    stale.write_text(f"intro\n{config_doc.BEGIN}\n| old |\n{config_doc.END}\noutro\n")
    monkeypatch.setattr(config_doc, "PAGE", stale)
    assert config_doc.main(["--check"]) == 1
    assert config_doc.main(["--write"]) == 0
    assert config_doc.main(["--check"]) == 0
    text = stale.read_text()
    assert text.startswith("intro\n") and text.endswith("outro\n") and "| old |" not in text
