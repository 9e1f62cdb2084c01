"""The CLI's rich consoles: tables keep their columns when the output goes to a file or a CI log.

Rich falls back to 80 columns when stdout is not a terminal, which squeezes plan tables into
ellipses; a piped or logged ``graft`` gets 120 columns instead (``COLUMNS`` still wins when set).
"""

from __future__ import annotations

import os
import sys

from rich.console import Console

PIPED_WIDTH = 120


def make_console(*, stderr: bool = False) -> Console:
    stream = sys.stderr if stderr else sys.stdout
    width = None if os.environ.get("COLUMNS") or stream.isatty() else PIPED_WIDTH
    return Console(stderr=stderr, width=width)
