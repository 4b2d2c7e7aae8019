"""The report writer's phrase bank: every sentence it can write, as templates.

Each finding has :class:`Templates` for its positive sentences: the core wordings (all the
clean writer uses) and, under ``wide``, the paraphrases that the noise model adds. The
fields a template fills (side, size, lobe...) are built from the finding's parameters by
``fields_of``; the few wording choices among fields (which lobe name, mm or cm) are drawn
there too. Hedged mentions (uncertain positives, false mentions of absent findings) are a
wrapper ("Cannot exclude {a}.") around a finding's noun phrase and, optionally, the sign
that raised the doubt. :func:`all_sentences` enumerates the whole bank, which is how the
tests check that no zero-shot prompt copies a report sentence.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from string import Formatter
from typing import Callable, Iterator

import numpy as np

from pipeline.datasets.demo.findings import FINDINGS, _zone_of


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def _pick(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]


@dataclass(frozen=True)
class Templates:
    """Positive sentences of one finding; ``subtle`` ones are hedged by wording."""

    plain: tuple[str, ...]
    subtle: tuple[str, ...]
    plain_impression: tuple[str, ...]
    subtle_impression: tuple[str, ...]
    extra: dict = field(default_factory=dict)  # p["size"] -> more plain findings-section wordings
    wide: dict = field(default_factory=dict)  # branch -> paraphrases used when the noise model is on

    def options(self, branch: str, size: str | None, wide: bool) -> list[str]:
        opts = list(getattr(self, branch))
        if branch == "plain":
            opts += self.extra.get(size, ())
        if wide:
            opts += self.wide.get(branch, ())
        return opts

    def every(self, subtle: bool) -> Iterator[str]:
        """Every template of the subtle (hedged by wording) or the plain branches."""
        for branch in ("subtle", "subtle_impression") if subtle else ("plain", "plain_impression"):
            yield from getattr(self, branch)
            yield from self.wide.get(branch, ())
        if not subtle:
            for extra in self.extra.values():
                yield from extra


# --------------------------------------------------------------------------- positives

CARDIOMEGALY = Templates(
    plain=("{adj} cardiomegaly.", "The heart is {adv} enlarged.", "{adj} enlargement of the cardiac silhouette.",
           "The cardiac silhouette is {adv} enlarged.",
           "The heart is enlarged, with a cardiothoracic ratio of about {ctr}."),
    subtle=("Possible mild cardiomegaly.", "The cardiac silhouette appears mildly enlarged."),
    plain_impression=("{adj} cardiomegaly.", "Cardiomegaly.", "{adj} cardiomegaly without pulmonary edema."),
    subtle_impression=("Possible mild cardiomegaly.",),
    wide={
        "plain": ("Cardiac enlargement, {sev}.", "The heart size is {adv} increased.",
                  "{adj} enlargement of the heart.", "Enlarged heart, cardiothoracic ratio approximately {ctr}.",
                  "The cardiomediastinal silhouette is {adv} enlarged.",
                  "Cardiomegaly is present, {sev} in degree."),
        "subtle": ("Borderline cardiomegaly.", "The heart size is at the upper limit of normal to mildly enlarged."),
        "plain_impression": ("Cardiomegaly, {sev}.", "{adj} cardiac enlargement.", "Enlarged heart."),
        "subtle_impression": ("Borderline heart size, possibly mild cardiomegaly.",),
    },
)

EFFUSION = Templates(
    plain=("{Size} {side} {eff}.", "There {be} {article}{size} {side} {eff}.",
           "{Size} {side} {eff} with blunting of the {angle}.",
           "Fluid layering at {base_where} consistent with {article}{size} {side} {eff}."),
    subtle=("Possible small {side} {eff}.", "Blunting of the {angle} may represent {article}small {eff}.",
            "Trace {side} {eff} {be} suspected.", "Minimal blunting of the {angle}, possibly {article}small {eff}."),
    plain_impression=("{Size} {side} {eff}.", "{Size} {side} {eff}, layering at the {bases}."),
    subtle_impression=("Possible small {side} {eff}.", "Probable trace {side} {eff}."),
    extra={"moderate": ("{Size} {side} {eff} obscuring the {hemidiaphragm}.",),
           "large": ("Large {side} {eff} occupying the lower {hemithorax}.",)},
    wide={
        "plain": ("{Size} amount of {side} pleural fluid.", "{Size} {side} {eff} {be} present.",
                  "{Side} {eff}, {size}.", "Meniscus-shaped opacity at {base_where}, {article}{size} {side} {eff}.",
                  "{Side} pleural fluid of {size} volume."),
        "subtle": ("Slight blunting of the {angle}, which could reflect trace fluid.",
                   "Trace {side} pleural fluid is possible."),
        "plain_impression": ("{Side} {eff}, {size}.", "{Size} {side} pleural fluid."),
        "subtle_impression": ("Possible trace {side} pleural fluid.",),
    },
)

CONSOLIDATION = Templates(
    plain=("Patchy airspace consolidation in the {loc}.", "Focal consolidation in the {loc}, consistent with pneumonia.",
           "There is patchy airspace disease within the {loc}.", "Airspace opacity in the {loc} concerning for pneumonia.",
           "{Loc} consolidation."),
    subtle=("Cannot exclude early consolidation in the {loc}.",
            "Subtle patchy airspace opacity in the {loc}, possibly early pneumonia.",
            "Questionable faint consolidation in the {loc}."),
    plain_impression=("{Loc} pneumonia.", "{Loc} consolidation, likely pneumonia.",
                      "Consolidation in the {loc} compatible with pneumonia."),
    subtle_impression=("Cannot exclude early pneumonia in the {loc}.", "Possible early consolidation in the {loc}."),
    wide={
        "plain": ("Airspace opacity in the {loc} with air bronchograms.", "{Loc} opacification consistent with pneumonia.",
                  "Dense consolidation involving the {loc}.", "Infiltrate in the {loc}.",
                  "Confluent opacity in the {loc}, compatible with pneumonia."),
        "subtle": ("Faint hazy opacity in the {loc}, possibly early infection.",),
        "plain_impression": ("Pneumonia in the {loc}.", "{Loc} airspace disease, likely infectious."),
        "subtle_impression": ("Early infiltrate in the {loc} is not excluded.",),
    },
)

PNEUMOTHORAX = Templates(
    plain=("{Size} {side} pneumothorax.", "There is a {size} {side} pneumothorax with a visible pleural line.",
           "A visceral pleural line is seen in the {side} {where}, consistent with a {size} pneumothorax."),
    subtle=("Possible small {side} apical pneumothorax.", "A tiny {side} apical pneumothorax cannot be excluded.",
            "Questionable thin pleural line at the {side} apex, which may represent a small pneumothorax."),
    plain_impression=("{Size} {side} pneumothorax.", "{Size} {side} pneumothorax; clinical correlation recommended."),
    subtle_impression=("Possible small {side} apical pneumothorax.", "Small {side} apical pneumothorax cannot be excluded."),
    extra={"small": ("Small {side} apical pneumothorax.",),
           "large": ("Large {side} pneumothorax with partial collapse of the {side} lung.",)},
    wide={
        "plain": ("{Side}-sided pneumothorax, {size}.", "{Size} {side}-sided pneumothorax.",
                  "Pleural air on the {side}, a {size} pneumothorax.",
                  "{Side} pneumothorax of {size} size with a visible visceral pleural line.",
                  "There is a {side} pneumothorax, {size} in size.",
                  "Absent lung markings peripheral to a pleural line in the {side} {where}, a {size} pneumothorax."),
        "subtle": ("Possible thin apical pleural line on the {side}, suspicious for a tiny pneumothorax.",),
        "plain_impression": ("{Side} pneumothorax, {size}.", "{Size} {side}-sided pneumothorax."),
        "subtle_impression": ("Tiny {side} pneumothorax is possible.",),
    },
)

NODULE_ONE = Templates(
    plain=("A {size} nodule in the {loc}.", "There is a {size} pulmonary nodule projecting over the {loc}.",
           "Rounded {size} nodular density in the {loc}.", "{Size} well-circumscribed nodule in the {loc}."),
    subtle=("Possible small nodule in the {loc}.", "Questionable {size} nodular density in the {loc}."),
    plain_impression=("{Loc} pulmonary nodule; CT recommended for further characterization.",
                      "{size} {loc} nodule; recommend follow-up CT."),
    subtle_impression=("Possible {loc} nodule; consider CT for further evaluation.",),
    wide={
        "plain": ("Nodular opacity measuring {size} in the {loc}.", "A discrete {size} nodule is seen in the {loc}.",
                  "Nodule in the {loc}, measuring {size}.", "{Size} rounded opacity in the {loc}, likely a nodule."),
        "subtle": ("Possible faint nodular opacity in the {loc}.",),
        "plain_impression": ("{Loc} nodule measuring {size}; CT suggested.",
                             "Pulmonary nodule in the {loc}; CT recommended."),
        "subtle_impression": ("Questionable {loc} nodule; consider CT.",),
    },
)

NODULE_SEVERAL = Templates(
    plain=("{Cw} pulmonary nodules in {where}, the largest measuring {size}.",
           "There are {cw} nodules in {where}, up to {size}.",
           "Multiple ({cw}) rounded nodules in {where}, the largest {size}."),
    subtle=("Possible {cw} small nodules in {where}.", "Questionable small nodular densities in {where}."),
    plain_impression=("Pulmonary nodules in {where}, largest {size}; recommend follow-up CT.",
                      "{Cw} pulmonary nodules; CT recommended."),
    subtle_impression=("Possible small pulmonary nodules in {where}; consider CT.",),
    wide={
        "plain": ("Multiple pulmonary nodules in {where}, up to {size}.",
                  "{Cw} nodular opacities in {where}, the largest {size}.",
                  "Several nodules are seen in {where}, measuring up to {size}."),
        "subtle": ("Possible small nodular opacities in {where}.",),
        "plain_impression": ("Multiple pulmonary nodules in {where}; CT recommended.",),
        "subtle_impression": ("Questionable small nodules in {where}; consider CT.",),
    },
)

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
_SEVERITY_ADVERB = {"mild": "mildly", "moderate": "moderately", "marked": "markedly"}


# --------------------------------------------------------------------------- fields


def _cardiomegaly_fields(severity: str, adj: str, ctr: float) -> dict:
    return {"adj": adj, "adv": _SEVERITY_ADVERB[severity], "sev": adj.lower(), "ctr": f"{ctr:.2f}",
            "mild": "mild " if severity == "mild" else ""}


def _effusion_fields(side: str, size: str) -> dict:
    bil = side == "bilateral"
    return {
        "side": side, "Side": _cap(side), "size": size, "Size": _cap(size),
        "eff": "pleural effusions" if bil else "pleural effusion",
        "angle": "costophrenic angles" if bil else f"{side} costophrenic angle",
        "article": "" if bil else "a ", "be": "are" if bil else "is",
        "base_where": "both bases" if bil else f"the {side} base",
        "hemidiaphragm": "hemidiaphragms" if bil else f"{side} hemidiaphragm",
        "hemithorax": "hemithoraces" if bil else f"{side} hemithorax",
        "bases": "bases" if bil else "base", "small": "small " if size == "small" else "",
    }


def _consolidation_fields(loc: str) -> dict:
    return {"loc": loc, "Loc": _cap(loc)}


def _pneumothorax_fields(side: str, size: str) -> dict:
    return {"side": side, "Side": _cap(side), "size": size, "Size": _cap(size),
            "where": {"small": "apex", "moderate": "upper hemithorax", "large": "hemithorax"}[size],
            "small": "small " if size == "small" else "", "apical": "apical " if size == "small" else ""}


def _nodule_fields(size: str, small: bool, loc: str = "", cw: str = "", where: str = "") -> dict:
    return {"size": size, "Size": _cap(size), "small": "small " if small else "", "loc": loc, "Loc": _cap(loc),
            "cw": cw, "Cw": _cap(cw), "where": where}


def _nodule_size(d: int, in_mm: bool) -> str:
    return f"{d} mm" if in_mm else f"{d / 10:.1f} cm"


def _cardiomegaly_words(rng: np.random.Generator, p: dict) -> tuple[Templates, dict]:
    if p["subtle"]:
        return CARDIOMEGALY, _cardiomegaly_fields(p["severity"], "Mild", p["ctr"])
    marked = _pick(rng, ("Marked", "Severe"))
    adj = {"mild": "Mild", "moderate": "Moderate", "marked": marked}[p["severity"]]
    return CARDIOMEGALY, _cardiomegaly_fields(p["severity"], adj, p["ctr"])


def _nodule_words(rng: np.random.Generator, p: dict) -> tuple[Templates, dict]:
    nods = p["nodules"]
    d = max(n["diameter_mm"] for n in nods)
    size = _nodule_size(d, d < 10 or rng.random() < 0.6)
    if len(nods) == 1:
        loc = _pick(rng, _ZONE_PHRASES[_zone_of(nods[0]["v"])]).format(side=nods[0]["side"])
        return NODULE_ONE, _nodule_fields(size, d <= 15, loc=loc)
    sides = {n["side"] for n in nods}
    where = f"the {next(iter(sides))} lung" if len(sides) == 1 else "both lungs"
    return NODULE_SEVERAL, _nodule_fields(size, d <= 15, cw=_COUNT_WORDS[len(nods)], where=where)


def fields_of(rng: np.random.Generator, f: str, p: dict) -> tuple[Templates, dict]:
    """The templates and the fields of a present finding ``f`` (draws the wording choices)."""
    return _writer(f).words(rng, p)


def positive_sentence(rng: np.random.Generator, f: str, p: dict, impression: bool, wide: bool = False) -> str:
    """A sentence that reports the present finding ``f`` (hedged by wording when subtle)."""
    templates, fields = fields_of(rng, f, p)
    branch = ("subtle" if p["subtle"] else "plain") + ("_impression" if impression else "")
    return _cap(_pick(rng, templates.options(branch, p.get("size"), wide)).format(**fields))


def _every_cardiomegaly() -> Iterator[tuple[Templates, dict]]:
    adjs = {"mild": ("Mild",), "moderate": ("Moderate",), "marked": ("Marked", "Severe")}
    for sev, ctr in itertools.product(adjs, np.arange(0.53, 0.685, 0.01)):
        for adj in adjs[sev]:
            yield CARDIOMEGALY, _cardiomegaly_fields(sev, adj, float(ctr))


def _every_effusion() -> Iterator[tuple[Templates, dict]]:
    for side, size in itertools.product(("left", "right", "bilateral"), ("small", "moderate", "large")):
        yield EFFUSION, _effusion_fields(side, size)


def _every_pneumothorax() -> Iterator[tuple[Templates, dict]]:
    for side, size in itertools.product(("left", "right"), ("small", "moderate", "large")):
        yield PNEUMOTHORAX, _pneumothorax_fields(side, size)


def _every_consolidation() -> Iterator[tuple[Templates, dict]]:
    for loc in sorted({loc for locs in _LOBE_PHRASES.values() for loc in locs}):
        yield CONSOLIDATION, _consolidation_fields(loc)


def _every_nodule() -> Iterator[tuple[Templates, dict]]:
    sizes = [(_nodule_size(d, mm), d <= 15) for d in range(12, 29) for mm in (True, False)]
    locs = {z.format(side=s) for zs in _ZONE_PHRASES.values() for z in zs for s in ("left", "right")}
    wheres = ("the left lung", "the right lung", "both lungs")
    for (size, small), loc in itertools.product(sizes, sorted(locs)):
        yield NODULE_ONE, _nodule_fields(size, small, loc=loc)
    for (size, small), cw, where in itertools.product(sizes, _COUNT_WORDS.values(), wheres):
        yield NODULE_SEVERAL, _nodule_fields(size, small, cw=cw, where=where)


@dataclass(frozen=True)
class Writer:
    """How the report writer words one finding of :data:`~pipeline.datasets.demo.findings.KINDS`."""

    words: Callable[[np.random.Generator, dict], tuple[Templates, dict]]   # a drawn finding's wording
    every: Callable[[], Iterator[tuple[Templates, dict]]]                  # every wording it can build


# One entry per finding (the findings registry's names; a test checks they agree).
WRITERS: dict[str, Writer] = {
    "cardiomegaly": Writer(_cardiomegaly_words, _every_cardiomegaly),
    "effusion": Writer(lambda rng, p: (EFFUSION, _effusion_fields(p["side"], p["size"])), _every_effusion),
    "consolidation": Writer(lambda rng, p: (CONSOLIDATION, _consolidation_fields(
        _pick(rng, _LOBE_PHRASES[(p["side"], p["lobe"])]))), _every_consolidation),
    "pneumothorax": Writer(lambda rng, p: (PNEUMOTHORAX, _pneumothorax_fields(p["side"], p["size"])),
                           _every_pneumothorax),
    "nodule": Writer(_nodule_words, _every_nodule),
}


def _writer(f: str) -> Writer:
    try:
        return WRITERS[f]
    except KeyError:
        raise KeyError(f"unknown finding {f!r}") from None


def _all_fields(f: str) -> Iterator[tuple[Templates, dict]]:
    """Every (templates, fields) the writer can build for ``f``."""
    return _writer(f).every()


# --------------------------------------------------------------------------- hedged mentions

# (with article, without) noun phrases of each finding, naming where it is
HEDGE_NOUNS = {
    "cardiomegaly": (("{mild}cardiomegaly", "{mild}cardiomegaly"), ("cardiac enlargement", "cardiac enlargement"),
                     ("an enlarged heart", "enlarged heart")),
    "effusion": (("{article}{small}{side} {eff}", "{small}{side} {eff}"), ("{side} pleural fluid", "{side} pleural fluid")),
    "consolidation": (("early consolidation in the {loc}", "early consolidation in the {loc}"),
                      ("pneumonia in the {loc}", "pneumonia in the {loc}"),
                      ("airspace disease in the {loc}", "airspace disease in the {loc}"),
                      ("an infiltrate in the {loc}", "infiltrate in the {loc}")),
    "pneumothorax": (("a {small}{side} {apical}pneumothorax", "{small}{side} {apical}pneumothorax"),
                     ("a {side}-sided pneumothorax", "{side}-sided pneumothorax")),
    "nodule": (("a {small}nodule in the {loc}", "{small}nodule in the {loc}"),
               ("a {small}pulmonary nodule in the {loc}", "{small}pulmonary nodule in the {loc}")),
    "nodules": (("{small}nodules in {where}", "{small}nodules in {where}"),
                ("{small}pulmonary nodules in {where}", "{small}pulmonary nodules in {where}")),
}
# the sign that raised the doubt (it names the place), and what it may be (it does not)
HEDGE_SIGNS = {
    "cardiomegaly": ("The cardiac silhouette is prominent", "Prominence of the cardiac silhouette",
                     "Prominent cardiac contour"),
    "effusion": ("Blunting of the {angle}", "Slight blunting of the {angle}", "Haziness at {base_where}",
                 "Obscuration of the {angle}"),
    "consolidation": ("Subtle increased opacity in the {loc}", "Hazy opacity in the {loc}",
                      "Ill-defined density in the {loc}", "Streaky opacity in the {loc}"),
    "pneumothorax": ("A thin pleural line at the {side} apex", "Subtle lucency at the {side} apex",
                     "A faint line over the {side} upper hemithorax"),
    "nodule": ("A rounded density in the {loc}", "A nodular opacity projecting over the {loc}",
               "A focal rounded opacity in the {loc}"),
    "nodules": ("Several rounded densities in {where}", "Scattered nodular opacities in {where}"),
}
HEDGE_SHORT = {
    "cardiomegaly": ("{mild}cardiomegaly", "cardiac enlargement"),
    "effusion": ("{article}{small}{eff}", "pleural fluid"),
    "consolidation": ("early consolidation", "pneumonia", "an infiltrate", "airspace disease"),
    "pneumothorax": ("a {small}pneumothorax", "a pneumothorax"),
    "nodule": ("a {small}nodule", "a pulmonary nodule"),
    "nodules": ("{small}nodules", "pulmonary nodules"),
}
HEDGE_FINDINGS = ("Cannot exclude {a}.", "{A} cannot be excluded.", "Possible {bare}.", "Questionable {bare}.",
                  "{Sign}, which may represent {short}.", "{Sign} may represent {short}.",
                  "{Sign}; {short} {short_is} not excluded.", "{Sign}, possibly {short}.", "{Sign}, suspicious for {short}.")
HEDGE_IMPRESSION = ("Possible {bare}.", "Cannot exclude {a}.", "{A} {a_is} not excluded.",
                    "Questionable {bare}; clinical correlation recommended.")


def _hedge_key(f: str, templates: Templates) -> str:
    return "nodules" if templates is NODULE_SEVERAL else f


def _is(noun: str) -> str:
    return "are" if noun.endswith(("effusions", "nodules")) else "is"


def _hedge_fill(template: str, noun: tuple[str, str], short: str, sign: str) -> str:
    a, bare = noun
    return _cap(template.format(a=a, A=_cap(a), a_is=_is(a), bare=bare, short=short, short_is=_is(short),
                                Sign=_cap(sign)))


def hedged_sentence(rng: np.random.Generator, f: str, p: dict, impression: bool) -> str:
    """An uncertain mention of ``f`` with the parameters ``p`` ("Cannot exclude ...")."""
    templates, fields = fields_of(rng, f, p)
    key = _hedge_key(f, templates)
    template = _pick(rng, HEDGE_IMPRESSION if impression else HEDGE_FINDINGS)
    noun = tuple(n.format(**fields) for n in _pick(rng, HEDGE_NOUNS[key]))
    short = _pick(rng, HEDGE_SHORT[key]).format(**fields)
    sign = _pick(rng, HEDGE_SIGNS[key]).format(**fields)
    return _hedge_fill(template, noun, short, sign)


def _all_hedged(key: str, fields_list: list[dict]) -> set[str]:
    nouns = {tuple(n.format(**fl) for n in noun) for fl in fields_list for noun in HEDGE_NOUNS[key]}
    signed = {(short.format(**fl), sign.format(**fl)) for fl in fields_list
              for short in HEDGE_SHORT[key] for sign in HEDGE_SIGNS[key]}
    out = set()
    for t in HEDGE_FINDINGS + HEDGE_IMPRESSION:
        combos = [(noun, "", "") for noun in nouns] if "{Sign}" not in t else [(("", ""), sh, si) for sh, si in signed]
        out |= {_hedge_fill(t, noun, short, sign) for noun, short, sign in combos}
    return out


# --------------------------------------------------------------------------- negations and the rest

NEGATIVE = {
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
NEGATIVE_WIDE = {
    "cardiomegaly": ("Heart size within normal limits.", "The cardiac size is normal.",
                     "The cardiac silhouette is not enlarged.", "Normal cardiomediastinal contours."),
    "effusion": ("No pleural fluid.", "Costophrenic angles are clear.", "No evidence of pleural effusion.",
                 "The pleural spaces are clear."),
    "consolidation": ("No airspace opacity.", "No focal opacity to suggest pneumonia.", "No evidence of pneumonia.",
                      "Lungs without focal consolidation."),
    "pneumothorax": ("No pneumothorax is seen.", "No pleural air.", "No evidence of a pneumothorax.",
                     "Pneumothorax is not seen."),
    "nodule": ("No nodules.", "No suspicious nodules or masses.", "No focal pulmonary mass or nodule.",
               "No discrete nodule."),
}
NEG_PROB = {"cardiomegaly": 0.75, "effusion": 0.85, "consolidation": 0.7, "pneumothorax": 0.85, "nodule": 0.3}
NEG_PAIR = ("No pleural effusion or pneumothorax.", "No pneumothorax or pleural effusion.",
            "There is no pneumothorax or effusion.")
NEG_PAIR_WIDE = ("No effusion or pneumothorax.", "No pneumothorax or pleural fluid.")
BACKGROUND = ("The mediastinal contours are unremarkable.", "No acute osseous abnormality.",
              "The visualized osseous structures are intact.", "The trachea is midline.",
              "Pulmonary vascularity is within normal limits.")
BACKGROUND_WIDE = ("Bony structures are unremarkable.", "The soft tissues are unremarkable.",
                   "No free air under the diaphragm.", "The hila are normal in size.")
LUNGS_CLEAR = ("The lungs are clear.", "Lungs are clear bilaterally.", "The lungs are well expanded and clear.")
LUNGS_CLEAR_WIDE = ("Clear lungs.", "The lungs are well aerated and clear.")
OTHERWISE = "The lungs are otherwise clear."
IMPRESSION_NORMAL = ("No acute cardiopulmonary abnormality.", "Normal chest radiograph.",
                     "No acute cardiopulmonary process.", "No active disease in the chest.")
IMPRESSION_NORMAL_WIDE = ("No acute abnormality in the chest.", "Unremarkable chest radiograph.",
                          "No radiographic evidence of acute disease.")
TECHNIQUE = ("PA and lateral views of the chest were obtained.", "Single frontal view of the chest.",
             "Frontal and lateral chest radiographs.", "PA view of the chest.")
COMPARISON = ("No prior studies for comparison.", "No previous examinations are available for comparison.",
              "Comparison is made with no prior imaging.")
LUNG_FINDINGS = ("effusion", "consolidation", "pneumothorax", "nodule")


def pool(core: tuple[str, ...], wide_extra: tuple[str, ...], wide: bool) -> tuple[str, ...]:
    return core + wide_extra if wide else core


def _expand(template: str, fields_list: list[dict]) -> set[str]:
    names = {n for _, n, _, _ in Formatter().parse(template) if n}
    out = set()
    seen = set()
    for fields in fields_list:
        key = tuple(fields.get(n) for n in sorted(names))
        if key not in seen:
            seen.add(key)
            out.add(_cap(template.format(**fields)))
    return out


def finding_sentences(f: str) -> dict[str, set[str]]:
    """Every sentence the writer can use for ``f``: {"positive", "hedged", "negative"}
    ("hedged": the wordings of subtle findings and the hedged mentions)."""
    by_templates: dict[int, tuple[Templates, list[dict]]] = {}
    for templates, fields in _all_fields(f):
        by_templates.setdefault(id(templates), (templates, []))[1].append(fields)
    positive: set[str] = set()
    hedged: set[str] = set()
    for templates, fields_list in by_templates.values():
        for template in set(templates.every(subtle=False)):
            positive |= _expand(template, fields_list)
        for template in set(templates.every(subtle=True)):
            hedged |= _expand(template, fields_list)
        hedged |= _all_hedged(_hedge_key(f, templates), fields_list)
    negative = set(NEGATIVE[f] + NEGATIVE_WIDE[f])
    if f in ("effusion", "pneumothorax"):
        negative |= set(NEG_PAIR + NEG_PAIR_WIDE)
    return {"positive": positive, "hedged": hedged, "negative": negative}


def all_sentences() -> set[str]:
    """Every sentence the report writer can emit (all findings, negations, the rest)."""
    out: set[str] = set()
    for f in FINDINGS:
        for sentences in finding_sentences(f).values():
            out |= sentences
    for group in (BACKGROUND, BACKGROUND_WIDE, LUNGS_CLEAR, LUNGS_CLEAR_WIDE, (OTHERWISE,), IMPRESSION_NORMAL,
                  IMPRESSION_NORMAL_WIDE, TECHNIQUE, COMPARISON):
        out |= set(group)
    return out
