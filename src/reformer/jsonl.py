"""JSON-lines files read one bounded line at a time, with errors that name the file and line.

A line longer than the reader allows is refused after reading that many bytes, so a file of one huge
line (a JSON array saved as one line, a binary file given by mistake) is reported without being read
into memory. Lines must be UTF-8 (a byte-order mark at the start of the file is accepted); blank lines
are skipped.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any


def jsonl_values(
    path: str | os.PathLike,
    max_line_bytes: int,
    example: str,
    error: type[Exception] = ValueError,
    too_long_fix: str = "",
) -> Iterator[tuple[str, Any]]:
    """``("file:line", value)`` for each non-blank line of ``path``, parsed as JSON.

    Raises ``error`` naming the file and line for a line over ``max_line_bytes`` bytes, invalid UTF-8
    or invalid JSON; ``example`` (one valid line) is quoted in the message, ``too_long_fix`` in that of a
    line too long.
    """
    with open(path, "rb") as f:
        number = 0
        while raw := f.readline(max_line_bytes + 1):
            number += 1
            where = f"{path}:{number}"
            if len(raw) > max_line_bytes and not raw.endswith(b"\n"):
                raise error(
                    f"{where}: the line is longer than {max_line_bytes:,} bytes, more than any valid "
                    f"example can take (stopped reading there); {too_long_fix or 'shorten it'}"
                )
            try:
                text = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as err:
                raise error(
                    f"{where}: not UTF-8 text (byte 0x{raw[err.start]:02x} at column {err.start + 1}); "
                    "save the file as UTF-8"
                ) from err
            if not text.strip():
                continue
            try:
                value = json.loads(text)
            except json.JSONDecodeError as err:
                raise error(
                    f"{where}: not valid JSON ({err.msg} at column {err.colno}); each line must be one "
                    f"object like {example}"
                ) from err
            yield where, value
