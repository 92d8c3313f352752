"""The two exceptions every layer may raise; this module imports nothing of hpcfed.

``UserError`` is bad input the user can fix (exit code 2, one line). ``RankFailed`` is what the
other ranks raise when one rank's code failed: every rank leaves the run together (no rank left
waiting in a collective), and only the rank that failed reports the error.
"""

from __future__ import annotations


class UserError(Exception):
    """The user's input is wrong: the CLI prints the message on one line and exits 2."""


class StorageError(Exception):
    """The run's storage failed (no space, quota, an I/O error): not the user's input, yet no bug
    either. The CLI prints the message on one line (it names the file, the newest complete
    checkpoint and what to do) and exits 1, without a traceback."""


class RankFailed(Exception):
    """Raised on every rank but the one that reports: rank ``rank`` failed and reported the error.

    ``exit_code`` is what the CLI exits with (2 when the reporting rank's error was a
    :class:`UserError`, else 1), so every rank of an ``mpirun`` ends with the same code."""

    def __init__(self, rank: int, exit_code: int):
        super().__init__(f"rank {rank} failed (its error is reported there); this rank stopped with it")
        self.rank, self.exit_code = rank, exit_code
