"""Errors that rotgraph reports to its users as one line, without a traceback."""

from __future__ import annotations


class RotgraphError(Exception):
    """An expected failure: bad input, an unsupported model, a failed validation."""


class StructureError(RotgraphError):
    """The graph does not have the structure a pass expects; the message says what and where."""


class ValidationError(RotgraphError):
    """A rewritten model does not compute what its input computed."""
