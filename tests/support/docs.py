"""The docs' code and tables, as the suite reads them: one section, its fenced blocks."""

from __future__ import annotations

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent.parent
README = ROOT / "README.md"
REFERENCE = ROOT / "docs" / "REFERENCE.md"


def section(title: str, path: pathlib.Path = README) -> str:
    """The text under ``## title`` up to the next heading of that level."""
    text = path.read_text()
    start = text.index(f"## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end >= 0 else len(text)]


def blocks(text: str, language: str) -> list[str]:
    """Every fenced block of ``language`` in ``text``, dedented to its fence (blocks may sit in list items)."""
    found = []
    for indent, body in re.findall(rf"^( *)```{language}\n(.*?)^\1```", text, flags=re.S | re.M):
        found.append("\n".join(line[len(indent):] for line in body.splitlines()) + "\n")
    return found
