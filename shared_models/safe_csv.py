"""CSV fields that a spreadsheet will not run: formula neutralisation on write, undone on read.

A site's manifest is written by people and opened in spreadsheets; a ``patient_id`` of
``=HYPERLINK(...)`` copied unchanged into a CSV the project writes (``split.csv``, the pooled
site's manifest, prediction tables) runs as a formula when an operator opens that file.
Following the OWASP guidance on CSV injection
(https://owasp.org/www-community/attacks/CSV_Injection), a field that starts with ``=``,
``+``, ``-``, ``@``, a tab or a carriage return is written with a leading single quote, so a
spreadsheet shows it as text. Quoting of commas and double quotes is the csv module's job.

Two choices of this project, so that the files stay machine-readable:

* A field that starts with ``'`` gets one more ``'``, which makes the escape reversible:
  :func:`restore` drops exactly one leading quote, and ``restore(neutralise(v)) == v``
  for every string ``v``. Files the project writes are read back with :func:`restore`.
* A field made only of numbers separated by spaces (``-12.5``, a ``box_lps_mm`` of
  ``-100 -24 -24 -60 24 24``, also with runs of spaces, as the site's box reader accepts) is
  left alone: with no letter, cell reference, function, operator other than a number's own sign,
  or separator other than a space, it cannot call or reference anything, and quoting it would
  change the data (a site reads the quoted box as unreadable).
"""

from __future__ import annotations

import csv
import re
from collections.abc import Iterable, Mapping
from typing import IO, Any

FORMULA_PREFIXES: tuple[str, ...] = ("=", "+", "-", "@", "\t", "\r")
_NUMBER = r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?"
_NUMBERS_RE = re.compile(rf"{_NUMBER}(?: +{_NUMBER})*")


def neutralise(value: Any) -> str:
    """``value`` as text a spreadsheet shows as text (see the module notes).

    Returns:
        ``"'" + text`` when the text starts with a formula character or a quote and is not
        a plain list of numbers; the text unchanged otherwise.
    """
    text = "" if value is None else str(value)
    if text.startswith("'") or (text.startswith(FORMULA_PREFIXES) and not _NUMBERS_RE.fullmatch(text)):
        return "'" + text
    return text


def restore(text: str) -> str:
    """Undo :func:`neutralise`: drop one leading single quote, if any."""
    return text[1:] if text.startswith("'") else text


class SafeWriter:
    """``csv.writer`` whose every field goes through :func:`neutralise`."""

    def __init__(self, handle: IO[str], **kwargs: Any) -> None:
        self._writer = csv.writer(handle, **kwargs)

    def writerow(self, row: Iterable[Any]) -> None:
        self._writer.writerow([neutralise(v) for v in row])

    def writerows(self, rows: Iterable[Iterable[Any]]) -> None:
        for row in rows:
            self.writerow(row)


class SafeDictWriter(csv.DictWriter):
    """``csv.DictWriter`` whose every value goes through :func:`neutralise` (the header too)."""

    def writeheader(self) -> Any:
        return self.writer.writerow([neutralise(f) for f in self.fieldnames])

    def writerow(self, rowdict: Mapping[Any, Any]) -> Any:
        return super().writerow({k: neutralise(v) for k, v in rowdict.items()})

    def writerows(self, rowdicts: Iterable[Mapping[Any, Any]]) -> None:
        for row in rowdicts:
            self.writerow(row)
