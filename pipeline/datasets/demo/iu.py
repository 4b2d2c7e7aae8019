"""Real report sentences for ``reports=iu``: the Indiana University chest X-ray reports.

The reports ship inside the optional ``torchxrayvision`` package (licensed CC BY-NC-ND
4.0). They are read from the installed package at run time; nothing of them is copied
into this repository. Each sentence is classified by what it says about the five
findings, and a report for a study is assembled from sentences that fit it. Under the
report noise model (see ``reports``) the bank writes what the noisy reader saw: real
sentences only assert findings that are in the image, and hedged mentions (uncertain or
spurious) are written from the synthetic phrase bank.
"""
from __future__ import annotations

import importlib.util
import io
import re
import tarfile
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable

import numpy as np

from pipeline.datasets.demo.findings import FINDINGS, _zone_of
from pipeline.datasets.demo.phrases import (IMPRESSION_NORMAL, IMPRESSION_NORMAL_WIDE, LUNG_FINDINGS, LUNGS_CLEAR,
                                            LUNGS_CLEAR_WIDE, NEG_PROB, NEGATIVE, NEGATIVE_WIDE, _pick,
                                            hedged_sentence, pool, positive_sentence)
from pipeline.datasets.demo.reports import HEDGED, NEGATED, POSITIVE, Intent, Tagged

IU_MISSING = (
    "demo?reports=iu needs the IU reports from the torchxrayvision package: "
    "pip install 'freeze-pipe[xrv]'"
)

_SCOPE_BREAK = re.compile(r"[;:.]|\bbut\b|however|although|though|\bthere (?:is|are)\b|\bwith\b|\bwhich\b|"
                          r"\bis (?:seen|present|noted)\b|\bare (?:seen|present|noted)\b", re.I)
_NEG_CUE = re.compile(r"\b(no|not|without|negative for|free of|clear of|absence of|resolved)\b", re.I)


_MENTION = {
    "cardiomegaly": re.compile(r"cardiomegaly|\b(?:heart|cardiac)\b[^.;]*\benlarge|\benlarge\w*[^.;]*\b(?:heart|cardiac)\b", re.I),
    "effusion": re.compile(r"effusion|pleural fluid|costophrenic[^.;]*blunt|blunt\w*[^.;]*costophrenic", re.I),
    "consolidation": re.compile(r"consolidat|pneumonia|air ?space (?:disease|opacit)|infiltrat", re.I),
    "pneumothorax": re.compile(r"pneumothora", re.I),
    "nodule": re.compile(r"nodul|\bmass(?:es)?\b|granuloma", re.I),
}
_HEART_NORMAL = re.compile(
    r"\b(?:heart|cardiac|cardiomediastinal)\b[^.;]*\b(?:normal|within normal limits|unremarkable)\b", re.I
)
_EXTRA = re.compile(
    r"xxxx|atelecta|degenerat|scolio|emphysem|hyperinfla|hyperexpan|edema|fractur|sternotomy|surgical|"
    r"\bclips?\b|catheter|\btubes?\b|pacemaker|\bwires?\b|hernia|kyphos|osteophyt|spondyl|tortuous|ectatic|"
    r"aort|scar|fibros|interstitial|copd|chronic|post ?-?operative|prior|previous|compar|unchanged|stable|"
    r"\bagain\b|interval|resol|improv|wors|increas|decreas|\bnew\b|redemonstrat|\bport\b|lobectomy|"
    r"thoracotomy|cabg|valve|stent|device|adenopath|lymph|bronch|cyst|cavit|tubercul|sarcoid|metasta|"
    r"cancer|malignan|thicken|eventration|elevat|volume loss|deformit|osteopen|arthrit|shoulder|"
    r"vertebra|\bribs?\b|congest|hilar|since|previously|follow|"
    r"recommend|correlat|ct\b|lateral view|\bpa\b|\bap\b|portable|limited|rotated|rotation|"
    r"overlying|artifact|nipple|breast|soft tissue|mediastin(?:al|um) (?:widen|shift)|shift|"
    r"hemidiaphragm|flatten|\bdr\.|telephone|discussed|notified|\d{1,2}:\d{2}|borderline|upper limits? of normal|"
    r"top normal|top-normal|low lung volume|low volume|hypoinflat|hypoexpan|poor inspiration|shallow|"
    r"\btb\b|hilum|\bhila\b|develop|history|above|below|\d+(?:\.\d+)?\s*(?:mm|cm)\b|^(?:this|these|findings|which)\b|"
    r"change|knee|joint|pericardi|pneumomediastin|hydropneumo|recur|residual|remain|otherwise|differential|"
    r"diagnosis|vascular (?:prominence|congestion|engorgement)|venous|hypertension|prominen|globular|"
    r"\bold\b|healed|sequela|granulomatous disease|versus|lordosis|spasm|\bother\b|atheroscl|superimpos|difficult|continu|lateral exam|\bhips?\b|^(?:may|however|also|and|but)\b|\bmay\b(?! represent)",
    re.I,
)
_NORMALISH = re.compile(
    r"\bnormal|\bclear\b|unremarkable|\bno acute|intact|negative|midline|well[- ]expanded|"
    r"\bno active|\bno evidence", re.I
)
_GLOBAL_NORMAL = re.compile(r"\bacute|normal chest|\bno active|negative|no evidence of (?:active )?disease", re.I)
_LUNGISH = re.compile(r"\blungs?\b|pulmonary|parenchym|air ?space|pleura|costophrenic", re.I)
_SIDE_WORDS = {
    "left": re.compile(r"\bleft\b|lingula", re.I),
    "right": re.compile(r"\bright\b", re.I),
    "bilateral": re.compile(r"bilateral|\bboth\b|bibasilar|bibasal", re.I),
}
_SIZE_WORDS = {
    "small": re.compile(r"\b(?:small|trace|tiny|minimal|mild|minimally|mildly|slight|slightly)\b", re.I),
    "moderate": re.compile(r"\bmoderate(?:ly)?\b", re.I),
    "large": re.compile(r"\b(?:large|massive|marked|markedly|severe|severely|complete|substantial|near 100)", re.I),
}
_ZONE_WORDS = {
    "upper": re.compile(r"upper|apex|apical", re.I),
    "mid": re.compile(r"middle|\bmid|lingula|perihilar", re.I),
    "lower": re.compile(r"lower|\bbases?\b|basilar|basal|retrocardiac|infrahilar", re.I),
}
# words that make a real sentence's positive mention uncertain
_HEDGE = re.compile(r"possibl|cannot (?:be )?exclud|not (?:be )?excluded|may represent|question|suspect|probabl|"
                    r"likely|suggest|concern|equivocal|could|borderline|\bvs\b", re.I)
_PLURAL_NODULE = re.compile(r"nodules|masses|granulomas|nodular densities|nodular opacities", re.I)


@dataclass
class _Sentence:
    text: str
    pos: frozenset
    neg: frozenset
    sides: frozenset
    sizes: frozenset
    zones: frozenset
    plural: bool
    kind: str  # "finding", "global", "lungs", "other"
    says_clear: bool = False  # "the lungs are clear ...": only for cases without lung findings


def _polarity(low: str, cue) -> tuple[frozenset, frozenset] | None:
    """The findings a sentence mentions positively and those it negates; None when the
    sentence mixes them in a way too easy to misread."""
    hits = {f: rx.search(low) for f, rx in _MENTION.items()}
    hits = {f: m for f, m in hits.items() if m}
    heart_normal = bool(_HEART_NORMAL.search(low)) and "cardiomegaly" not in hits
    pos: set[str] = set()
    neg: set[str] = set()
    if heart_normal:
        neg.add("cardiomegaly")
    if hits:
        first = min(m.start() for m in hits.values())
        last = max(m.start() for m in hits.values())
        if cue and cue.start() < first:
            # "No effusion; there is cardiomegaly": the negation does not reach that far
            if _SCOPE_BREAK.search(low, cue.end(), last):
                return None
            neg |= set(hits)
        elif cue:
            return None  # mixes a positive mention with a negation: too easy to misread
        else:
            pos |= set(hits)
            if len(hits) > 1 and re.search(r"\bor\b", low):
                return None  # "consolidation or effusion": a differential, not a finding
            if re.search(r"\bclear\b", low):
                return None  # "lungs are clear ..." next to a positive: garbled in the source
    if "calcif" in low and not ("nodule" in pos and len(pos) == 1):
        return None  # calcified granulomas are only usable as the nodule finding
    if pos & neg:
        return None
    return frozenset(pos), frozenset(neg)


def _kind(low: str, mentions: bool, cue) -> str | None:
    """What a sentence is about: "finding", "global", "lungs" or "other" (None: unusable)."""
    if mentions:
        return "finding"
    if not _NORMALISH.search(low):
        return None
    if re.search(r"abnormal|acute|disease|process|finding", low) and not cue:
        return None  # "Acute osseous abnormality." is not a normal sentence
    if _GLOBAL_NORMAL.search(low):
        return "global"
    if _LUNGISH.search(low):
        return "lungs"
    if re.search(r"heart|cardi", low):
        return None
    return "other"


def _classify(text: str) -> _Sentence | None:
    """Which findings a real report sentence mentions, and whether positively or negated.
    Returns None for sentences that are ambiguous or mention things the phantom lacks."""
    t = " ".join(text.split())
    if len(t) < 8 or len(t) > 220 or not t[0].isalpha():
        return None
    low = t.lower()
    if _EXTRA.search(low):
        return None
    cue = _NEG_CUE.search(low)
    polarity = _polarity(low, cue)
    if polarity is None:
        return None
    pos, neg = polarity
    kind = _kind(low, bool(pos or neg), cue)
    if kind is None:
        return None
    sides = frozenset(k for k, rx in _SIDE_WORDS.items() if rx.search(low))
    if not sides and "effusion" in pos and re.search(r"effusions", low):
        sides = frozenset({"bilateral"})
    sizes = frozenset(k for k, rx in _SIZE_WORDS.items() if rx.search(low))
    zones = frozenset(k for k, rx in _ZONE_WORDS.items() if rx.search(low))
    t = t[0].upper() + t[1:]
    if not t.endswith("."):
        t += "."
    says_clear = bool(re.search(r"\b(?:lungs?|pleural spaces?)\b[^.]*\bclear\b|\bclear lungs?\b", low))
    return _Sentence(t, pos, neg, sides, sizes, zones, bool(_PLURAL_NODULE.search(low)), kind, says_clear)


def _split_sentences(text: str) -> list[str]:
    text = " ".join(text.split())
    parts = re.split(r"(?<=[.!?])\s+(?=[A-Za-z0-9])", text)
    out = []
    for p in parts:
        p = re.sub(r"^\d+\s*[.)]\s*", "", p)
        p = re.sub(r"^[A-Za-z ]{2,24}:\s*", "", p)  # "Chest: ..."
        p = re.sub(r"\s+\d+\s*[.)]?$", ".", p)  # enumeration left at the end
        p = re.sub(r"\s*\.(?:\s*\.)+", ".", p).strip()
        if p:
            out.append(p)
    return out


def _side_ok(s: _Sentence, side: str) -> bool:
    if not s.sides:
        return True
    return s.sides == {side}


def _fits_effusion(s: _Sentence, p: dict) -> bool:
    return _side_ok(s, p["side"]) and (not s.sizes or s.sizes == {p["size"]})


def _fits_pneumothorax(s: _Sentence, p: dict) -> bool:
    if s.zones - {"upper"}:
        return False
    return _side_ok(s, p["side"]) and (not s.sizes or s.sizes == {p["size"]})


def _fits_consolidation(s: _Sentence, p: dict) -> bool:
    zone = {"upper": "upper", "middle": "mid", "lower": "lower"}[p["lobe"]]
    return _side_ok(s, p["side"]) and (not s.zones or s.zones == {zone}) and \
        not (s.sizes - {"small"} if p["subtle"] else set())


def _fits_cardiomegaly(s: _Sentence, p: dict) -> bool:
    want = {"mild": "small", "moderate": "moderate", "marked": "large"}[p["severity"]]
    return not s.sizes or s.sizes == {want}


def _fits_nodule(s: _Sentence, p: dict) -> bool:
    nods = p["nodules"]
    if s.plural != (len(nods) > 1):
        return False
    sides = {n["side"] for n in nods}
    want_side = next(iter(sides)) if len(sides) == 1 else "bilateral"
    zones = {_zone_of(n["v"]) for n in nods}
    big = max(n["diameter_mm"] for n in nods) >= 12
    return _side_ok(s, want_side) and (not s.zones or s.zones <= zones) and not s.sizes - {"small"} \
        and not (big and s.sizes)


# Per finding (the findings registry's names; a test checks they agree): does a sentence that
# positively mentions it describe the drawn parameters?
FITS: dict[str, Callable[[_Sentence, dict], bool]] = {
    "cardiomegaly": _fits_cardiomegaly, "effusion": _fits_effusion, "consolidation": _fits_consolidation,
    "pneumothorax": _fits_pneumothorax, "nodule": _fits_nodule,
}


def _fits_positive(s: _Sentence, f: str, p: dict) -> bool:
    """Does a sentence that positively mentions ``f`` describe the drawn ``p``?"""
    fits = FITS.get(f)
    return fits is not None and fits(s, p)


class SentenceBank:
    """Real report sentences, indexed by what they say about the five findings."""

    def __init__(self, reports: list[tuple[str, str]]):
        seen: set[tuple[str, str]] = set()
        self.sentences: dict[str, list[_Sentence]] = {"findings": [], "impression": []}
        for findings_text, impression_text in reports:
            for section, text in (("findings", findings_text), ("impression", impression_text)):
                for raw in _split_sentences(text or ""):
                    s = _classify(raw)
                    if s is None or (section, s.text.lower()) in seen:
                        continue
                    seen.add((section, s.text.lower()))
                    self.sentences[section].append(s)
        self.n_reports = len(reports)
        # pools by what a sentence says: ("pos", finding), ("neg", finding), ("kind", kind)
        self.index: dict[str, dict[tuple[str, str], list[_Sentence]]] = {}
        for section, items in self.sentences.items():
            idx: dict[tuple[str, str], list[_Sentence]] = {}
            for s in items:
                keys = [("pos", f) for f in s.pos] + [("neg", f) for f in s.neg] + [("kind", s.kind)]
                for k in keys:
                    idx.setdefault(k, []).append(s)
            self.index[section] = idx

    def __len__(self) -> int:
        return sum(len(v) for v in self.sentences.values())

    def _candidates(self, section: str, key: tuple[str, str], ok) -> list[_Sentence]:
        pool = [s for s in self.index[section].get(key, ()) if ok(s)]
        if not pool:
            other = "impression" if section == "findings" else "findings"
            pool = [s for s in self.index[other].get(key, ()) if ok(s)]
        return pool

    def _consistent(self, s: _Sentence, asserted: dict, shown: dict) -> bool:
        """Does ``s`` say only what the report asserts, and negate nothing it mentions?"""
        if not s.pos <= set(asserted) or s.neg & set(shown):
            return False
        if len(s.pos) > 1 and s.sides:
            return False
        return all(_fits_positive(s, f, asserted[f]) for f in s.pos)

    def sections(self, rng: np.random.Generator, intent: Intent, wide: bool) -> tuple[list[Tagged], list[Tagged]]:
        """Findings and impression sentences for ``intent`` from real sentences; a synthetic
        sentence stands in wherever no real one fits the case, and for hedged mentions."""
        draw = _Draw(self, rng)
        body = self._body(draw, intent, wide)
        present = list(intent.shown)
        if not present:
            s = draw.take("impression", ("kind", "global"))
            return body, [(s.text if s else _pick(rng, pool(IMPRESSION_NORMAL, IMPRESSION_NORMAL_WIDE, wide)), {})]
        order = [present[int(i)] for i in rng.permutation(len(present))]
        return body, self._positives(draw, intent, order, True, wide)

    def _positives(self, draw: "_Draw", intent: Intent, order: list[str], impression: bool,
                   wide: bool) -> list[Tagged]:
        rng, shown = draw.rng, intent.shown
        asserted = {f: p for f, p in shown.items() if f not in intent.hedge}
        section = "impression" if impression else "findings"
        out: list[Tagged] = []
        covered: set[str] = set()
        for f in order:
            if f in covered:
                continue
            if f in intent.hedge:
                out.append((hedged_sentence(rng, f, shown[f], impression), {f: HEDGED}))
                covered.add(f)
                continue
            s = draw.take(section, ("pos", f), lambda s: self._consistent(s, asserted, shown))
            if s:
                kind = HEDGED if _HEDGE.search(s.text) else POSITIVE
                out.append((s.text, {g: kind for g in s.pos}))
            else:
                text = positive_sentence(rng, f, shown[f], impression, wide)
                out.append((text, {f: HEDGED if shown[f]["subtle"] else POSITIVE}))
            covered |= s.pos if s else {f}
        return out

    def _body(self, draw: "_Draw", intent: Intent, wide: bool) -> list[Tagged]:
        rng, shown = draw.rng, intent.shown
        absent = set(FINDINGS) - set(shown)
        lung_free = not any(f in shown for f in LUNG_FINDINGS)
        body = self._positives(draw, intent, list(shown), False, wide)
        negated: set[str] = set()
        for f in sorted(absent, key=FINDINGS.index):
            if f in negated or rng.random() >= NEG_PROB[f]:
                continue
            s = draw.take("findings", ("neg", f), lambda s: s.neg <= absent and not s.pos
                          and (lung_free or not s.says_clear))
            if s:
                body.append((s.text, {g: NEGATED for g in s.neg}))
            else:
                body.append((_pick(rng, pool(NEGATIVE[f], NEGATIVE_WIDE[f], wide)), {f: NEGATED}))
            negated |= s.neg if s else {f}
        if lung_free and rng.random() < 0.7:
            s = draw.take("findings", ("kind", "lungs"))
            if s:
                body.append((s.text, {}))
        for _ in range(int(rng.integers(0, 3))):
            s = draw.take("findings", ("kind", "other"))
            if s:
                body.append((s.text, {}))
        if not body:
            body.append((_pick(rng, pool(LUNGS_CLEAR, LUNGS_CLEAR_WIDE, wide)) if lung_free
                         else "No acute osseous abnormality.", {}))
        return [body[int(i)] for i in rng.permutation(len(body))]


class _Draw:
    """Draws sentences from a bank for one report, never the same sentence twice."""

    def __init__(self, bank: SentenceBank, rng: np.random.Generator):
        self.bank, self.rng, self.used = bank, rng, set()

    def take(self, section: str, key: tuple[str, str], ok=lambda s: True) -> _Sentence | None:
        pool = [s for s in self.bank._candidates(section, key, ok) if s.text not in self.used]
        if not pool:
            return None
        s = pool[int(self.rng.integers(len(pool)))]
        self.used.add(s.text)
        return s


def _iu_archive() -> Path:
    """Path of NLMCXR_reports.tgz inside the installed torchxrayvision package (found
    without importing the package, which pulls in heavy dependencies)."""
    try:
        spec = importlib.util.find_spec("torchxrayvision")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(IU_MISSING)
    for loc in spec.submodule_search_locations:
        p = Path(loc) / "data" / "NLMCXR_reports.tgz"
        if p.is_file():
            return p
    raise ImportError(IU_MISSING + " (the installed package has no data/NLMCXR_reports.tgz)")


def read_iu_reports(archive: Path) -> list[tuple[str, str]]:
    """(findings, impression) text of every report in an NLMCXR-style archive of XML files."""
    out: list[tuple[str, str]] = []
    with tarfile.open(archive, "r:*") as tar:
        members = sorted((m for m in tar.getmembers() if m.isfile() and m.name.endswith(".xml")),
                         key=lambda m: m.name)
        for m in members:
            fh = tar.extractfile(m)
            if fh is None:
                continue
            try:
                root = ET.parse(io.BytesIO(fh.read())).getroot()
            except ET.ParseError:
                continue
            texts = {"FINDINGS": "", "IMPRESSION": ""}
            for node in root.iter("AbstractText"):
                label = (node.get("Label") or "").upper()
                if label in texts and node.text:
                    texts[label] = node.text.strip()
            if texts["FINDINGS"] or texts["IMPRESSION"]:
                out.append((texts["FINDINGS"], texts["IMPRESSION"]))
    return out


@lru_cache(maxsize=4)
def _bank_for(archive: str, mtime: float) -> SentenceBank:
    return SentenceBank(read_iu_reports(Path(archive)))


def load_iu_bank(archive: Path | None = None) -> SentenceBank:
    """Sentence bank built from the IU reports (from torchxrayvision unless ``archive``)."""
    path = Path(archive) if archive is not None else _iu_archive()
    bank = _bank_for(str(path), path.stat().st_mtime)
    if len(bank) == 0:
        raise ValueError(f"demo: no usable report sentences in {path}")
    return bank
