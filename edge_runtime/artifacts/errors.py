"""What can go wrong when a device opens exported artifacts, as exception types a caller can catch.

Every message says what is wrong and what to do about it: a device that refuses to run a
program must be able to tell its operator whether to re-download, re-export or free memory.
"""

from __future__ import annotations


class ArtifactError(Exception):
    """Base class: the artifacts in a directory cannot be used as they are."""


class ManifestError(ArtifactError):
    """manifest.json is missing, unreadable or does not describe what was asked for."""


class ManifestVersionError(ArtifactError):
    """The manifest or a program was written by an incompatible exporter, or they do not belong together."""


class ArtifactIntegrityError(ArtifactError):
    """A file is missing or its sha256 differs from the manifest: corrupted, tampered with or mixed up."""


class MemoryBudgetError(ArtifactError):
    """Loading the program would need more memory than the device allows."""


class ArtifactInputError(ArtifactError, ValueError):
    """Inputs (token ids, expert tensors) do not fit the exported program."""
