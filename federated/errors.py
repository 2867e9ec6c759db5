"""Exceptions raised by the federation's pure parts.

Both derive from `FedpatchError`, so the command line turns them into one line and an exit code
like every other user-fixable error.
"""

from __future__ import annotations

from patchcore.errors import FedpatchError


class PayloadError(FedpatchError):
    """A client's message is malformed, of another format version, or fails validation."""


class PartitionError(FedpatchError):
    """Records cannot be split into factory shards as configured."""


class QuorumError(FedpatchError):
    """Fewer factories than federation.min_clients delivered valid payloads: no bank is built."""
