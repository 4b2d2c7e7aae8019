"""The report writer: a 'FINDINGS: ... IMPRESSION: ...' report from a study's findings.

Without noise (``noise=None``) every present finding is reported (subtle ones with a
hedge), absent ones are negated or left unmentioned, and nothing else is said about the
five findings: the report agrees with the labels.

With a :class:`ReportNoise`, the reports disagree with the labels the way real ones do.
Per study, from the noise stream:

- ``omit``: a present finding is left out of the report, as if missed (twice the chance
  for a subtle one). The report is then written as the reader saw the study, so it may
  even say "No pneumothorax.". The label stays positive.
- ``uncertain``: a clearly visible finding is reported with a hedge ("Cannot exclude ...",
  "..., which may represent ..."). Subtle findings are always hedged.
- ``spurious``: an absent finding gets a hedged mention ("Possible small left pleural
  effusion."). The label stays negative.
- paraphrases: every sentence is drawn from a wider phrase bank (several wordings per
  finding, negation and normal statement), in varied order, with optional technique and
  comparison sentences (``extras``).

The writer records what it emitted about each finding (:class:`Report.mentions`), and
:func:`measure_agreement` turns those records into the label-report agreement figures.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import numpy as np

from pipeline.datasets.demo.findings import FINDINGS, sample_finding
from pipeline.datasets.demo.phrases import (BACKGROUND, BACKGROUND_WIDE, COMPARISON, IMPRESSION_NORMAL,
                                            IMPRESSION_NORMAL_WIDE, LUNG_FINDINGS, LUNGS_CLEAR, LUNGS_CLEAR_WIDE,
                                            NEG_PAIR, NEG_PAIR_WIDE, NEG_PROB, NEGATIVE, NEGATIVE_WIDE, OTHERWISE,
                                            TECHNIQUE, _pick, hedged_sentence, pool, positive_sentence)

POSITIVE, HEDGED, NEGATED = "positive", "hedged", "negated"  # what a report says about a finding
_RANK = {POSITIVE: 3, HEDGED: 2, NEGATED: 1}

Tagged = tuple[str, dict]  # a sentence and {finding: POSITIVE | HEDGED | NEGATED} of what it says


@dataclass(frozen=True)
class ReportNoise:
    omit: float = 0.15  # chance that a present finding is left out (doubled when subtle)
    uncertain: float = 0.10  # chance that a clearly visible finding is reported with a hedge
    spurious: float = 0.05  # chance that an absent finding gets a hedged mention
    extras: float = 0.3  # chance of a technique sentence, and of a comparison sentence


@dataclass(frozen=True)
class Intent:
    """What a report will say: the findings it mentions (``shown``, with the parameters
    the reader saw), which of them with a hedge, which are not in the image, which are
    in the image but missed."""

    shown: dict
    hedge: frozenset = frozenset()
    spurious: frozenset = frozenset()
    missed: frozenset = frozenset()


@dataclass(frozen=True)
class Report:
    text: str
    mentions: dict  # finding -> POSITIVE, HEDGED, NEGATED or "" (not mentioned)
    intent: Intent


def report_intent(findings: dict, noise: ReportNoise | None, rng: np.random.Generator) -> Intent:
    """Decide, from ``rng``, what a report on ``findings`` will mention and how."""
    shown = {f: findings[f] for f in FINDINGS if f in findings}
    if noise is None:
        return Intent(shown)
    hedge, spurious, missed = set(), set(), set()
    for f in FINDINGS:
        u_omit, u_hedge, u_spurious = rng.random(3)  # three draws per finding, whatever the rates
        if f in findings:
            subtle = findings[f]["subtle"]
            if u_omit < min(1.0, noise.omit * (2.0 if subtle else 1.0)):
                missed.add(f)
                del shown[f]
            elif u_hedge < noise.uncertain and not subtle:
                hedge.add(f)
        elif u_spurious < noise.spurious:
            spurious.add(f)
    for f in FINDINGS:
        if f in spurious:  # what the reader thought was there
            shown[f] = sample_finding(rng, f)
    shown = {f: shown[f] for f in FINDINGS if f in shown}
    return Intent(shown, frozenset(hedge | spurious), frozenset(spurious), frozenset(missed))


def _positive(rng: np.random.Generator, f: str, p: dict, intent: Intent, impression: bool, wide: bool) -> Tagged:
    if f in intent.hedge:
        return hedged_sentence(rng, f, p, impression), {f: HEDGED}
    return positive_sentence(rng, f, p, impression, wide), {f: HEDGED if p["subtle"] else POSITIVE}


def _negations(rng: np.random.Generator, negs: set[str], wide: bool) -> list[Tagged]:
    out: list[Tagged] = []
    if "effusion" in negs and "pneumothorax" in negs and rng.random() < 0.4:
        out.append((_pick(rng, pool(NEG_PAIR, NEG_PAIR_WIDE, wide)), {"effusion": NEGATED, "pneumothorax": NEGATED}))
        negs = negs - {"effusion", "pneumothorax"}
    for f in sorted(negs, key=FINDINGS.index):
        if rng.random() < NEG_PROB[f]:
            out.append((_pick(rng, pool(NEGATIVE[f], NEGATIVE_WIDE[f], wide)), {f: NEGATED}))
    return out


def _lungs(rng: np.random.Generator, shown: dict, wide: bool) -> list[Tagged]:
    """"The lungs are clear." when no lung finding is reported; "otherwise clear" after some."""
    if not any(f in shown for f in LUNG_FINDINGS) and rng.random() < 0.8:
        return [(_pick(rng, pool(LUNGS_CLEAR, LUNGS_CLEAR_WIDE, wide)), {})]
    if any(f in shown for f in ("consolidation", "nodule")) and "effusion" not in shown \
            and "pneumothorax" not in shown and rng.random() < 0.3:
        return [(OTHERWISE, {})]
    return []


def _impression(rng: np.random.Generator, intent: Intent, wide: bool) -> list[Tagged]:
    if not intent.shown:
        return [(_pick(rng, pool(IMPRESSION_NORMAL, IMPRESSION_NORMAL_WIDE, wide)), {})]
    present = list(intent.shown)
    order = [present[int(i)] for i in rng.permutation(len(present))]
    return [_positive(rng, f, intent.shown[f], intent, True, wide) for f in order]


def _synthetic_sections(rng: np.random.Generator, intent: Intent, wide: bool) -> tuple[list[Tagged], list[Tagged]]:
    shown = intent.shown
    positives = [_positive(rng, f, p, intent, False, wide) for f, p in shown.items()]
    body = list(positives)
    body += _negations(rng, set(FINDINGS) - set(shown), wide)
    body += _lungs(rng, shown, wide)
    background = pool(BACKGROUND, BACKGROUND_WIDE, wide)
    for i in rng.permutation(len(background))[: int(rng.integers(0, 3))]:
        body.append((background[int(i)], {}))
    body = [body[int(i)] for i in rng.permutation(len(body))]
    texts = [t for t, _ in body]
    if OTHERWISE in texts:  # "otherwise clear" reads only after the positive findings
        del body[texts.index(OTHERWISE)]
        said = {t for t, _ in positives}
        last = max(i for i, (t, _) in enumerate(body) if t in said)
        body.insert(last + 1, (OTHERWISE, {}))
    return body, _impression(rng, intent, wide)


def _with_extras(rng: np.random.Generator, body: list[Tagged], rate: float) -> list[Tagged]:
    """Technique and comparison sentences at the start of the findings, sometimes."""
    head = []
    if rng.random() < rate:
        head.append((_pick(rng, TECHNIQUE), {}))
    if rng.random() < rate:
        head.append((_pick(rng, COMPARISON), {}))
    return head + body


def _join(body: list[str], impression: list[str], rng) -> str:
    if len(impression) > 1 and rng.random() < 0.5:
        imp = " ".join(f"{i + 1}. {s}" for i, s in enumerate(impression))
    else:
        imp = " ".join(impression)
    return f"FINDINGS: {' '.join(body)} IMPRESSION: {imp}"


def _mentions(sentences: Iterable[Tagged]) -> dict[str, str]:
    out = {f: "" for f in FINDINGS}
    for _, tags in sentences:
        for f, kind in tags.items():
            if _RANK[kind] > _RANK.get(out[f], 0):
                out[f] = kind
    return out


def compose_report(rng: np.random.Generator, findings: dict, bank=None, noise: ReportNoise | None = None,
                   noise_rng: np.random.Generator | None = None) -> Report:
    """A report on ``findings`` and the record of what it says about each finding.

    The wording comes from ``rng``; the noise decisions from ``noise_rng`` (default:
    ``rng``). With a :class:`SentenceBank` (see :func:`load_iu_bank`), real report
    sentences are used wherever one fits; otherwise the synthetic phrase bank.
    """
    intent = report_intent(findings, noise, rng if noise_rng is None else noise_rng)
    wide = noise is not None
    if bank is not None:
        body, impression = bank.sections(rng, intent, wide)
    else:
        body, impression = _synthetic_sections(rng, intent, wide)
    if noise is not None:
        body = _with_extras(rng, body, noise.extras)
    text = _join([t for t, _ in body], [t for t, _ in impression], rng)
    return Report(text, _mentions(body + impression), intent)


def write_report(rng: np.random.Generator, findings: dict, bank=None, noise: ReportNoise | None = None) -> str:
    """Write a 'FINDINGS: ... IMPRESSION: ...' report on ``findings`` (see
    :func:`compose_report`); without ``noise`` it agrees with ``findings``."""
    return compose_report(rng, findings, bank, noise).text


# --------------------------------------------------------------------------- agreement


def _share(k: int, n: int) -> float | None:
    return round(k / n, 4) if n else None


def measure_agreement(labels: Iterable[dict], mentions: Iterable[dict]) -> dict:
    """Label-report agreement over a dataset, per finding and pooled ("all").

    ``mentioned``: positives whose report mentions them (asserted or hedged);
    ``hedged``: positives mentioned only with a hedge; ``contradicted``: positives the
    report negates; ``false_mention``: negatives the report mentions (asserted or
    hedged); ``negated``: negatives the report negates. ``positives``/``negatives``: counts.
    """
    count = {(f, lab, kind): 0 for f in FINDINGS for lab in (0, 1) for kind in ("", POSITIVE, HEDGED, NEGATED)}
    for lab, men in zip(labels, mentions):
        for f in FINDINGS:
            count[(f, int(bool(lab[f])), men.get(f, ""))] += 1

    def n(f, lab, kinds=("", POSITIVE, HEDGED, NEGATED)):
        fs = FINDINGS if f == "all" else (f,)
        return sum(count[(g, lab, k)] for g in fs for k in kinds)

    keys = ("all", *FINDINGS)
    return {
        "mentioned": {f: _share(n(f, 1, (POSITIVE, HEDGED)), n(f, 1)) for f in keys},
        "hedged": {f: _share(n(f, 1, (HEDGED,)), n(f, 1)) for f in keys},
        "contradicted": {f: _share(n(f, 1, (NEGATED,)), n(f, 1)) for f in keys},
        "false_mention": {f: _share(n(f, 0, (POSITIVE, HEDGED)), n(f, 0)) for f in keys},
        "negated": {f: _share(n(f, 0, (NEGATED,)), n(f, 0)) for f in keys},
        "positives": {f: n(f, 1) for f in keys},
        "negatives": {f: n(f, 0) for f in keys},
    }


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.0f}%"


def agreement_line(agreement: dict) -> str:
    """One line for people: "reports mention 82% of findings (cardiomegaly 85%, ...) ..."."""
    m = agreement["mentioned"]
    per = ", ".join(f"{f} {_pct(m[f])}" for f in FINDINGS)
    return (f"reports mention {_pct(m['all'])} of findings ({per}); {_pct(agreement['hedged']['all'])} only "
            f"hedged, {_pct(agreement['contradicted']['all'])} negated; "
            f"{_pct(agreement['false_mention']['all'])} of absent findings get a false mention")
