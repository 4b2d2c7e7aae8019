"""Result tables: see :mod:`pipeline.tables` (plain data, shared with the model card of `pipe export`)."""
from pipeline.tables import (add_estimates_row, add_row, fraction_label, interval_note, make_table, merge_tables, pct,
                             summary_cell, to_markdown, to_rich, value_cell)

__all__ = ["add_estimates_row", "add_row", "fraction_label", "interval_note", "make_table", "merge_tables", "pct",
           "summary_cell", "to_markdown", "to_rich", "value_cell"]
