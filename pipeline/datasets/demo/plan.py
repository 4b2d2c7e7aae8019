"""All random choices of a dataset except the pixels and the report wording: patients,
their anatomy, the patient-level splits and each study's findings."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from pipeline.datasets.demo.anatomy import PatientAnatomy, sample_patient
from pipeline.datasets.demo.findings import CHRONIC, FINDINGS, sample_findings
from pipeline.datasets.demo.spec import DemoSpec

SPLITS = (("train", 0.7), ("valid", 0.1), ("test", 0.2))
STUDIES_PER_PATIENT = ((1, 0.5), (2, 0.3), (3, 0.2))


@dataclass(frozen=True)
class Case:
    index: int
    id: str
    patient: int
    patient_id: str
    split: str
    findings: dict = field(hash=False, compare=False)


def _study_counts(rng: np.random.Generator, n: int) -> list[int]:
    counts, total = [], 0
    values = [c for c, _ in STUDIES_PER_PATIENT]
    probs = [p for _, p in STUDIES_PER_PATIENT]
    while total < n:
        c = min(int(values[int(rng.choice(len(values), p=probs))]), n - total)
        counts.append(c)
        total += c
    return counts


def _assign_splits(rng: np.random.Generator, n_patients: int) -> list[str]:
    order = rng.permutation(n_patients)
    if n_patients >= 3:
        n_valid = max(1, int(round(SPLITS[1][1] * n_patients)))
        n_test = max(1, int(round(SPLITS[2][1] * n_patients)))
        n_train = n_patients - n_valid - n_test
    else:
        n_train, n_valid, n_test = 1, 0, n_patients - 1
    labels = ["train"] * n_train + ["valid"] * n_valid + ["test"] * n_test
    out = [""] * n_patients
    for rank, p in enumerate(order):
        out[int(p)] = labels[rank]
    return out


def plan(spec: DemoSpec) -> tuple[list[Case], list[PatientAnatomy]]:
    """All random choices of a dataset except the pixels and the report wording:
    patients, their anatomy, splits and each study's findings. Independent of ``size``."""
    master = np.random.default_rng([spec.seed, 0])
    counts = _study_counts(master, spec.n)
    splits = _assign_splits(master, len(counts))
    cases: list[Case] = []
    patients: list[PatientAnatomy] = []
    i = 0
    for p, k in enumerate(counts):
        prng = np.random.default_rng([spec.seed, 1, p])
        patients.append(sample_patient(prng))
        chronic = sample_findings(prng, CHRONIC)
        for _ in range(k):
            frng = np.random.default_rng([spec.seed, 4, i])
            acute = sample_findings(frng, tuple(f for f in FINDINGS if f not in CHRONIC))
            found = {f: (chronic.get(f) or acute.get(f)) for f in FINDINGS if f in chronic or f in acute}
            cases.append(Case(i, f"{i:06d}", p, f"P{p:05d}", splits[p], found))
            i += 1
    return cases, patients
