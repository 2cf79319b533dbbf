"""What every record format is read into: turns (prompt side and trained side), and the two ways a record can
fail to become them."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Turn:
    """One exchange: the prompt side (system, input) and the trained side (output)."""
    input: str
    output: str
    system: str = ""


class BadRecord(ValueError):
    """A record that does not fit its format; the message says what is missing."""


class Filtered(Exception):
    """A well-formed record that the data itself marks as not for training (a deleted or failed-review OASST
    prompt, a prompt nobody answered): counted and reported, never an error."""
