"""The per-family parity table: tests record each logit error as a property of their report, and the run's terminal
summary prints them as one table (report properties travel to the controller, so the table is whole under
pytest-xdist too)."""

from __future__ import annotations

PARITY_PROPERTY = "logit_relative_error"
"""A test's `record_property(PARITY_PROPERTY, (family, measurement, error))`."""


def print_parity_table(terminalreporter) -> None:
    table: dict[str, dict[str, float]] = {}
    for reports in terminalreporter.stats.values():
        for report in reports:
            for name, value in getattr(report, "user_properties", ()):
                if name == PARITY_PROPERTY:
                    family, column, error = value
                    table.setdefault(family, {})[column] = error
    if not table:
        return
    columns = list(dict.fromkeys(column for row in table.values() for column in row))
    terminalreporter.write_sep("=", "logit relative error vs transformers (max |Δ| / max |logit|)")
    terminalreporter.write_line(" | ".join([f"{'family':<20}", *(f"{c:>14}" for c in columns)]))
    for family, row in sorted(table.items()):
        cells = (f"{row[c]:>14.2e}" if c in row else f"{'-':>14}" for c in columns)
        terminalreporter.write_line(" | ".join([f"{family:<20}", *cells]))
