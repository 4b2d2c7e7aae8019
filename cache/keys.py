"""Content keys and encoder fingerprints: the identities the cache is built on.

A content key names an input by its bytes, so the same image under two paths (or in two
datasets) is embedded once. A fingerprint names everything that changes an encoder's
output, so a changed encoder can never reuse a stale store.
"""
from __future__ import annotations

import json
import re
import unicodedata
from typing import Any

import xxhash

from core.jsondata import json_default

# Bump when the on-disk layout or the meaning of stored arrays changes.
FORMAT_VERSION = 1

_SPACE = re.compile(r"\s+")


def bytes_key(data: bytes) -> str:
    """xxh3-128 of raw input bytes, as 32 hex characters."""
    return xxhash.xxh3_128_hexdigest(data)


def normalise_report(text: str | None) -> str:
    """The canonical form of a report: NFC unicode, one space between words, no edges.

    Two reports that differ only in line breaks or spacing are the same report.
    """
    if text is None:
        return ""
    if not isinstance(text, str):  # NaN from a CSV cell, numbers...
        text = "" if text != text else str(text)
    return _SPACE.sub(" ", unicodedata.normalize("NFC", text)).strip()


def text_key(normalised: str) -> str:
    """xxh3-128 of the normalised report's UTF-8 bytes."""
    return xxhash.xxh3_128_hexdigest(normalised.encode("utf-8"))


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=json_default)


def fingerprint(spec: dict) -> str:
    """Hash of the canonical JSON of everything that changes an encoder's output."""
    return xxhash.xxh3_128_hexdigest(canonical_json({"format": FORMAT_VERSION, **spec}).encode())
