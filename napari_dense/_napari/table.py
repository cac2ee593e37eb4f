"""Read-only tables of text, shown exactly as given (the Compare panel's two tabs).

magicgui's ``Table`` re-reads numeric-looking text as floats and shows it in its own format
("0.38" becomes "0.3800", "0.072" becomes "7.200e-02"), and its cells are editable: the panels
use a plain ``QTableWidget`` instead, through these helpers.
"""

from __future__ import annotations

from collections.abc import Sequence

from qtpy.QtWidgets import QAbstractItemView, QHeaderView, QTableWidget, QTableWidgetItem

__all__ = ["column_names", "headers", "read_only_table", "set_columns", "set_rows", "table_text"]


def read_only_table(columns: Sequence[str], tips: Sequence[str] = ()) -> QTableWidget:
    """A table with these column headers (``tips`` as their tooltips), rows selectable, not
    editable, columns as wide as their contents."""
    table = QTableWidget(0, len(columns))
    table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
    table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
    table.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
    header, row_header = headers(table)
    row_header.setVisible(False)
    header.setSectionResizeMode(QHeaderView.ResizeMode.ResizeToContents)
    header.setStretchLastSection(True)
    set_columns(table, columns, tips)
    return table


def set_columns(table: QTableWidget, columns: Sequence[str], tips: Sequence[str] = ()) -> None:
    """Replace the column headers (and their tooltips)."""
    table.setColumnCount(len(columns))
    for column, name in enumerate(columns):
        item = QTableWidgetItem(name)
        if column < len(tips):
            item.setToolTip(tips[column])
        table.setHorizontalHeaderItem(column, item)


def set_rows(table: QTableWidget, rows: Sequence[Sequence[str]]) -> None:
    """Replace the rows; every cell is shown as the text given."""
    table.clearSelection()
    table.setRowCount(len(rows))
    for r, cells in enumerate(rows):
        for c, text in enumerate(cells):
            table.setItem(r, c, QTableWidgetItem(text))


def table_text(table: QTableWidget) -> list[list[str]]:
    """The cells of a table as shown, row by row."""
    return [
        [item.text() if (item := table.item(r, c)) else "" for c in range(table.columnCount())]
        for r in range(table.rowCount())
    ]


def column_names(table: QTableWidget) -> list[str]:
    """The column headers as shown."""
    return [
        item.text() if (item := table.horizontalHeaderItem(c)) else ""
        for c in range(table.columnCount())
    ]


def headers(table: QTableWidget) -> tuple[QHeaderView, QHeaderView]:
    """The column and row headers (never None on a table; Qt's stubs say Optional)."""
    header, row_header = table.horizontalHeader(), table.verticalHeader()
    assert header is not None and row_header is not None
    return header, row_header
