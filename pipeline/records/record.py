"""The typed records of one evaluation run: what ``results.json`` holds, as Python objects.

:class:`EvalRecord` is the whole file: the run (task, dataset, encoders, config and its
hash), the checkpoint it evaluated (:class:`CheckpointInfo`), its methods
(:class:`MethodResult`, whose head tasks keep a :class:`HeadCell` per head kind and label
fraction), its tables (:class:`pipeline.tables.Table`), the data card (:class:`DataCard`)
and the provenance (:class:`Provenance`). ``to_dict`` gives the file's JSON data and
``from_dict`` reads it back; :func:`pipeline.records.load_results` reads a run of any
format. The fields are described in docs/reference/results-format.md.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.methods import Method
from pipeline.tables import Figure, Table

RESULTS_FORMAT = 2   # 1: before the records (no "format" key); 2: methods and tables carry their identity


@dataclass(frozen=True)
class HeadCell:
    """A head task's figures for one head kind at one label fraction: every seed's run and their summary."""

    fraction: float | None          # None only in a file that says neither the fraction nor its config's fractions
    summary: dict[str, Figure]      # per metric: mean ± std over the seeds, and the interval
    runs: list[dict]                # per seed: seed, n_train, the chosen learning rate and epoch, test figures, sweep

    @property
    def seeds(self) -> list[int]:
        return [int(r["seed"]) for r in self.runs]

    def to_dict(self) -> dict:
        return {"fraction": self.fraction, "runs": self.runs, "summary": {k: v.to_dict() for k, v in self.summary.items()}}

    @classmethod
    def from_dict(cls, d: dict) -> "HeadCell":
        return cls(d.get("fraction"), {k: Figure.from_dict(v) for k, v in d["summary"].items()}, list(d["runs"]))


@dataclass(frozen=True)
class MethodResult:
    """One method's figures: per head kind and fraction (head tasks), or the task's own (``figures``)."""

    method: Method
    features: str                   # where its features came from: stages/evaluate/context.py:FEATURE_SOURCES, or linear-map
    heads: dict[str, dict[str, HeadCell]] = field(default_factory=dict)   # head kind -> fraction column -> cell
    figures: dict[str, Any] = field(default_factory=dict)  # recall/auroc, ci, median_rank, note, feature_dim, ...

    def largest_fraction(self, head: str) -> HeadCell | None:
        """The cell of ``head`` at the largest label fraction (what the report draws)."""
        cells = [c for c in (self.heads.get(head) or {}).values() if c.fraction is not None]
        return max(cells, key=lambda c: c.fraction) if cells else None

    def at(self, fraction: float) -> HeadCell | None:
        """The first head kind's cell at ``fraction``."""
        cells = next(iter(self.heads.values()), {})
        return next((c for c in cells.values() if c.fraction == fraction), None)

    def to_dict(self) -> dict:
        heads = {k: {fl: c.to_dict() for fl, c in by_f.items()} for k, by_f in self.heads.items()}
        return {"name": self.method.name, "identity": self.method.to_dict(), "features": self.features,
                **self.figures, **({"heads": heads} if heads else {})}

    @classmethod
    def from_dict(cls, d: dict) -> "MethodResult":
        heads = {k: {fl: HeadCell.from_dict(c) for fl, c in by_f.items()} for k, by_f in (d.get("heads") or {}).items()}
        figures = {k: v for k, v in d.items() if k not in ("name", "identity", "features", "heads")}
        return cls(Method.from_dict(d["name"], d.get("identity") or {}), d.get("features", ""), heads, figures)


@dataclass(frozen=True)
class CheckpointInfo:
    """The Adaptor checkpoint a run evaluated."""

    path: str
    hash: str
    mode: str
    epoch: int | None = None
    trained_on: str | None = None               # the dataset it was trained on
    fingerprints: dict[str, str] | None = None  # of the caches it was trained on
    adaptor_outputs: str | None = None          # where its outputs are cached
    adaptor_forwards: dict[str, int] = field(default_factory=dict)
    adaptor_forwards_line: str | None = None

    def to_dict(self) -> dict:
        return dict(self.__dict__)

    @classmethod
    def from_dict(cls, d: dict | None) -> "CheckpointInfo | None":
        if not d:
            return None
        return cls(str(d.get("path") or ""), str(d.get("hash") or ""), str(d.get("mode") or "?"), d.get("epoch"),
                   d.get("trained_on"), d.get("fingerprints"), d.get("adaptor_outputs"),
                   dict(d.get("adaptor_forwards") or {}), d.get("adaptor_forwards_line"))


@dataclass(frozen=True)
class Provenance:
    """How a run was made (pipeline/provenance.py)."""

    command: str | None = None
    cwd: str | None = None
    when: str | None = None
    versions: dict[str, str] = field(default_factory=dict)
    source: str | None = None                   # the git revision of the source tree, if any

    def to_dict(self) -> dict:
        return dict(self.__dict__)

    @classmethod
    def from_dict(cls, d: dict | None) -> "Provenance":
        d = d or {}
        return cls(d.get("command"), d.get("cwd"), d.get("when"), dict(d.get("versions") or {}), d.get("source"))


@dataclass(frozen=True)
class Prevalence:
    positive: int
    known: int


@dataclass(frozen=True)
class FailureReason:
    modality: str
    reason: str
    count: int
    items: list[str]                            # a few of the items


@dataclass(frozen=True)
class Failures:
    count: int = 0                              # items of the dataset that could not be embedded
    skipped_items: int = 0
    reasons: list[FailureReason] = field(default_factory=list)


AGREEMENT = ("mentioned", "hedged", "contradicted", "false_mention", "negated", "positives", "negatives")


@dataclass(frozen=True)
class DataCard:
    """What the figures were computed on (stages/evaluate/card.py)."""

    dataset: str
    spec: str
    description: str
    items: int
    splits: dict[str, int]
    prevalence: dict[str, dict[str, Prevalence]]     # label -> split -> positives of the known
    labels_not_binary: list[str] = field(default_factory=list)
    masks: list[str] = field(default_factory=list)
    report_agreement: dict[str, dict[str, float]] | None = None   # AGREEMENT -> finding (and "all") -> share/count
    failures: Failures = field(default_factory=Failures)
    raw: dict = field(default_factory=dict, repr=False, compare=False)   # as written

    def to_dict(self) -> dict:
        return self.raw

    @classmethod
    def from_dict(cls, d: dict | None) -> "DataCard | None":
        if not d:
            return None
        f = d.get("failures") or {}
        failures = Failures(int(f.get("count") or 0), int(f.get("skipped_items") or 0),
                            [FailureReason(x["modality"], x["reason"], int(x["count"]), list(x["items"]))
                             for x in f.get("reasons") or []])
        prevalence = {lab: {s: Prevalence(int(v["positive"]), int(v["known"])) for s, v in by_s.items() if v}
                      for lab, by_s in (d.get("prevalence") or {}).items()}
        agreement = d.get("report_agreement")
        return cls(str(d.get("dataset") or ""), str(d.get("spec") or ""), str(d.get("description") or ""),
                   int(d.get("items") or 0), dict(d.get("splits") or {}), prevalence,
                   list(d.get("labels_not_binary") or []), list(d.get("masks") or []),
                   {k: dict(agreement.get(k) or {}) for k in AGREEMENT} if agreement else None, failures, d)


@dataclass(frozen=True)
class Overlays:
    """The segmentation cases a run drew (``data.overlays``): whose decoder, at which fraction and seed."""

    fraction: str                   # the column, e.g. "100%"
    seed: int | None
    threshold: float | None
    chosen_by: str                  # the method whose decoder chose the best and worst cases
    methods: list[str]              # the methods of overlays.npz, in its order

    @classmethod
    def from_dict(cls, d: dict | None) -> "Overlays | None":
        if not d:
            return None
        return cls(str(d.get("fraction", "?")), d.get("seed"), d.get("threshold"), str(d.get("chosen_by") or ""),
                   list(d.get("methods") or []))


@dataclass(frozen=True)
class EvalRecord:
    """One evaluation run: everything its ``results.json`` says."""

    task: str                                   # stages/evaluate/tasks.py:TASKS
    dataset: str                                # the dataset as given (a reader spec or a table's path)
    dataset_name: str                           # its name in the cache
    methods: list[MethodResult]
    tables: list[Table]
    config: dict = field(default_factory=dict)  # the evaluation's config (stages.evaluate.EvalConfig)
    config_hash: str = ""
    checkpoint: CheckpointInfo | None = None    # None: no Adaptor (frozen features)
    backbone: str = ""
    text_encoder: str | None = None
    fingerprints: dict[str, str] = field(default_factory=dict)   # of the caches it read, by modality
    dataset_version: str | None = None
    split_source: str = ""
    created: str = ""
    data: dict = field(default_factory=dict)    # the task's own facts: splits, fractions, labels, target, overlays ...
    plots: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    files: dict[str, str] = field(default_factory=dict)   # data files beside results.json, by role (keys.DATA_FILES)
    data_card: DataCard | None = None
    provenance: Provenance = field(default_factory=Provenance)
    seconds: float | None = None
    peak_memory: dict[str, float] = field(default_factory=dict)   # cpu_peak_mb, gpu_peak_mb
    format: int = RESULTS_FORMAT

    @property
    def dataset_label(self) -> str:
        return self.dataset_name or self.dataset or "?"

    @property
    def overlays(self) -> Overlays | None:
        """The segmentation cases drawn (``data.overlays``)."""
        return Overlays.from_dict(self.data.get("overlays"))

    @property
    def target(self) -> str | None:
        """The mask a segmentation run segmented (``data.target``)."""
        return self.data.get("target")

    def file(self, folder: Path, role: str) -> Path | None:
        """The run's data file for ``role`` (keys.DATA_FILES), if it is there."""
        name = self.files.get(role)
        path = Path(folder) / name if name else None
        return path if path is not None and path.is_file() else None

    def method_named(self, name: str) -> Method:
        """The method of this run with that name (a data file names one), or an unknown one."""
        return next((m.method for m in self.methods if m.method.name == name), Method(name, "other"))

    def to_dict(self) -> dict:
        """The JSON data of ``results.json`` (numbers and NaN as they are: write it with core.jsondata.plain)."""
        return {"format": self.format, "task": self.task, "dataset": self.dataset, "dataset_name": self.dataset_name,
                "dataset_version": self.dataset_version, "split_source": self.split_source, "created": self.created,
                "backbone": self.backbone, "text_encoder": self.text_encoder, "config": self.config,
                "config_hash": self.config_hash,
                "checkpoint": self.checkpoint.to_dict() if self.checkpoint else None,
                "fingerprints": self.fingerprints, "data": self.data, "methods": [m.to_dict() for m in self.methods],
                "tables": [t.to_dict() for t in self.tables], "plots": self.plots, "notes": self.notes,
                "files": self.files, "data_card": self.data_card.to_dict() if self.data_card else None,
                "provenance": self.provenance.to_dict(), "seconds": self.seconds, **self.peak_memory}

    @classmethod
    def from_dict(cls, d: dict) -> "EvalRecord":
        """A run of the current format (pipeline.records.load upgrades older ones first)."""
        return cls(
            str(d["task"]), str(d.get("dataset") or ""), str(d.get("dataset_name") or ""),
            [MethodResult.from_dict(m) for m in d.get("methods") or []], [Table.from_dict(t) for t in d["tables"]],
            dict(d.get("config") or {}), str(d.get("config_hash") or ""), CheckpointInfo.from_dict(d.get("checkpoint")),
            str(d.get("backbone") or ""), d.get("text_encoder"), dict(d.get("fingerprints") or {}),
            d.get("dataset_version"), str(d.get("split_source") or ""), str(d.get("created") or ""),
            dict(d.get("data") or {}), list(d.get("plots") or []), list(d.get("notes") or []),
            dict(d.get("files") or {}), DataCard.from_dict(d.get("data_card")), Provenance.from_dict(d.get("provenance")),
            d.get("seconds"), {k: v for k, v in d.items() if k.endswith("_peak_mb")}, int(d.get("format", RESULTS_FORMAT)))



@dataclass(frozen=True)
class Candidate:
    id: str
    score: float                    # the cosine similarity to the query
    true: bool                      # the query's own pair (a repeated report counts)


@dataclass(frozen=True)
class Query:
    query: str                      # the item whose image (or report) asks
    true_rank: int | None           # where its true match ranked (None: none among the candidates)
    top: list[Candidate]

    @property
    def hit(self) -> bool:
        return any(c.true for c in self.top)

    def to_dict(self) -> dict:
        return {"query": self.query, "true_rank": self.true_rank, "top": [dict(c.__dict__) for c in self.top]}

    @classmethod
    def from_dict(cls, d: dict) -> "Query":
        return cls(str(d["query"]), d.get("true_rank"),
                   [Candidate(str(c["id"]), float(c["score"]), bool(c["true"])) for c in d.get("top") or []])


DIRECTIONS = ("image_to_text", "text_to_image")


@dataclass(frozen=True)
class Examples:
    """A retrieval run's examples (``examples.json``): a few queries each way with their top candidates."""

    method: str                     # whose embeddings ranked them
    k: int
    n_test: int | None
    queries: dict[str, list[Query]]  # DIRECTIONS -> queries
    reports: dict[str, str]         # the reports shown, by item

    def report(self, item: str) -> str:
        return self.reports.get(item, "(report not saved)")

    def to_dict(self) -> dict:
        return {"method": self.method, "k": self.k, "n_test": self.n_test,
                **{d: [q.to_dict() for q in self.queries.get(d, [])] for d in DIRECTIONS}, "reports": self.reports}

    @classmethod
    def from_dict(cls, d: dict) -> "Examples":
        return cls(str(d.get("method") or ""), int(d.get("k") or 5), d.get("n_test"),
                   {k: [Query.from_dict(q) for q in d.get(k) or []] for k in DIRECTIONS},
                   {str(i): str(t) for i, t in (d.get("reports") or {}).items()})
