"""The page of a sweep: `pipe report OUT --html sweep.html` on a folder `pipe sweep` wrote.

One self-contained file, as the runs' page (:mod:`stages.report.page`, whose styles and
helpers it uses): the trials ranked by the objective on the validation split, each
parameter's effect (Optuna's importances, and its slice plot: the objective against the
parameter's values), the objective over the trials, the best trials' downstream tables on
the test split (the runs in ``OUT/top/``, drawn as the runs' page draws them), and the
trials that failed or were pruned, with the reasons.

It reads files only: ``sweep.json`` (what was searched, and how), ``trials.json`` (the
trials, as ``trials.csv``) and the evaluation runs in ``OUT/top/``. The Optuna figures are
computed on a study rebuilt in memory from those trials, so the page needs no access to the
study's storage.
"""
from __future__ import annotations

import io
import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

from core.atomic import atomic_write_text
from stages.report import figures as F
from stages.report.page import Page, esc, html_page, img, note, simple_table
from stages.report.runs import ReportInputError, Runs, load_runs

MANIFEST = "sweep.json"
TRIALS = "trials.json"
SHOWN_SLICES = 8   # parameters drawn in the slice plots, the most important first


def is_sweep_folder(path: Path) -> bool:
    """A folder `pipe sweep` wrote (its ``sweep.json``)."""
    try:
        return json.loads((Path(path) / MANIFEST).read_text()).get("kind") == "sweep"
    except (OSError, ValueError, AttributeError):
        return False


def top_runs(path: Path) -> list[Path]:
    """The evaluation runs of a sweep's best trials on the test split (``OUT/top/*``)."""
    top = Path(path) / "top"
    return sorted(p for p in top.iterdir() if (p / "results.json").is_file()) if top.is_dir() else []


@dataclass
class SweepFolder:
    path: Path
    manifest: dict
    rows: list[dict]
    top: Runs | None


def load_sweep_folder(path: Path) -> SweepFolder:
    path = Path(path)
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        trials = json.loads((path / TRIALS).read_text()) if (path / TRIALS).is_file() else {"rows": []}
    except (OSError, ValueError) as e:
        raise ReportInputError(f"{path} is not a readable sweep folder ({e}); run `pipe sweep` into it first") from None
    ranked = [Path(t["out"]).name for t in manifest.get("top_runs", []) if t.get("out")]
    runs = sorted(top_runs(path), key=lambda p: ranked.index(p.name) if p.name in ranked else len(ranked))
    return SweepFolder(path, manifest, trials.get("rows", []), load_runs(runs) if runs else None)


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight", facecolor="white")
    import matplotlib.pyplot as plt  # lazy: matplotlib takes a second to import

    plt.close(fig)
    return buf.getvalue()


class SweepPage:
    def __init__(self, sweep: SweepFolder, title: str | None = None):
        self.sweep, self.m = sweep, sweep.manifest
        self.title = title or f"sweep · {self.m.get('objective', '?')}"
        self.complete = [r for r in sweep.rows if r.get("state") == "complete"]
        self._study = None

    def render(self) -> str:
        sections = [("leaderboard", "Trials, ranked", self.leaderboard()),
                    ("parameters", "Each parameter's effect", self.parameters()),
                    ("history", "The objective over the trials", self.history()),
                    ("best", "The best trials on the test split", self.best()),
                    ("failures", "Failed, pruned and interrupted trials", self.failures()),
                    ("sweep", "The sweep", self.about())]
        return html_page(self.title, self.header(), sections, ",", "")

    # ------------------------------------------------------------------ header and table
    def header(self) -> str:
        m, rows = self.m, self.sweep.rows
        states = {s: sum(1 for r in rows if r.get("state") == s) for s in
                  ("complete", "pruned", "failed", "running", "interrupted")}
        counts = " · ".join(f"{n} {s}" for s, n in states.items() if n)
        best = self.complete[0] if self.complete else None
        best_text = (f"best {self._value(best)} (trial {best['trial']})" if best else "no complete trial yet")
        pairs = ", ".join(" + ".join(p) for p in m.get("pairs", []))
        return (f"<h1>{esc(self.title)}</h1><p class=\"sub\">{esc(m.get('dataset', '?'))} · {esc(pairs)}</p>"
                f"<p class=\"facts\">{esc(m.get('search', '?'))} search · {esc(m.get('trials', '?'))} trials: "
                f"{esc(counts or 'none yet')} · objective {esc(m.get('objective'))} ({esc(m.get('direction'))}) on the "
                f"validation split · {esc(best_text)}</p>")

    @staticmethod
    def _value(r: dict) -> str:
        v = r.get("objective")
        if not isinstance(v, (int, float)) or not math.isfinite(v):
            return "–"
        std = r.get("objective_std")
        return f"{v:.4g}" + (f" ± {std:.2g}" if isinstance(std, (int, float)) and std else "")

    def leaderboard(self) -> str:
        rows = self.sweep.rows
        if not rows:
            return note("No trial has finished yet.")
        axes = self.m.get("axes", [])
        tested = {t["trial"]: t for t in self.m.get("top_runs", []) if "test" in t}
        head = ["rank", "trial", "objective (valid)", *(["test"] if tested else []), "state", *axes, "seconds", "run"]
        body = []
        for i, r in enumerate(rows):
            rank = str(i + 1) if r.get("state") == "complete" else ""
            test = [f"{tested[r['trial']]['test']:.4g}" if r["trial"] in tested else ""] if tested else []
            body.append([rank, str(r["trial"]), self._value(r), *test, r.get("state", ""),
                         *[_short(r.get(a)) for a in axes], _short(r.get("seconds")), _relative(r.get("run"),
                                                                                              self.sweep.path)])
        cap = (f"Ranked by {self.m.get('objective')} on the validation split "
               f"({'higher' if self.m.get('direction') == 'maximize' else 'lower'} is better)"
               + (f"; each a mean over {self.m.get('repeats')} seeds ± their spread" if self.m.get("repeats", 1) > 1
                  else "") + (f"; test: {self.m.get('test_objective')} on the test split, for the best trials only"
                              if tested else "") + ".")
        return f'<p class="cap">{esc(cap)}</p><div class="tbl">{simple_table(head, body)}</div>'

    # ------------------------------------------------------------------ Optuna's pictures
    def study(self):
        """The complete trials as an in-memory Optuna study (for importances and slice plots)."""
        if self._study is None:
            import optuna  # lazy: optuna takes a second to import

            optuna.logging.set_verbosity(optuna.logging.WARNING)
            dists = {k: optuna.distributions.json_to_distribution(json.dumps(v))
                     for k, v in self.m.get("distributions", {}).items()}
            study = optuna.create_study(direction=self.m.get("direction", "maximize"))
            for r in sorted(self.complete, key=lambda r: r["trial"]):
                params = {k: v for k, v in (r.get("params") or {}).items() if k in dists}
                if len(params) == len(dists):
                    study.add_trial(optuna.trial.create_trial(params=params, distributions=dists,
                                                              value=float(r["objective"])))
            self._study = study
        return self._study

    def parameters(self) -> str:
        study = self.study()
        varied = [k for k in self.m.get("distributions", {})
                  if len({json.dumps(t.params.get(k)) for t in study.trials}) > 1]
        if len(study.trials) < 2 or not varied:
            return note("Each parameter's effect needs at least two complete trials with different values.")
        import optuna  # lazy: optuna takes a second to import
        from optuna.visualization import matplotlib as om  # lazy: as above

        F._plt()  # the page's matplotlib settings
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Optuna marks its matplotlib plots experimental
            evaluator = optuna.importance.FanovaImportanceEvaluator(seed=0)
            importances = optuna.importance.get_param_importances(study, evaluator=evaluator, params=varied)
            bars = _png(om.plot_param_importances(study, evaluator=evaluator, params=varied).figure)
            shown = list(importances)[:SHOWN_SLICES]
            axes = om.plot_slice(study, params=shown)
            fig = (axes.flat[0] if hasattr(axes, "flat") else axes).figure
            fig.set_size_inches(min(16, 3.6 * len(shown)), 3.4)
            slices = _png(fig)
        rows = [[k, f"{v:.2f}"] for k, v in importances.items()]
        return (f'<p class="cap">Importances: Optuna\'s fANOVA (seed 0) on the {len(study.trials)} complete '
                f"trials (they sum to 1). Slice plots: the objective of each trial against one parameter's value, "
                f"the colour its trial number.</p><div class=\"grid2\"><div>{simple_table(['parameter', 'importance'], rows)}</div>"
                f"{img(bars, 'parameter importances')}</div><figure class=\"wide\">{img(slices, 'slice plots')}</figure>")

    def history(self) -> str:
        study = self.study()
        if not study.trials:
            return note("No complete trial yet.")
        from optuna.visualization import matplotlib as om  # lazy: optuna takes a second to import

        F._plt()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ax = om.plot_optimization_history(study)
        ax.figure.set_size_inches(8, 3.4)
        return (f'<p class="cap">Each complete trial\'s objective on the validation split, by trial number, and the '
                f'best so far.</p>{img(_png(ax.figure), "objective over the trials")}')

    # ------------------------------------------------------------------ the rest
    def best(self) -> str:
        top = self.sweep.top
        if top is None or not top.evals:
            return note("No best trial was evaluated on the test split yet (top: 0, or the sweep has not finished).")
        errors = [t for t in self.m.get("top_runs", []) if t.get("error")]
        extra = "".join(note(f"trial {t['trial']}: {t['error']}") for t in errors)
        return (f'<p class="cap">The best {len(top.evals)} trial(s) by the validation objective, each evaluated once '
                f"on the test split with `pipe evaluate`'s intervals, best first (a row after the first names its "
                f"trial's folder). These figures chose nothing.</p>"
                f"{Page(top, self.title).results()}{extra}")

    def failures(self) -> str:
        rows = [r for r in self.sweep.rows if r.get("state") in ("failed", "pruned", "interrupted")]
        if not rows:
            return note("None: every trial ran to the end.", "ok")
        body = [[str(r["trial"]), r["state"], str(r.get("reason") or "")] for r in rows]
        return simple_table(["trial", "state", "reason"], body)

    def about(self) -> str:
        m = self.m
        keep = ("source", "dataset", "search", "trials", "objective", "direction", "prune", "repeats", "top",
                "study", "storage", "preset", "overrides", "evaluate", "space")
        rows = [[k, json.dumps(m.get(k)) if isinstance(m.get(k), (dict, list)) else str(m.get(k))] for k in keep]
        return simple_table(["key", "value"], rows, cls="plain prov")


def _short(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)


def _relative(run, base: Path) -> str:
    if not run:
        return ""
    try:
        return str(Path(run).resolve().relative_to(base.resolve()))
    except ValueError:
        return str(run)


def write_sweep_page(folder: Path, path: Path, title: str | None = None) -> Path:
    """The sweep's page, written whole (a reader never sees half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, SweepPage(load_sweep_folder(folder), title).render())
    return path
