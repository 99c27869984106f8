"""Markdown table cells for the reports a run writes (evaluation.md, report.md).

train/config/reference.py keeps its own escaper: config/ is the ground level and imports nothing
else from train/.
"""

from __future__ import annotations


def cell(value: str | float | None, digits: int | None = None) -> str:
    """One table cell: None -> "–"; a number with ``digits`` decimals; text with ``|`` escaped
    and newlines as spaces (either would break the row)."""
    if value is None:
        return "–"
    text = str(value) if digits is None else f"{value:.{digits}f}"
    return text.replace("|", "\\|").replace("\n", " ")
