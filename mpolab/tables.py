"""Plain-text tables for reports and the command line."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

__all__ = ["TableReport", "text_table"]


def text_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """Left-aligned columns two spaces apart, a dashed rule under the header; one string per line.

    Examples:
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


class TableReport(ABC):
    """A report that prints as a table: subclasses give :meth:`header`, :meth:`rows` and :meth:`to_dict`.

    ``str(report)`` is the table (:func:`text_table`) followed by the :meth:`summary` lines.

    Examples:
        >>> class Sizes(TableReport):
        ...     def header(self): return ["name", "size"]
        ...     def rows(self): return [["fc", "12"]]
        ...     def to_dict(self): return {"fc": 12}
        >>> print(Sizes())
        name  size
        ----  ----
        fc    12
    """

    @abstractmethod
    def header(self) -> list[str]:
        """Column titles."""

    @abstractmethod
    def rows(self) -> list[list[str]]:
        """One list of cell strings per row, as many cells as :meth:`header`."""

    @abstractmethod
    def to_dict(self) -> dict[str, Any]:
        """The report as JSON-ready data."""

    def summary(self) -> list[str]:
        """Lines printed under the table (totals); none by default."""
        return []

    def __str__(self) -> str:
        return "\n".join([*text_table(self.header(), self.rows()), *self.summary()])
