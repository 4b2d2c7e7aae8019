"""The report writer: a 'FINDINGS: ... IMPRESSION: ...' report from a study's findings."""
from __future__ import annotations

import numpy as np

from pipeline.datasets.demo.findings import FINDINGS, _zone_of


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def _pick(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]


_LOBE_PHRASES = {
    ("right", "upper"): ("right upper lobe", "right upper zone", "right upper lung"),
    ("right", "middle"): ("right middle lobe",),
    ("right", "lower"): ("right lower lobe", "right lung base", "right base"),
    ("left", "upper"): ("left upper lobe", "left upper zone", "left upper lung"),
    ("left", "middle"): ("lingula", "lingular segment"),
    ("left", "lower"): ("left lower lobe", "left lung base", "left base"),
}
_ZONE_PHRASES = {
    "upper": ("{side} upper lung zone", "{side} upper lobe", "{side} upper lung"),
    "mid": ("{side} mid lung zone", "{side} midlung", "{side} mid lung"),
    "lower": ("{side} lung base", "{side} lower lobe", "{side} lower lung zone"),
}
_COUNT_WORDS = {2: "two", 3: "three", 4: "four"}


def _effusion_sentence(rng, p: dict, impression: bool) -> str:
    side, size = p["side"], p["size"]
    bil = side == "bilateral"
    eff = "pleural effusions" if bil else "pleural effusion"
    angle = "costophrenic angles" if bil else f"{side} costophrenic angle"
    if p["subtle"]:
        opts = [
            f"Possible small {side} {eff}.",
            f"Blunting of the {angle} may represent a small {eff}.",
            f"Trace {side} {eff} is suspected.",
            f"Minimal blunting of the {angle}, possibly a small {eff}.",
        ]
        if impression:
            opts = [f"Possible small {side} {eff}.", f"Probable trace {side} {eff}."]
        return _pick(rng, opts)
    article = "" if bil else "a "
    be = "are" if bil else "is"
    opts = [
        f"{_cap(size)} {side} {eff}.",
        f"There {be} {article}{size} {side} {eff}.",
        f"{_cap(size)} {side} {eff} with blunting of the {angle}.",
        f"Fluid layering at {'both bases' if bil else 'the ' + side + ' base'} consistent with {article}{size} {side} {eff}.",
    ]
    if size == "moderate":
        opts.append(f"{_cap(size)} {side} {eff} obscuring the {'hemidiaphragms' if bil else side + ' hemidiaphragm'}.")
    if size == "large":
        opts.append(f"Large {side} {eff} occupying the lower {'hemithoraces' if bil else side + ' hemithorax'}.")
    if impression:
        opts = [f"{_cap(size)} {side} {eff}.", f"{_cap(size)} {side} {eff}, layering at the {'bases' if bil else 'base'}."]
    return _pick(rng, opts)


def _pneumothorax_sentence(rng, p: dict, impression: bool) -> str:
    side, size = p["side"], p["size"]
    if p["subtle"]:
        opts = [
            f"Possible small {side} apical pneumothorax.",
            f"A tiny {side} apical pneumothorax cannot be excluded.",
            f"Questionable thin pleural line at the {side} apex, which may represent a small pneumothorax.",
        ]
        if impression:
            opts = [f"Possible small {side} apical pneumothorax.", f"Small {side} apical pneumothorax cannot be excluded."]
        return _pick(rng, opts)
    where = {"small": "apex", "moderate": "upper hemithorax", "large": "hemithorax"}[size]
    opts = [
        f"{_cap(size)} {side} pneumothorax.",
        f"There is a {size} {side} pneumothorax with a visible pleural line.",
        f"A visceral pleural line is seen in the {side} {where}, consistent with a {size} pneumothorax.",
    ]
    if size == "small":
        opts.append(f"Small {side} apical pneumothorax.")
    if size == "large":
        opts.append(f"Large {side} pneumothorax with partial collapse of the {side} lung.")
    if impression:
        opts = [f"{_cap(size)} {side} pneumothorax.", f"{_cap(size)} {side} pneumothorax; clinical correlation recommended."]
    return _pick(rng, opts)


def _consolidation_sentence(rng, p: dict, impression: bool) -> str:
    loc = _pick(rng, _LOBE_PHRASES[(p["side"], p["lobe"])])
    if p["subtle"]:
        opts = [
            f"Cannot exclude early consolidation in the {loc}.",
            f"Subtle patchy airspace opacity in the {loc}, possibly early pneumonia.",
            f"Questionable faint consolidation in the {loc}.",
        ]
        if impression:
            opts = [f"Cannot exclude early pneumonia in the {loc}.", f"Possible early consolidation in the {loc}."]
        return _pick(rng, opts)
    opts = [
        f"Patchy airspace consolidation in the {loc}.",
        f"Focal consolidation in the {loc}, consistent with pneumonia.",
        f"There is patchy airspace disease within the {loc}.",
        f"Airspace opacity in the {loc} concerning for pneumonia.",
        f"{_cap(loc)} consolidation.",
    ]
    if impression:
        opts = [f"{_cap(loc)} pneumonia.", f"{_cap(loc)} consolidation, likely pneumonia.",
                f"Consolidation in the {loc} compatible with pneumonia."]
    return _pick(rng, opts)


def _nodule_sentence(rng, p: dict, impression: bool) -> str:
    nods = p["nodules"]
    d = max(n["diameter_mm"] for n in nods)
    size = f"{d} mm" if d < 10 or rng.random() < 0.6 else f"{d / 10:.1f} cm"
    if len(nods) == 1:
        n = nods[0]
        loc = _pick(rng, _ZONE_PHRASES[_zone_of(n["v"])]).format(side=n["side"])
        if p["subtle"]:
            opts = [f"Possible small nodule in the {loc}.", f"Questionable {size} nodular density in the {loc}."]
            if impression:
                opts = [f"Possible {loc} nodule; consider CT for further evaluation."]
            return _pick(rng, opts)
        opts = [
            f"A {size} nodule in the {loc}.",
            f"There is a {size} pulmonary nodule projecting over the {loc}.",
            f"Rounded {size} nodular density in the {loc}.",
            f"{_cap(size)} well-circumscribed nodule in the {loc}.",
        ]
        if impression:
            opts = [f"{_cap(loc)} pulmonary nodule; CT recommended for further characterization.",
                    f"{size} {loc} nodule; recommend follow-up CT."]
        return _cap(_pick(rng, opts))
    sides = {n["side"] for n in nods}
    cw = _COUNT_WORDS[len(nods)]
    where = f"the {next(iter(sides))} lung" if len(sides) == 1 else "both lungs"
    if p["subtle"]:
        opts = [f"Possible {cw} small nodules in {where}.", f"Questionable small nodular densities in {where}."]
        if impression:
            opts = [f"Possible small pulmonary nodules in {where}; consider CT."]
        return _pick(rng, opts)
    opts = [
        f"{_cap(cw)} pulmonary nodules in {where}, the largest measuring {size}.",
        f"There are {cw} nodules in {where}, up to {size}.",
        f"Multiple ({cw}) rounded nodules in {where}, the largest {size}.",
    ]
    if impression:
        opts = [f"Pulmonary nodules in {where}, largest {size}; recommend follow-up CT.",
                f"{_cap(cw)} pulmonary nodules; CT recommended."]
    return _pick(rng, opts)


def _cardiomegaly_sentence(rng, p: dict, impression: bool) -> str:
    sev = p["severity"]
    if p["subtle"]:
        opts = ["Possible mild cardiomegaly.", "The cardiac silhouette appears mildly enlarged."]
        if impression:
            opts = ["Possible mild cardiomegaly."]
        return _pick(rng, opts)
    adv = {"mild": "mildly", "moderate": "moderately", "marked": "markedly"}[sev]
    adj = {"mild": "Mild", "moderate": "Moderate", "marked": _pick(rng, ("Marked", "Severe"))}[sev]
    opts = [
        f"{adj} cardiomegaly.",
        f"The heart is {adv} enlarged.",
        f"{adj} enlargement of the cardiac silhouette.",
        f"The cardiac silhouette is {adv} enlarged.",
        f"The heart is enlarged, with a cardiothoracic ratio of about {p['ctr']:.2f}.",
    ]
    if impression:
        opts = [f"{adj} cardiomegaly.", "Cardiomegaly.", f"{adj} cardiomegaly without pulmonary edema."]
    return _pick(rng, opts)


_POSITIVE = {
    "cardiomegaly": _cardiomegaly_sentence,
    "effusion": _effusion_sentence,
    "consolidation": _consolidation_sentence,
    "pneumothorax": _pneumothorax_sentence,
    "nodule": _nodule_sentence,
}
_NEGATIVE = {
    "cardiomegaly": ("Heart size is normal.", "The heart is normal in size.", "Normal heart size.",
                     "The cardiac silhouette is within normal limits.", "No cardiomegaly.",
                     "The cardiomediastinal silhouette is within normal limits."),
    "effusion": ("No pleural effusion.", "No effusion.", "There is no pleural effusion.",
                 "No pleural effusions are seen.", "The costophrenic angles are sharp."),
    "consolidation": ("No focal consolidation.", "No focal airspace consolidation.",
                      "There is no focal airspace disease.", "No consolidation."),
    "pneumothorax": ("No pneumothorax.", "There is no pneumothorax.", "No evidence of pneumothorax."),
    "nodule": ("No suspicious pulmonary nodules.", "No pulmonary nodules or masses.", "No focal nodule."),
}
_NEG_PROB = {"cardiomegaly": 0.75, "effusion": 0.85, "consolidation": 0.7, "pneumothorax": 0.85, "nodule": 0.3}
_NEG_PAIR = ("No pleural effusion or pneumothorax.", "No pneumothorax or pleural effusion.",
             "There is no pneumothorax or effusion.")
_BACKGROUND = ("The mediastinal contours are unremarkable.", "No acute osseous abnormality.",
               "The visualized osseous structures are intact.", "The trachea is midline.",
               "Pulmonary vascularity is within normal limits.")
_LUNGS_CLEAR = ("The lungs are clear.", "Lungs are clear bilaterally.", "The lungs are well expanded and clear.")
_OTHERWISE = "The lungs are otherwise clear."
_IMPRESSION_NORMAL = ("No acute cardiopulmonary abnormality.", "Normal chest radiograph.",
                      "No acute cardiopulmonary process.", "No active disease in the chest.")
_LUNG_FINDINGS = ("effusion", "consolidation", "pneumothorax", "nodule")


def _synthetic_sections(rng, findings: dict) -> tuple[list[str], list[str]]:
    present = [f for f in FINDINGS if f in findings]
    absent = [f for f in FINDINGS if f not in findings]
    positives = [_POSITIVE[f](rng, findings[f], False) for f in present]
    body: list[str] = list(positives)
    negs = set(absent)
    if "effusion" in negs and "pneumothorax" in negs and rng.random() < 0.4:
        body.append(_pick(rng, _NEG_PAIR))
        negs -= {"effusion", "pneumothorax"}
    for f in sorted(negs, key=FINDINGS.index):
        if rng.random() < _NEG_PROB[f]:
            body.append(_pick(rng, _NEGATIVE[f]))
    if not any(f in findings for f in _LUNG_FINDINGS) and rng.random() < 0.8:
        body.append(_pick(rng, _LUNGS_CLEAR))
    elif any(f in findings for f in ("consolidation", "nodule")) and "effusion" not in findings \
            and "pneumothorax" not in findings and rng.random() < 0.3:
        body.append(_OTHERWISE)
    for i in rng.permutation(len(_BACKGROUND))[: int(rng.integers(0, 3))]:
        body.append(_BACKGROUND[int(i)])
    order = rng.permutation(len(body))
    body = [body[int(i)] for i in order]
    if _OTHERWISE in body:  # "otherwise clear" reads only after the positive findings
        body.remove(_OTHERWISE)
        last = max(i for i, s in enumerate(body) if s in positives)
        body.insert(last + 1, _OTHERWISE)
    if not present:
        impression = [_pick(rng, _IMPRESSION_NORMAL)]
    else:
        order = [present[int(i)] for i in rng.permutation(len(present))]
        impression = [_POSITIVE[f](rng, findings[f], True) for f in order]
    return body, impression


def _join(body: list[str], impression: list[str], rng) -> str:
    if len(impression) > 1 and rng.random() < 0.5:
        imp = " ".join(f"{i + 1}. {s}" for i, s in enumerate(impression))
    else:
        imp = " ".join(impression)
    return f"FINDINGS: {' '.join(body)} IMPRESSION: {imp}"


def write_report(rng: np.random.Generator, findings: dict, bank=None) -> str:
    """Write a 'FINDINGS: ... IMPRESSION: ...' report that agrees with ``findings``.

    With a :class:`SentenceBank` (see :func:`load_iu_bank`), real report sentences are used
    wherever one fits the case; otherwise the synthetic templates are used.
    """
    if bank is not None:
        return bank.report(rng, findings)
    body, impression = _synthetic_sections(rng, findings)
    return _join(body, impression, rng)
