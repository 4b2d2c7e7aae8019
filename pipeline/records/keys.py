"""The names inside a run's data files, written by evaluation and read by reports: each format once."""
from __future__ import annotations

from pipeline.tables import fraction_label

# The data files beside results.json, by role: results.json lists the ones a run wrote ("files");
# runs from before that list wrote them under these names.
DATA_FILES = {"predictions": "predictions.npz", "overlays": "overlays.npz", "examples": "examples.json",
              "thumbnails": "thumbnails.npz"}


def prediction_key(method: int, head: str | None = None, fraction: float | None = None,
                   seed: int | None = None) -> str:
    """The key of ``[n, L]`` test scores in ``predictions.npz``: ``m<i>`` for method ``i`` (zero-shot),
    ``m<i>/<head>/<fraction>/seed<s>`` for one run of a head task (classification)."""
    if head is None:
        return f"m{method}"
    return f"m{method}/{head}/{fraction_label(fraction)}/seed{seed}"


def overlay_keys(method: int) -> tuple[str, str]:
    """The keys of method ``i``'s predicted masks and their Dice in ``overlays.npz``."""
    return f"pred{method}", f"dice{method}"
