"""Errors of the exporter itself (bad options, unwritable output, a program that fails its self-check)."""

from __future__ import annotations


class ExportError(Exception):
    """The export cannot be done as asked; the message says why and what to change."""


class ExportVerificationError(ExportError):
    """A freshly exported artifact does not reproduce the eager model; nothing was written."""
