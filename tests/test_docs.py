"""The documentation follows the code: `help(Spade)` lists every setting of the settings table, and the README's and
the site's links lead to files that exist (`mkdocs build --strict` in `make test` checks the site's own links)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from spade_ad import Spade
from spade_ad import settings as table

ROOT = Path(__file__).resolve().parents[1]


def _parameters(doc: str) -> dict[str, str]:
    """The numpydoc Parameters section of a docstring: name -> its type line."""
    section = doc.split("Parameters\n----------\n", 1)[1].split("\n\n", 1)[0]
    return {m.group(1): m.group(2) for m in re.finditer(r"^(\w+) : (.+)$", section, flags=re.MULTILINE)}


def test_spade_docstring_lists_every_setting_in_table_order() -> None:
    doc = Spade.__doc__ or ""
    parameters = _parameters(doc)
    assert list(parameters) == list(table.NAMES)
    for setting in table.SETTINGS:
        assert f"default={setting.default!r}" in parameters[setting.name] or isinstance(setting.default, float)
    assert "default=0.3333" in parameters["map_weight"] and "default=None" in parameters["weights"]
    assert "or None" in parameters["search_radius"] and "or None" not in parameters["k_gallery"]
    # Each setting's help text is there (wrapped), and what it allows.
    flat = " ".join(doc.split())
    for setting in table.SETTINGS:
        assert " ".join(setting.help.split()) in flat
        assert setting.allowed().replace(" | ", ", ") in flat


def test_help_shows_the_parameters() -> None:
    import pydoc

    text = pydoc.render_doc(Spade, renderer=pydoc.plaintext)
    assert "Parameters" in text and "k_gallery : int, default=50" in text and "Examples" in text


_LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


@pytest.mark.parametrize("page", ["README.md", "SECURITY.md", *sorted(
    str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))])
def test_relative_links_lead_to_files(page: str) -> None:
    path = ROOT / page
    missing = [
        target for target in _LINK.findall(path.read_text(encoding="utf-8"))
        if "://" not in target and not target.startswith("mailto:") and not (path.parent / target).exists()
    ]
    assert not missing, f"{page} links to missing files: {missing}"
