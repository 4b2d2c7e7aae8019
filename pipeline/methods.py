"""What a row of a results table is: a :class:`Method`, of one kind of :data:`METHOD_KINDS`.

Evaluation names every method it scores (the frozen Adaptor, the no-Adaptor baseline, a
CLIP-style pair's native joint space, the least-squares map, the fixed predictors it sets
beside them) and records, beside the
name it prints, what the method is: its kind, the Adaptor's mode, the head kind of a head
task's row and a variant of the Adaptor's figures (:data:`VARIANTS`). Readers (the report
page, the model card, `pipe report`) ask the kind how to rank, label and colour a row;
nothing reads a name back. Light to import: no numpy, no torch.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Method:
    """One method of a results table, as evaluation named it."""

    name: str                   # as the tables print it (a merged table may append the run it came from)
    kind: str                   # METHOD_KINDS
    base: str = ""              # the features' name without head or variant: one colour per base on a page
    mode: str | None = None     # the Adaptor's mode (pooled, tokens), for its rows
    head: str | None = None     # the head kind of a head task's row (mlp, linear, probe, decoder)
    variant: str | None = None  # VARIANTS: how the row's figures differ from its Adaptor's plain ones

    def __post_init__(self):
        if not self.base:
            object.__setattr__(self, "base", self.name)

    @property
    def type(self) -> "MethodKind":
        return METHOD_KINDS.get(self.kind, METHOD_KINDS["other"])

    @property
    def short(self) -> str:
        """The method without its encoders, for a narrow place ("Adaptor, pooled", "no Adaptor", ...)."""
        return self.type.short(self)

    def with_head(self, head: str) -> "Method":
        """The row of this method's ``head``: ``<name> (<head>)``."""
        return dataclasses.replace(self, name=f"{self.name} ({head})", head=head)

    def renamed(self, name: str) -> "Method":
        return dataclasses.replace(self, name=name)

    def to_dict(self) -> dict:
        """The identity a results file records beside the name (``"identity"``)."""
        return {"kind": self.kind, "base": self.base, "mode": self.mode, "head": self.head, "variant": self.variant}

    @classmethod
    def from_dict(cls, name: str, identity: dict) -> "Method":
        return cls(name, str(identity.get("kind") or "other"), str(identity.get("base") or name),
                   identity.get("mode"), identity.get("head"), identity.get("variant"))


def _truncated(m: Method) -> str:
    return m.name if len(m.name) < 40 else m.name[:38] + "…"


def _adaptor_short(m: Method) -> str:
    return VARIANTS[m.variant].short(m.mode) if m.variant in VARIANTS else f"Adaptor, {m.mode}"


@dataclass(frozen=True)
class MethodKind:
    """A kind of method: where its rows go and how a narrow place names them."""

    name: str
    summary: str
    order: int                            # rows of a table: 0 ours, 1 the references, 2 the fixed predictors
    measured: bool                        # its figures are measured on the test set; chance's are computed: never
                                          # the best of a column, and shown as plain text
    short: Callable[[Method], str] = _truncated
    colour: str | None = None             # its fixed colour on a report page; None: the next of ours' colours

    @property
    def ours(self) -> bool:
        return self.order == 0


METHOD_KINDS: dict[str, MethodKind] = {k.name: k for k in (
    MethodKind("adaptor", "a trained Adaptor's embeddings (ours)", 0, True, _adaptor_short),
    MethodKind("backbone", "the frozen encoders' own features, no Adaptor", 1, True, lambda m: "no Adaptor",
               colour="#6e7781"),
    MethodKind("native", "a CLIP-style pair's own joint space: each tower's projected vectors, the model's logit "
               "scale (no Adaptor)", 1, True, lambda m: "native joint space", colour="#0969da"),
    MethodKind("linear-map", "a least-squares map from the image features to the text features", 1, True,
               lambda m: "least-squares map", colour="#2da44e"),
    MethodKind("published", "a figure published elsewhere, with its protocol", 1, True),
    MethodKind("other", "a method this version does not know (a file from elsewhere)", 1, True),
    MethodKind("all-empty", "the predictor of an empty mask everywhere (segmentation's reference)", 2, True,
               lambda m: "all-empty predictor", colour="#57606a"),
    MethodKind("chance", "the figure a random ranking gets", 2, False, lambda m: "chance", colour="#57606a"),
)}


@dataclass(frozen=True)
class Variant:
    """A way an Adaptor's row is computed other than from its plain embeddings."""

    name: str
    summary: str
    short: Callable[[str | None], str]    # its short name, from the Adaptor's mode


VARIANTS: dict[str, Variant] = {v.name: v for v in (
    Variant("itm-rerank", "each query's top candidates re-ranked by the matching head",
            lambda mode: f"Adaptor, {mode}+ITM"),
    Variant("raw-tokens", "the backbone's raw patch tokens decoded (the Adaptor's mode has no per-token path)",
            lambda mode: f"{mode}: raw tokens"),
)}


def adaptor_name(mode: str, backbone: str, text_encoder: str | None) -> str:
    """The name of an Adaptor's rows (and of its training run on a report page)."""
    return f"Adaptor ({mode}) {backbone} + {text_encoder}"


def adaptor_method(mode: str, backbone: str, text_encoder: str | None) -> Method:
    return Method(adaptor_name(mode, backbone, text_encoder), "adaptor", mode=mode)


def native_name(backbone: str, text_encoder: str | None = None) -> str:
    """The name of a pair's own joint-space rows (``--adaptor native``, or beside an Adaptor's)."""
    return f"native joint space {backbone}" + (f" + {text_encoder}" if text_encoder else "")


def native_method(backbone: str, text_encoder: str | None = None) -> Method:
    return Method(native_name(backbone, text_encoder), "native")
