"""Strict JSON for every file fedpatch writes: a non-finite number is `null`, never `NaN`.

Python's json writes NaN and Infinity, which are not JSON: browsers, `jq`, pandas' strict modes and
most other languages refuse the whole file. A metric can honestly be undefined (AUROC of a test
set with one class), so every writer goes through `dumps`: NaN/±inf become null, numpy and torch
scalars and arrays become plain numbers and lists, and `allow_nan=False` guarantees the result.
"""

from __future__ import annotations

import json
import math
from typing import Any


def finite(value: Any) -> Any:
    """A JSON-ready copy of `value`: non-finite floats -> None, array-likes -> (nested) lists."""
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return value
    if isinstance(value, float):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, dict):
        return {_key(k): finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    if hasattr(value, "dtype") and hasattr(value, "tolist"):  # numpy / torch scalars and arrays
        return finite(value.tolist())
    return value  # anything else (a Path, a set ...) becomes its str() in `dumps`


def _key(key: Any) -> Any:
    return key.item() if hasattr(key, "dtype") and hasattr(key, "item") else key


def dumps(value: Any, indent: int | None = 2) -> str:
    """`value` as strict JSON text (sorted keys, a final newline); unknown objects as their str()."""
    return json.dumps(finite(value), indent=indent, sort_keys=True, default=str, allow_nan=False) + "\n"
