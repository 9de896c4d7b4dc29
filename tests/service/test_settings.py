"""service.settings: the settings table in the docs is the one `Settings` generates."""

from __future__ import annotations

from pathlib import Path

from service.settings import settings_table


def test_docs_settings_table_is_current():
    docs = (Path(__file__).resolve().parents[2] / "docs" / "SETTINGS.md").read_text()
    assert settings_table() in docs, (
        "regenerate the settings table in docs/SETTINGS.md from service.settings.settings_table()"
    )
