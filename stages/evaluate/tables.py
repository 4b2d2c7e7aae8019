"""Result tables: see :mod:`pipeline.tables` (typed records, shared with the model card of `pipe export`)."""
from pipeline.tables import (Cell, Column, Figure, Table, add_estimates_row, add_row, fraction_columns, fraction_label,
                             interval_note, make_table, merge_tables, pct, summary_cell, text_cell, to_markdown,
                             to_rich, value_cell)

__all__ = ["Cell", "Column", "Figure", "Table", "add_estimates_row", "add_row", "fraction_columns", "fraction_label",
           "interval_note", "make_table", "merge_tables", "pct", "summary_cell", "text_cell", "to_markdown", "to_rich",
           "value_cell"]
