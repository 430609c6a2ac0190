"""Reading the tables of a Markdown report back, for tests that check what it shows."""

from __future__ import annotations

import re

_CELL_SPLIT = re.compile(r"(?<!\\)\|")  # a cell boundary: a pipe the report did not escape


def tables(md: str) -> list[list[list[str]]]:
    """Every Markdown table as rows of cells (header first, the alignment row dropped), each
    cell stripped and its escaped underscores read back as underscores."""
    found: list[list[list[str]]] = []
    previous = ""
    for line in md.splitlines():
        if line.startswith("|"):
            cells = [c.strip().replace("\\_", "_") for c in _CELL_SPLIT.split(line)[1:-1]]
            if not previous.startswith("|"):
                found.append([])
            if not all(re.fullmatch(r":?-+:?", c) for c in cells):
                found[-1].append(cells)
        previous = line
    return found
