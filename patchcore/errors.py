"""Exceptions a user can act on.

Every error fedpatch raises on bad input is a subclass of `FedpatchError` whose message is one
line naming the offending file, key or value. The command line (experiments/app/cli.py) is the only
place that turns them into `error: <message>` and a non-zero exit code.
"""

from __future__ import annotations


class FedpatchError(Exception):
    """Base class: bad input or state the user can fix."""


class DataError(FedpatchError):
    """A dataset root, image, mask or layout is missing or malformed."""


class ConfigError(FedpatchError):
    """A configuration key or value is unknown or out of range."""


class BankFormatError(FedpatchError):
    """A memory-bank file is missing, of the wrong format, or fails its checksum."""


class WeightsError(FedpatchError):
    """Backbone weights cannot be found or do not fit the network."""
