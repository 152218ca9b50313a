"""The one base of every failure pytun shows an operator.

Each is raised with one line that says what failed and why; the commands print it as
`PROG: error: LINE` and exit 1 (common/cli.py). It is not a ValueError, so a broad
`except ValueError` around parsing never swallows one by accident.
"""

from __future__ import annotations


class PytunError(Exception):
    """A failure with a one-line message for the operator."""
