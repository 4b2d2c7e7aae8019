"""Which training runs are the same run: the one rule of what must match before a run resumes.

`pipe train-adaptor` resumes a run folder whose checkpoint records the same identity (its
``config_hash`` is the hash of :func:`resume_key`), and `pipe reproduce` calls a
pretraining done, to resume, or a conflict by the same rule (:func:`differences`). Light:
it imports nothing heavy.
"""
from __future__ import annotations

# Settings a run may change and still be the same run: how long, where and how it runs.
FREE = ("epochs", "out", "device", "resident", "cache", "val_batch_size", "step")
# Settings added after runs were first written (dotted for a section's), with the value those runs
# had: a run that records this value (or none) is the same run as before the setting existed.
ADDED = {"gather_negatives": True, "loss_groups": 1, "monitor": "val_loss", "patience": 0, "min_delta": 0.0,
         "optim.schedule_batch": 0, "optim.epoch_end_step": False}
# Filled in by training from the cache (the encoders' widths), not chosen: a config that has not
# been trained yet does not know them.
FILLED = ("adaptor.image_dim", "adaptor.text_dim")


def resume_key(config: dict) -> dict:
    """What must match for a run to continue another: its config (as ``pipeline.config.to_dict`` gives
    it) without the FREE settings, and without an ADDED one at the value earlier runs had."""
    key = {k: (dict(v) if isinstance(v, dict) else v) for k, v in config.items() if k not in FREE}
    for dotted, earlier in ADDED.items():
        section, _, name = dotted.rpartition(".")
        node = key.get(section) if section else key
        if isinstance(node, dict) and name in node and node[name] == earlier and type(node[name]) is type(earlier):
            del node[name]
    return key


def differences(saved: dict, wanted: dict) -> list[str]:
    """The dotted keys in which a trained run's config (``saved``, from its checkpoint) and the config
    of a run not yet trained (``wanted``) differ by :func:`resume_key`; FILLED keys are not compared."""
    a, b = _flat(resume_key(saved)), _flat(resume_key(wanted))
    return sorted(k for k in set(a) | set(b) if k not in FILLED and a.get(k) != b.get(k))


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v})
    return out
