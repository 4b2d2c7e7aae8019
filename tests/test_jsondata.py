"""The one JSON conversion (core.jsondata): results files, encoder settings, cache fingerprints."""
import json

import numpy as np
import pytest

from cache.keys import canonical_json
from core.jsondata import plain


class _Spec:
    def to_dict(self):
        return {"size": 224, "mean": [0.5, 0.5]}


def test_plain_makes_results_json_data():
    out = plain({1: np.array([1.5, np.nan]), "n": np.int64(3), "f": np.float32(0.25), "inf": float("inf"),
                 "pairs": (("a", 1), ("b", (2, 3))), "t": (1, "x"), "s": {"b", "a"}, "ok": np.bool_(True)})
    assert out == {"1": [1.5, None], "n": 3, "f": 0.25, "inf": None, "pairs": {"a": 1, "b": [2, 3]},
                   "t": [1, "x"], "s": ["a", "b"], "ok": True}
    assert type(out["n"]) is int and type(out["f"]) is float
    json.dumps(out, allow_nan=False)  # no NaN left for JSON to refuse


def test_canonical_json_writes_objects_as_their_dicts_and_refuses_the_rest():
    assert canonical_json({"pre": _Spec()}) == canonical_json({"pre": {"size": 224, "mean": [0.5, 0.5]}})
    with pytest.raises(TypeError, match="object"):
        canonical_json({"x": object()})
