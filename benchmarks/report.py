"""Shared by the benchmark scripts: write one `## Title` section of a markdown file in place."""

from __future__ import annotations

import re
from pathlib import Path


def write_section(path: Path, section: str) -> None:
    """Replace the section whose heading is `section`'s first line (up to the next `## `), or append it."""
    heading = section.splitlines()[0].rstrip()
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    match = re.search(rf"^{re.escape(heading)}[ \t]*\n", text, re.MULTILINE)
    if match:
        end = re.search(r"^## ", text[match.end():], re.MULTILINE)
        stop = match.end() + end.start() if end else len(text)
        tail = text[stop:]
        text = text[:match.start()] + section + ("\n" + tail if tail else "")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
