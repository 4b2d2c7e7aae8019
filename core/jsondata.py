"""The one conversion of Python values into JSON data (dicts, lists, str, numbers, bool, None).

Used for results files, for encoder settings and as the ``default`` of the cache's
canonical JSON. Those hashes are the stores' fingerprints: what this gives for a value
that a fingerprint holds must never change, or every cache written before would look stale.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np


def plain(x: Any) -> Any:
    """``x`` as nested JSON data.

    - a mapping becomes a dict with string keys;
    - a tuple of ``(name, value)`` pairs (how frozen settings store a mapping) becomes a dict;
    - other tuples, lists and sets become lists (a set in sorted order where it can be sorted);
    - numpy arrays become lists, numpy scalars Python numbers;
    - a float that is not finite (NaN, inf) becomes None, which JSON can hold;
    - an object with ``to_dict()`` becomes its dict.
    """
    if isinstance(x, Mapping):
        return {str(k): plain(v) for k, v in x.items()}
    if isinstance(x, tuple) and x and all(isinstance(v, tuple) and len(v) == 2 and isinstance(v[0], str) for v in x):
        return {k: plain(v) for k, v in x}
    if isinstance(x, (set, frozenset)):
        try:
            x = sorted(x)
        except TypeError:
            x = list(x)
    if isinstance(x, (list, tuple)):
        return [plain(v) for v in x]
    if isinstance(x, np.ndarray):
        return plain(x.tolist())
    if isinstance(x, (bool, np.bool_)):
        return bool(x)
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, (float, np.floating)):
        return float(x) if math.isfinite(x) else None
    if hasattr(x, "to_dict"):
        return plain(x.to_dict())
    return x


def json_default(obj: Any) -> Any:
    """For ``json.dumps(..., default=json_default)``: what it cannot write itself, as :func:`plain` has it."""
    converted = plain(obj)
    if converted is obj:
        raise TypeError(f"cannot write {type(obj).__name__} as JSON")
    return converted
