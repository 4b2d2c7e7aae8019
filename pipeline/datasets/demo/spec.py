"""What a demo dataset is made of: the spec (``demo?n=...&seed=...``) and its parser."""
from __future__ import annotations

import re
from dataclasses import dataclass

from pipeline.datasets.demo.reports import ReportNoise

FORMAT_VERSION = 1

_DEFAULT_NOISE = ReportNoise()


@dataclass(frozen=True)
class DemoSpec:
    n: int = 2000
    size: int = 224
    seed: int = 0
    reports: str = "synthetic"  # or "iu": sentences from the Indiana University reports
    noise: int = 1  # 1: the reports disagree with the labels as real ones do; 0: they agree exactly
    omit: float = _DEFAULT_NOISE.omit  # chance that a present finding is left out of the report
    uncertain: float = _DEFAULT_NOISE.uncertain  # chance that a visible finding is hedged
    spurious: float = _DEFAULT_NOISE.spurious  # chance that an absent finding gets a hedged mention

    def __post_init__(self) -> None:
        if int(self.n) < 1:
            raise ValueError(f"demo: n must be >= 1, got {self.n}")
        if int(self.size) < 32:
            raise ValueError(f"demo: size must be >= 32 px, got {self.size}")
        if self.reports not in ("synthetic", "iu"):
            raise ValueError(f"demo: reports must be 'synthetic' or 'iu', got {self.reports!r}")
        if self.noise not in (0, 1):
            raise ValueError(f"demo: noise must be 0 or 1, got {self.noise!r}")
        for name in ("omit", "uncertain", "spurious"):
            if not 0.0 <= float(getattr(self, name)) <= 1.0:
                raise ValueError(f"demo: {name} is a probability between 0 and 1, got {getattr(self, name)}")

    def to_dict(self) -> dict:
        return {"n": int(self.n), "size": int(self.size), "seed": int(self.seed), "reports": self.reports,
                "noise": int(self.noise), "omit": float(self.omit), "uncertain": float(self.uncertain),
                "spurious": float(self.spurious)}

    def report_noise(self) -> ReportNoise | None:
        """The report noise model, or None for reports that agree with the labels."""
        if not self.noise:
            return None
        return ReportNoise(omit=float(self.omit), uncertain=float(self.uncertain), spurious=float(self.spurious))

    def slug(self) -> str:
        """A folder/dataset name that differs whenever the generated data would."""
        base = f"n{int(self.n)}-s{int(self.size)}-seed{int(self.seed)}-{self.reports}"
        if not self.noise:
            return f"{base}-clean"
        pct = (f"{100 * float(x):g}" for x in (self.omit, self.uncertain, self.spurious))
        return base + "-o{}u{}s{}".format(*pct)


def _flag(value: str) -> int:
    v = value.strip().lower()
    if v in ("1", "on", "true", "yes"):
        return 1
    if v in ("0", "off", "false", "no"):
        return 0
    raise ValueError(value)


# option -> (parser, what it expects)
_OPTIONS = {"n": (int, "an integer"), "size": (int, "an integer"), "seed": (int, "an integer"),
            "reports": (str, "synthetic or iu"), "noise": (_flag, "0 or 1"), "omit": (float, "a number"),
            "uncertain": (float, "a number"), "spurious": (float, "a number")}


def parse_spec(options: str) -> DemoSpec:
    """``demo`` options: ``n=200,seed=1,size=224,reports=iu,noise=0,omit=0.2,uncertain=0.1,spurious=0.05``
    (``&`` works as a separator too)."""
    values = {}
    for part in filter(None, re.split(r"[,&]", options.lstrip("?"))):
        key, sep, value = part.partition("=")
        key = key.strip()
        if not sep or key not in _OPTIONS:
            raise ValueError(f"demo option {part!r} not understood; use demo:key=value,... with keys "
                             f"{', '.join(_OPTIONS)} (e.g. demo?n=200&reports=iu or demo?noise=0)")
        parser, expected = _OPTIONS[key]
        try:
            values[key] = parser(value.strip())
        except ValueError:
            raise ValueError(f"demo option {key}={value!r}: expected {expected}") from None
    return DemoSpec(**values)
