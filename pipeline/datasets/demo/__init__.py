"""Built-in demo dataset: phantom chest X-rays paired with radiology-style reports.

No real image-report pairs can ship with the project, so this package draws *phantom*
posteroanterior (PA) chest radiographs from a seed: lungs, heart, mediastinum, ribs,
clavicles, spine, diaphragm and soft tissue, with per-patient anatomy and per-study
positioning, exposure and noise. Five findings are painted on top, each with its own
visual signature and a ground-truth mask; the labels are what was painted. A report is
written from the same findings, and by default it disagrees with the labels the way real
reports do (see "Report noise" below).

Orientation follows a PA film read in the usual way: the patient's *left* is on the
viewer's *right* (image columns to the right of centre), so the heart bulges to the
image right and a "left pleural effusion" sits at the image's lower right.

Layout written by :func:`generate`::

    root/
      images/000000.png            8-bit grayscale, bright = dense
      masks/pneumothorax/000000.png  uint8 0/255, one per image (all zero when absent)
      masks/effusion/000000.png
      pairs.csv                    id, image, report, patient_id, split, <findings>, normal,
                                   mask_pneumothorax, mask_effusion
      mentions.csv                 id, <findings>: what each report says about each finding
                                   (positive, hedged, negated, or empty: not mentioned)
      demo.json                    spec, format version and the label-report agreement
                                   (written last)

Ids are zero-padded strings ("000123"): read pairs.csv with ``dtype={"id": str}``.

``reports="iu"`` draws the report sentences from the Indiana University chest X-ray
reports that ship inside the optional ``torchxrayvision`` package. They are licensed
CC BY-NC-ND 4.0 and are read from the installed package at run time; nothing of them is
copied into this repository.

Report noise (on by default; options of ``demo:...`` and fields of :class:`DemoSpec`):

- ``noise=1``: reports are noisy; ``noise=0``: every present finding is reported and
  nothing else is said about the five findings, so reports agree with the labels.
- ``omit=0.15``: chance that a present finding is left out of the report, as if missed
  (doubled for subtle findings); the report is written as the reader saw the study.
- ``uncertain=0.10``: chance that a clearly visible finding is reported with a hedge
  ("Cannot exclude ...", "may represent ..."); subtle findings are always hedged.
- ``spurious=0.05``: chance that an absent finding gets a hedged mention.
- With noise on, wordings come from a wider phrase bank (several per finding, negation
  and normal statement), and technique and comparison sentences appear now and then.

The noise is drawn from its own stream seeded by ``seed``; images and labels do not
depend on any of these options. ``demo.json`` records the measured agreement
("report_agreement": per finding, the share of positives the report mentions, hedges or
negates, and the share of negatives it mentions or negates); :func:`agreement_line`
prints it in one line, e.g. ``pipe data info demo`` shows it.

Modules: ``spec`` (the options), ``anatomy`` and ``raster`` (the normal chest),
``findings`` (the registry of findings: sampling and painting), ``canvas`` and ``render``
(one study), ``phrases`` (the phrase bank), ``reports`` (the report writer, its noise
model and the agreement measure), ``iu`` (the IU sentence bank), ``plan``
(patients, splits, findings per study) and ``generator`` (the files).
"""
from __future__ import annotations

from pipeline.datasets.demo.anatomy import PatientAnatomy, sample_patient
from pipeline.datasets.demo.findings import (CHRONIC, FINDINGS, KINDS, MASKED_FINDINGS, MM_PER_UNIT, PREVALENCE,
                                             Finding, sample_finding, sample_findings)
from pipeline.datasets.demo.generator import case_report, ensure_demo, generate, main, read_agreement
from pipeline.datasets.demo.iu import (IU_MISSING, SentenceBank, _split_sentences, load_iu_bank,
                                       read_iu_reports)
from pipeline.datasets.demo.plan import SPLITS, STUDIES_PER_PATIENT, Case, plan
from pipeline.datasets.demo.render import render_case
from pipeline.datasets.demo.reports import (Report, ReportNoise, agreement_line, compose_report, measure_agreement,
                                            write_report)
from pipeline.datasets.demo.spec import FORMAT_VERSION, DemoSpec, parse_spec

__all__ = [
    "CHRONIC", "FINDINGS", "FORMAT_VERSION", "IU_MISSING", "KINDS", "MASKED_FINDINGS", "MM_PER_UNIT",
    "PREVALENCE", "SPLITS", "STUDIES_PER_PATIENT", "Case", "DemoSpec", "Finding", "PatientAnatomy",
    "SentenceBank", "ensure_demo", "generate", "load_iu_bank", "main", "parse_spec", "plan",
    "read_iu_reports", "render_case", "sample_finding", "sample_findings", "sample_patient",
    "write_report", "_split_sentences", "Report", "ReportNoise", "agreement_line", "compose_report",
    "measure_agreement", "read_agreement", "case_report",
]
