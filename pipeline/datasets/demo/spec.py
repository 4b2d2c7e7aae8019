"""What a demo dataset is made of: the spec (``demo:n=...,seed=...``) and its parser."""
from __future__ import annotations

import re
from dataclasses import dataclass

FORMAT_VERSION = 1


@dataclass(frozen=True)
class DemoSpec:
    n: int = 2000
    size: int = 224
    seed: int = 0
    reports: str = "synthetic"  # or "iu": sentences from the Indiana University reports

    def __post_init__(self) -> None:
        if int(self.n) < 1:
            raise ValueError(f"demo: n must be >= 1, got {self.n}")
        if int(self.size) < 32:
            raise ValueError(f"demo: size must be >= 32 px, got {self.size}")
        if self.reports not in ("synthetic", "iu"):
            raise ValueError(f"demo: reports must be 'synthetic' or 'iu', got {self.reports!r}")

    def to_dict(self) -> dict:
        return {"n": int(self.n), "size": int(self.size), "seed": int(self.seed), "reports": self.reports}

    def slug(self) -> str:
        """A folder/dataset name that differs whenever the generated data would."""
        return f"n{int(self.n)}-s{int(self.size)}-seed{int(self.seed)}-{self.reports}"


def parse_spec(options: str) -> DemoSpec:
    """``demo`` options: ``n=200,seed=1,size=224,reports=iu`` (``&`` works as a separator too)."""
    fields = {"n": int, "size": int, "seed": int, "reports": str}
    values = {}
    for part in filter(None, re.split(r"[,&]", options.lstrip("?"))):
        key, sep, value = part.partition("=")
        key = key.strip()
        if not sep or key not in fields:
            raise ValueError(f"demo option {part!r} not understood; use demo:key=value,... with keys "
                             f"{', '.join(fields)} (e.g. demo:n=200,reports=iu)")
        try:
            values[key] = fields[key](value.strip())
        except ValueError:
            raise ValueError(f"demo option {key}={value!r}: expected {fields[key].__name__}") from None
    return DemoSpec(**values)
