"""The demo's report noise, the label-report agreement it measures, and the zero-shot
prompts' independence from the report writer's phrase bank."""
from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from pipeline.datasets import demo
from pipeline.datasets.demo import FINDINGS, DemoSpec, ReportNoise, generate, parse_spec
from pipeline.datasets.demo import phrases

PROMPTS = Path(__file__).resolve().parents[1] / "configs" / "prompts" / "chest_xray.yaml"
HEDGE_CUE = re.compile(r"possibl|cannot (?:be )?exclud|not excluded|may represent|questionable|suspect|"
                       r"probable|could reflect|borderline|suspicious for|upper limit of normal|appears", re.I)


def reports(spec: DemoSpec, bank=None) -> tuple[list, list]:
    """(findings, Report) of every study of ``spec``, as the generator writes them."""
    cases, _ = demo.plan(spec)
    return [c.findings for c in cases], [demo.case_report(spec, c, bank) for c in cases]


def agreement(spec: DemoSpec) -> dict:
    findings, reps = reports(spec)
    labels = [{f: int(f in fs) for f in FINDINGS} for fs in findings]
    return demo.measure_agreement(labels, [r.mentions for r in reps])


@pytest.fixture(scope="module")
def bank_sentences() -> dict[str, dict[str, set[str]]]:
    return {f: phrases.finding_sentences(f) for f in FINDINGS}


@pytest.fixture(scope="module")
def noisy(tmp_path_factory) -> tuple[Path, pd.DataFrame, pd.DataFrame]:
    root = tmp_path_factory.mktemp("noisy") / "demo"
    df = pd.read_csv(generate(root, DemoSpec(n=300, size=32, seed=21)), dtype={"id": str})
    mentions = pd.read_csv(root / "mentions.csv", dtype={"id": str}, keep_default_na=False)
    return root, df, mentions


# --------------------------------------------------------------------------- options


def test_noise_is_on_by_default_and_parsed():
    assert DemoSpec().noise == 1 and parse_spec("").report_noise() == ReportNoise()
    assert parse_spec("noise=0").report_noise() is None
    assert parse_spec("noise=off,n=10").noise == 0
    spec = parse_spec("omit=0.2&uncertain=0.3,spurious=0")
    assert spec.report_noise() == ReportNoise(omit=0.2, uncertain=0.3, spurious=0.0)
    slugs = {s.slug() for s in (DemoSpec(), parse_spec("noise=0"), spec, parse_spec("omit=0.25"))}
    assert len(slugs) == 4  # the folder changes whenever the reports would
    with pytest.raises(ValueError, match="noise=.2.: expected 0 or 1"):
        parse_spec("noise=2")
    with pytest.raises(ValueError, match="omit is a probability"):
        parse_spec("omit=1.5")


def test_noise_is_seeded(noisy, tmp_path):
    root, df, _ = noisy
    again = pd.read_csv(generate(tmp_path / "again", DemoSpec(n=300, size=32, seed=21), workers=1),
                        dtype={"id": str})
    assert (again["report"] == df["report"]).all()
    assert (pd.read_csv(tmp_path / "again" / "mentions.csv", dtype=str).fillna("")
            == pd.read_csv(root / "mentions.csv", dtype=str).fillna("")).all().all()
    other = [r.text for r in reports(DemoSpec(n=300, seed=22))[1]]
    assert sum(a != b for a, b in zip(other, df["report"])) > 250
    # images and labels do not depend on the report options
    _, clean = reports(DemoSpec(n=300, seed=21, noise=0))
    assert sum(c.text != r for c, r in zip(clean, df["report"])) > 250
    assert demo.plan(DemoSpec(n=300, seed=21))[0] == demo.plan(DemoSpec(n=300, seed=21, noise=0))[0]


# --------------------------------------------------------------------------- agreement


def test_agreement_between_sensible_bounds():
    a = agreement(DemoSpec(n=1500, seed=5))
    assert 0.6 <= a["mentioned"]["all"] <= 0.95
    for f in FINDINGS:
        assert 0.5 <= a["mentioned"][f] <= 0.98, (f, a["mentioned"][f])
        assert a["false_mention"][f] <= 0.15, f
    assert 0.01 <= a["false_mention"]["all"] <= 0.12
    assert 0.1 <= a["hedged"]["all"] <= 0.4
    assert 0.0 < a["contradicted"]["all"] < 0.2  # a missed finding may even be called absent
    assert a["positives"]["all"] + a["negatives"]["all"] == 1500 * len(FINDINGS)

    clean = agreement(DemoSpec(n=1500, seed=5, noise=0))
    assert clean["mentioned"]["all"] == 1.0 and clean["false_mention"]["all"] == 0.0
    assert clean["contradicted"]["all"] == 0.0

    more = agreement(DemoSpec(n=1500, seed=5, omit=0.4, spurious=0.15))
    assert more["mentioned"]["all"] < a["mentioned"]["all"] - 0.15
    assert more["false_mention"]["all"] > a["false_mention"]["all"] + 0.05


def test_agreement_is_written_and_printable(noisy):
    root, df, mentions = noisy
    meta = json.loads((root / "demo.json").read_text())
    labels = df[list(FINDINGS)].to_dict("records")
    assert meta["report_agreement"] == demo.measure_agreement(labels, mentions.to_dict("records"))
    assert demo.read_agreement(root) == meta["report_agreement"]
    line = demo.agreement_line(meta["report_agreement"])
    assert re.match(r"reports mention \d+% of findings \(cardiomegaly \d+%, effusion \d+%, consolidation \d+%, "
                    r"pneumothorax \d+%, nodule \d+%\); \d+% only hedged, \d+% negated; \d+% of absent findings "
                    r"get a false mention$", line), line

    from pipeline.datasets import open_dataset

    ds = open_dataset("demo?n=40&size=32", root.parent / "cache")
    assert "reports mention" in ds.description


def test_omitted_findings_keep_their_positive_label(noisy):
    root, df, mentions = noisy
    missed = 0
    for (_, row), (_, said) in zip(df.iterrows(), mentions.iterrows()):
        for f in FINDINGS:
            if row[f] and said[f] in ("", "negated"):
                missed += 1
                if f in demo.MASKED_FINDINGS:  # the finding is still painted
                    assert np.asarray(Image.open(root / row[f"mask_{f}"])).any(), (row["id"], f)
    assert missed >= 15
    cases, _ = demo.plan(DemoSpec(n=300, seed=21))
    for case, (_, row) in zip(cases, df.iterrows()):
        assert all(row[f] == int(f in case.findings) for f in FINDINGS)  # labels = what was painted


def test_hedged_mentions_of_present_and_absent_findings(noisy):
    _, df, mentions = noisy
    hedged_pos = hedged_neg = 0
    for (_, row), (_, said) in zip(df.iterrows(), mentions.iterrows()):
        for f in FINDINGS:
            if said[f] == "hedged":
                assert HEDGE_CUE.search(row["report"]), (f, row["report"])
                hedged_pos += bool(row[f])
                hedged_neg += not row[f]
            if said[f] == "positive":
                assert row[f] == 1  # absent findings are only ever mentioned with a hedge
    assert hedged_pos >= 10 and hedged_neg >= 10


def test_recorded_mentions_match_the_text(noisy, bank_sentences):
    """What the writer records is what a matcher over its own vocabulary finds."""
    _, df, mentions = noisy
    for (_, row), (_, said) in zip(df.iterrows(), mentions.iterrows()):
        text = " " + row["report"]
        for f in FINDINGS:
            found = {kind for kind, pool in bank_sentences[f].items() if any(f" {s}" in text for s in pool)}
            found = {"positive" if k == "positive" else "hedged" if k == "hedged" else "negated" for k in found}
            if said[f] == "":
                assert not found, (f, found, row["report"])
            else:
                assert said[f] in found, (f, said[f], found, row["report"])


def test_reports_with_noise_keep_laterality():
    rng = np.random.default_rng(3)
    loud = ReportNoise(omit=0.0, uncertain=1.0, spurious=0.0)
    for side in ("left", "right"):
        for noise in (ReportNoise(omit=0.0, uncertain=0.0, spurious=0.0), loud):
            for _ in range(20):
                r = demo.compose_report(rng, {"pneumothorax": {"side": side, "size": "large", "subtle": False}},
                                        noise=noise)
                other = {"left", "right"} - {side}
                assert re.search(rf"\b{side}\b", r.text.lower()) and not re.search(rf"\b{other.pop()}\b", r.text.lower())
                assert r.mentions["pneumothorax"] == ("hedged" if noise is loud else "positive")


# --------------------------------------------------------------------------- phrase bank


def test_phrase_bank_is_wide(bank_sentences):
    rng = np.random.default_rng(0)
    params = {"cardiomegaly": {"severity": "moderate", "ctr": 0.6, "subtle": False},
              "effusion": {"side": "left", "size": "moderate", "subtle": False},
              "consolidation": {"side": "right", "lobe": "lower", "density": 0.7, "extent": 1.0, "subtle": False},
              "pneumothorax": {"side": "right", "size": "moderate", "subtle": False},
              "nodule": {"nodules": [{"side": "left", "u": 0.5, "v": 0.3, "diameter_mm": 20}], "subtle": False}}
    for f, p in params.items():
        plain = {phrases.positive_sentence(rng, f, p, False, wide=False) for _ in range(300)}
        wide = {phrases.positive_sentence(rng, f, p, False, wide=True) for _ in range(600)}
        hedged = {phrases.hedged_sentence(rng, f, p, False) for _ in range(600)}
        assert len(wide) >= 8 and len(wide) > len(plain) + 2, (f, len(plain), len(wide))
        assert len(hedged) >= 15, (f, len(hedged))
        assert len(bank_sentences[f]["negative"]) >= 7, f
        assert len(bank_sentences[f]["positive"]) >= 50, f
        assert wide <= bank_sentences[f]["positive"] and hedged <= bank_sentences[f]["hedged"], f


def test_phrase_bank_agrees_in_number():
    """Plural findings (bilateral effusions, several nodules) never get a singular verb or article."""
    bad = re.compile(r"\b(?:effusions|nodules) (?:is|was)\b|\ban? (?:\w+ ){0,3}(?:effusions|nodules)\b")
    assert not [s for s in phrases.all_sentences() if bad.search(s)]


# --------------------------------------------------------------------------- zero-shot prompts


def _norm(s: str) -> str:
    return " ".join(re.sub(r"[^a-z0-9 ]+", " ", s.lower()).split())


def _prompts() -> list[tuple[str, str, str]]:
    data = yaml.safe_load(PROMPTS.read_text())
    return [(f, kind, p) for f, entry in data.items() for kind, ps in entry.items() for p in ps]


def _overlaps(prompt: str, sentences: list[tuple[str, str, set]]) -> list[str]:
    """Sentences that contain the prompt, are contained in it, or share most of its words."""
    q = _norm(prompt)
    words = set(q.split())
    return [s for s, n, sw in sentences
            if f" {q} " in f" {n} " or f" {n} " in f" {q} " or len(words & sw) / len(words | sw) >= 0.7]


def _normalised(sentences) -> list[tuple[str, str, set]]:
    out = []
    for s in sentences:
        n = _norm(s)
        out.append((s, n, set(n.split())))
    return out


def test_prompts_are_not_report_sentences():
    """No zero-shot prompt is (a trivial variant of) a sentence the report writer can emit."""
    sentences = _normalised(phrases.all_sentences())
    assert len(sentences) > 2000
    prompts = _prompts()
    assert {f for f, _, _ in prompts} == set(FINDINGS)
    for f, kind, p in prompts:
        assert not _overlaps(p, sentences), (f, kind, p, _overlaps(p, sentences)[:3])
    assert len({_norm(p) for _, _, p in prompts}) == len(prompts)


@pytest.mark.skipif(importlib.util.find_spec("torchxrayvision") is None, reason="needs the IU reports")
def test_prompts_are_not_iu_sentences():
    bank = demo.load_iu_bank()
    sentences = _normalised({s.text for items in bank.sentences.values() for s in items})
    for f, kind, p in _prompts():
        assert not _overlaps(p, sentences), (f, kind, p, _overlaps(p, sentences)[:3])


def test_every_finding_has_its_report_wording_and_sentence_check():
    """The report writers' per-finding entries cover exactly the findings registry."""
    from pipeline.datasets.demo import KINDS
    from pipeline.datasets.demo.iu import FITS
    from pipeline.datasets.demo.phrases import WRITERS

    names = [k.name for k in KINDS]
    assert sorted(WRITERS) == sorted(names) and sorted(FITS) == sorted(names)
    for name, writer in WRITERS.items():
        wordings = list(writer.every())
        assert wordings, name
        for templates, fields in wordings[:5]:   # every field a template names is filled
            for branch in ("plain", "subtle", "plain_impression", "subtle_impression"):
                for t in templates.options(branch, fields.get("size"), True):
                    t.format(**fields)
