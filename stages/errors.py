"""The errors a user can fix. Every stage module may import this one; it imports nothing of ours."""
from __future__ import annotations


class StageError(Exception):
    """An error the user can fix: the message names the file or key and the problem."""


class ParamError(StageError):
    """A value in params.yaml is missing, unknown, of the wrong type or out of range."""
