"""Plain-text tables for reports and the command line."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["text_table"]


def text_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """Left-aligned columns two spaces apart, a dashed rule under the header; one string per line.

    Example:
        >>> print("\\n".join(text_table(["layer", "ranks"], [["fc", "4,4"]])))
        layer  ranks
        -----  -----
        fc     4,4
    """
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    return [
        "  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip()
        for row in [header, ["-" * w for w in widths], *rows]
    ]
