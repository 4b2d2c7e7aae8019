"""One self-contained HTML page for one or several runs: `pipe report RUN... --html report.html`.

Everything is inside the file: styles inline (the stylesheet is this package's ``page.css``),
pictures as ``data:`` URIs, no script, no font, nothing fetched (a Content-Security-Policy
says so to the browser too). Every text that comes from a run (names, paths, reports,
configs) is HTML-escaped. A section whose data the runs lack says so in one line. Several
runs share each section: their tables are merged, their curves drawn on the same axes,
their examples set side by side. The runs are read as records (:mod:`pipeline.records`):
a row's method says its kind, which ranks, labels and colours it; each task of
:data:`stages.evaluate.tasks.TASKS` says its order, its main tables and its glance figure.
"""
from __future__ import annotations

import html
import time
from collections import defaultdict
from functools import cache
from importlib import resources
from pathlib import Path

import numpy as np
import yaml

from core.atomic import atomic_write_text
from pipeline.methods import Method
from pipeline.records import (DataCard, Examples, Failures, MethodResult, Prevalence, Query, overlay_keys,
                              prediction_key)
from pipeline.tables import Cell, Table, fraction_label, merge_tables, pct
from stages.evaluate.metrics import LOWER_IS_BETTER, auroc
from stages.evaluate.tasks import TASKS, task_rank
from stages.report import figures as F
from stages.report.runs import EvalRun, Runs, TrainRun

SPLITS = ("train", "valid", "test")
TEXT_CHARS = 220   # of a report shown in a retrieval list


@cache
def stylesheet() -> str:
    """The page's CSS (package data: stages/report/page.css)."""
    return resources.files("stages.report").joinpath("page.css").read_text(encoding="utf-8")


def esc(x) -> str:
    return html.escape("" if x is None else str(x), quote=True)


def note(text: str, kind: str = "missing") -> str:
    """One line in place of what a run lacks (``missing``), a good fact (``ok``) or an aside (``info``)."""
    return f'<p class="{kind}">{esc(text)}</p>'


def img(png: bytes, alt: str, cls: str = "", width: int | None = None) -> str:
    w = f' width="{width}"' if width else ""
    return f'<img class="{cls}" src="{F.data_uri(png)}" alt="{esc(alt)}"{w}>'


def swatch(colour: str) -> str:
    return f'<span class="sw" style="background:{esc(colour)}"></span>'


def simple_table(header: list[str], rows: list[list[str]], cls: str = "plain", raw: bool = False) -> str:
    """A table of texts (escaped), or of ready HTML with ``raw``."""
    cell = (lambda x: x) if raw else esc
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{cell(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def html_page(title: str, header: str, sections: list[tuple[str, str, str]], nav_cut: str, footer: str) -> str:
    """One self-contained page: the stylesheet inline, a strict content policy (no script, nothing
    fetched), a header with a link to each ``(id, title, html)`` section (its title up to
    ``nav_cut``), the sections, and a footer that says what wrote the page (``footer``, escaped) and when."""
    nav = "".join(f'<a href="#{sid}">{esc(name.split(nav_cut)[0])}</a>' for sid, name, _ in sections)
    body = "".join(f'<section id="{sid}"><h2>{esc(name)}</h2>{content}</section>' for sid, name, content in sections)
    return (f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; img-src data:; "
            f"style-src 'unsafe-inline'\">"
            f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{esc(title)}</title><style>\n{stylesheet()}</style></head><body>"
            f"<header>{header}<nav>{nav}</nav></header><main>{body}</main>"
            f"<footer>Written by <code>pipe report</code> · {esc(footer)}"
            f"{esc(time.strftime('%Y-%m-%d %H:%M'))} · one file: no script, nothing fetched</footer>"
            f"</body></html>\n")


def _plain(text: str) -> str:
    """A cell shown as its text: no figure (n/a), or a computed one (chance)."""
    return f'<span class="na">{esc(text)}</span>'


def _known(x) -> str:
    return "?" if x is None else str(x)


def _share(x) -> str:
    return "–" if x is None else f"{100 * x:.0f}%"


class Page:
    def __init__(self, runs: Runs, title: str = "freeze-pipe report"):
        self.runs, self.title = runs, title
        self.palette = F.Palette()
        self._strip_px = 96  # retrieval thumbnails: narrower as more runs share a row
        for t in runs.trainings:  # training colours first: they are the Adaptors of the tables
            self.palette(t.method)

    # ------------------------------------------------------------------------ the page
    def render(self) -> str:
        sections = [("results", "Results", self.results()), ("training", "Training", self.training()),
                    ("classification", "Classification: ROC and calibration", self.classification()),
                    ("zero-shot", "Zero-shot: ROC", self.zero_shot()),
                    ("segmentation", "Segmentation: best and worst cases", self.segmentation()),
                    ("retrieval", "Retrieval examples", self.retrieval()),
                    ("data", "Data card", self.data_card()), ("provenance", "Provenance", self.provenance())]
        return html_page(self.title, self.header(), sections, ":", f"freeze-pipe {self._version()} · ")

    def _version(self) -> str:
        for r in self.runs.evals:
            v = r.record.provenance.versions.get("freeze-pipe")
            if v:
                return v
        from pipeline.provenance import versions  # lazy: only when no run recorded it

        return versions().get("freeze-pipe", "?")

    def _of_task(self, task: str) -> list[EvalRun]:
        return [r for r in self.runs.evals if r.task == task]

    def header(self) -> str:
        evals, trainings = self.runs.evals, self.runs.trainings
        datasets = list(dict.fromkeys(r.dataset for r in evals)) or ["no evaluation runs"]
        tasks = list(dict.fromkeys(r.task for r in evals))
        chips = "".join(f'<span class="chip"><b>{esc(r.task)}</b> {esc(r.label)}</span>' for r in evals)
        chips += "".join(f'<span class="chip train"><b>training</b> {esc(t.label)}</span>' for t in trainings)
        facts = (f"{len(evals)} evaluation run{'s' * (len(evals) != 1)} ({esc(', '.join(tasks) or 'none')}) · "
                 f"{len(trainings)} Adaptor training{'s' * (len(trainings) != 1)}")
        return (f"<h1>{esc(self.title)}</h1><p class=\"sub\">{esc(' · '.join(datasets))}</p>"
                f"<p class=\"facts\">{facts}</p><div class=\"chips\">{chips}</div>")

    # ---------------------------------------------------------------------- results
    def results(self) -> str:
        evals = self.runs.evals
        if not evals:
            return note("No evaluation runs given (only Adaptor trainings): no results tables.")
        tables = merge_tables([(r.dataset, r.record.tables) for r in evals], [r.label for r in evals])
        by_task: dict[str, list[Table]] = defaultdict(list)
        for t in tables:
            by_task[t.task].append(t)
        out = [self._glance(by_task)]
        for task in sorted(by_task, key=task_rank):
            # each table says what its cells and intervals are (pipeline.tables.interval_note)
            cells = next((t.note for t in by_task[task] if t.note), "Cells: value [interval].")
            first = TASKS[task].main_tables if task in TASKS else ()
            main = [t for t in by_task[task] if not first or t.metric in first]
            more = [t for t in by_task[task] if t not in main]
            out.append(f'<h3>{esc(task.capitalize())}</h3><p class="cap">{esc(cells)} In %. <b>Bold</b>: the best '
                       f'in its column. Rows in grey are references: no Adaptor, the least-squares map, the '
                       f'all-empty predictor, chance.</p>')
            out.append('<div class="tables">' + "".join(self._table(t) for t in main) + "</div>")
            if more:
                inner = "".join(self._table(t) for t in more)
                out.append(f"<details><summary>{len(more)} more {esc(task)} table{'s' * (len(more) > 1)} "
                           f"({esc(', '.join(t.name or t.title for t in more))})</summary>{inner}</details>")
        notes = list(dict.fromkeys(f"{r.label}: {n}" for r in evals for n in r.record.notes))
        if notes:
            items = "".join(f"<li>{esc(n)}</li>" for n in notes)
            out.append(f'<details class="notes"><summary>Notes the runs recorded ({len(notes)})</summary>'
                       f"<ul>{items}</ul></details>")
        return "".join(out)

    def _glance(self, by_task: dict[str, list[Table]]) -> str:
        """One tile per task: its headline figure for every method, as bars (plain HTML)."""
        tiles = []
        for task in sorted(by_task, key=task_rank):
            spec = TASKS.get(task)
            t = next((t for key in (spec.glance if spec else ()) for t in by_task[task] if t.metric == key), None)
            if t is None or not t.columns:
                continue
            by_fraction = t.columns[0] if spec.glance_fewest_labels else t.columns[-1]
            col = next((c for c in t.columns if c.name == spec.glance_column), by_fraction)
            bars = []
            for r in sorted(t.rows, key=lambda r: r.method.type.order):
                x = r.cell(col.name).value
                if x is None:
                    continue
                colour = self.palette(r.method)
                bars.append(f'<div class="bar"><span class="name">{swatch(colour)}{esc(r.method.short)}</span>'
                            f'<span class="track"><span class="fill" style="width:{max(0.0, min(100.0, 100 * x)):.1f}%;'
                            f'background:{colour}"></span></span><span class="num">{esc(pct(x))}</span></div>')
            where = f"{col.name} labels" if col.fraction is not None else col.name
            tiles.append(f'<div class="tile"><div class="tt">{esc(task.capitalize())}</div><div class="ts">'
                         f"{esc(t.name)} · {esc(where)}</div>{''.join(bars)}</div>")
        return f'<div class="glance">{"".join(tiles)}</div>' if tiles else ""

    def _table(self, t: Table) -> str:
        lower = t.metric in LOWER_IS_BETTER
        centre = {(i, c.name): x for i, r in enumerate(t.rows) if r.method.type.measured for c in t.columns
                  if (x := r.cell(c.name).value) is not None}
        best = {}
        for c in t.column_names:
            xs = [x for (i, cc), x in centre.items() if cc == c]
            if len(xs) > 1:
                best[c] = min(xs) if lower else max(xs)
        seeds = sorted({cell.figure.n_seeds for r in t.rows for cell in r.cells.values()
                        if cell.figure is not None and cell.figure.n_seeds})
        head = "".join(f"<th>{esc(c)}</th>" for c in t.column_names)
        rows = []
        for i in sorted(range(len(t.rows)), key=lambda i: (t.rows[i].method.type.order, i)):
            r = t.rows[i]
            cells = []
            for c in t.column_names:
                is_best = (i, c) in centre and best.get(c) == centre[(i, c)]
                shown = self._cell(r.cell(c)) if r.method.type.measured else _plain(r.cell(c).text)
                cells.append(f'<td class="{"best" if is_best else ""}">{shown}</td>')
            rows.append(f'<tr class="{"ours" if r.method.type.ours else "ref"}"><th scope="row">'
                        f"{swatch(self.palette(r.method))}{esc(r.method.name)}</th>{''.join(cells)}</tr>")
        seed_note = f" · {', '.join(map(str, seeds))} seed{'s' * (seeds != [1])} per cell" if seeds else ""
        better = " · lower is better" if lower else ""
        return (f'<div class="tbl"><table class="results"><caption>{esc(t.heading)}<span class="ds">'
                f"{esc(t.dataset)}{esc(seed_note)}{esc(better)}</span></caption><thead><tr><th>method</th>{head}</tr>"
                f"</thead><tbody>{''.join(rows)}</tbody></table></div>")

    @staticmethod
    def _cell(cell: Cell) -> str:
        x, f = cell.value, cell.figure
        if x is None:
            return _plain(cell.text or "n/a")
        out = f'<span class="v">{esc(pct(x))}</span>'
        if (f.n_seeds or 1) > 1 and f.std is not None:
            out += f'<span class="pm"> ± {esc(pct(f.std))}</span>'
        ci = f.ci
        if ci and ci[0] is not None and np.isfinite(ci[0]):
            out += f'<span class="ci">[{esc(pct(ci[0]))}, {esc(pct(ci[1]))}]</span>'
        return out

    # --------------------------------------------------------------------- training
    def training(self) -> str:
        tr = [t for t in self.runs.trainings if t.rows]
        out = []
        if not tr:
            why = ("the runs used no Adaptor" if not any(r.checkpoint for r in self.runs.evals) else
                   "the checkpoints' training folders (metrics.csv) were not found")
            out.append(note(f"No training curves: {why}."))
        else:
            legend = "".join(f'<span class="key">{swatch(self.palette(t.method))}{esc(t.method.name)} '
                             f'<span class="src">{esc(t.label)}</span></span>' for t in tr)
            png = F.training_curves([(t.label, self.palette(t.method), t.rows) for t in tr])
            out.append(f'<div class="legend">{legend}</div>'
                       f'<figure class="wide">{img(png, "training curves: loss, recall, learning rate, time")}'
                       f"</figure>")
            out.append(simple_table(
                ["Adaptor", "epochs", "batch", "best validation loss", "last val R@1/5/10 i→t", "time",
                 "s / epoch", "samples / s", "peak memory"], [self._train_row(t) for t in tr], raw=True))
        out += [note(f"Training run of checkpoint {p} not found (moved?): no curves for it.")
                for p in self.runs.missing_trainings]
        return "".join(out)

    def _train_row(self, t: TrainRun) -> list[str]:
        rows, last = t.rows, t.rows[-1]
        val = [(r["val_loss"], r["epoch"]) for r in rows if isinstance(r.get("val_loss"), float)]
        best = f"{min(val)[0]:.3f} (epoch {min(val)[1]:g})" if val else "no validation split"
        recall = ("/".join(f"{100 * last[f'val_i2t_r@{k}']:.1f}" for k in (1, 5, 10))
                  if all(f"val_i2t_r@{k}" in last for k in (1, 5, 10)) else "–")
        secs = [r["epoch_seconds"] for r in rows if isinstance(r.get("epoch_seconds"), float)]
        sps = [r["samples_per_s"] for r in rows if isinstance(r.get("samples_per_s"), float)]
        mem = max((r.get("gpu_peak_mb") or r.get("cpu_peak_mb") or 0) for r in rows)
        return [f"{swatch(self.palette(t.method))}{esc(t.method.name)}<br><span class=\"src\">{esc(t.label)}</span>",
                esc(f"{last['epoch']:g}"), esc(t.config.get("batch_size", "–")), esc(best), esc(recall),
                esc(f"{sum(secs):.1f} s" if secs else "–"), esc(f"{np.mean(secs):.2f}" if secs else "–"),
                esc(f"{np.mean(sps):,.0f}" if sps else "–"), esc(f"{mem:,.0f} MiB" if mem else "–")]

    # ------------------------------------------------------------ ROC and calibration
    def _score_sets(self, task: str) -> tuple[dict, list[str]]:
        """{dataset: {"labels": [...], "methods": {name: (method, y, scores)}, "what": ...}} of the task's
        runs, and one line per run that saved no scores."""
        groups: dict[str, dict] = {}
        missing = []
        for r in self._of_task(task):
            z = r.npz("predictions")
            if z is None:
                missing.append(f"{r.label}: no per-item test scores saved (predictions.npz); re-run `pipe evaluate` "
                               "to get its ROC curves.")
                continue
            g = groups.setdefault(r.dataset, {"labels": [str(x) for x in z["label_names"]], "methods": {}, "what": ""})
            for mi, m in enumerate(r.record.methods):
                key, what = self._score_key(mi, m, z)
                if key is None or m.method.name in g["methods"]:
                    continue
                g["methods"][m.method.name] = (m.method, z["y"], z[key])
                g["what"] = g["what"] or what
        return groups, missing

    @staticmethod
    def _score_key(mi: int, m: MethodResult, z: dict) -> tuple[str | None, str]:
        """Where method ``mi``'s test scores are in predictions.npz: its own (a method scored once, zero-shot),
        or its first head kind's first seed at the largest label fraction."""
        if not m.heads:
            key = prediction_key(mi)
            return (key if key in z else None), "test split"
        kind = next(iter(m.heads))   # the config's first head kind
        cell = m.largest_fraction(kind)
        if cell is None or not cell.runs:
            return None, ""
        seed = cell.seeds[0]
        key = prediction_key(mi, kind, cell.fraction, seed)
        return (key if key in z else None), f"{kind} head · {fraction_label(cell.fraction)} labels · seed {seed} · test split"

    def _score_cards(self, task: str, calibrated: bool) -> str:
        if not self._of_task(task):
            return note(f"No {task} runs among these runs.")
        groups, missing = self._score_sets(task)
        out = [note(m) for m in missing]
        for dataset, g in groups.items():
            methods = dict(sorted(g["methods"].items(), key=lambda kv: kv[1][0].type.order))  # ours first
            legend = "".join(f'<span class="key">{swatch(self.palette(m))}{esc(n)}</span>'
                             for n, (m, _, _) in methods.items())
            cards = []
            for j, label in enumerate(g["labels"]):
                curves = [(n, self.palette(m), y[:, j], s[:, j]) for n, (m, y, s) in methods.items()]
                curves = [c for c in curves if np.nanmin(c[2]) != np.nanmax(c[2])]  # a label with one class has no ROC
                if not curves:
                    cards.append(f'<figure class="card"><figcaption><b>{esc(label)}</b></figcaption>'
                                 f"{note('only one class in the test split: no ROC')}</figure>")
                    continue
                stats = "".join(
                    f'<span class="stat">{swatch(c)}AUROC {esc(pct(_auroc(y, s)))}'
                    + (f" · ECE {esc(pct(F.ece(y, s)))}" if calibrated else "") + "</span>"
                    for _, c, y, s in curves)
                png = F.roc_panels(curves, calibrated)
                cards.append(f'<figure class="card"><figcaption><b>{esc(label)}</b>{stats}</figcaption>'
                             f"{img(png, f'ROC of {label}')}</figure>")
            head = f'<p class="cap">{esc(dataset)} · {esc(g["what"])}' + (
                " · ROC left, reliability diagram right (10 equal-width bins; on the diagonal = calibrated)"
                if calibrated else "") + "</p>"
            out.append(f'{head}<div class="legend">{legend}</div><div class="cards{"" if calibrated else " narrow"}">'
                       f'{"".join(cards)}</div>')
        return "".join(out)

    def classification(self) -> str:
        return self._score_cards("classification", calibrated=True)

    def zero_shot(self) -> str:
        if not self._of_task("zero-shot"):
            return note("No zero-shot runs among these runs.")
        return (note("No reliability diagram: zero-shot scores are differences of cosine similarities, not "
                     "probabilities.", "info") + self._score_cards("zero-shot", calibrated=False))

    # ------------------------------------------------------------------ segmentation
    def segmentation(self) -> str:
        runs = self._of_task("segmentation")
        if not runs:
            return note("No segmentation runs among these runs.")
        out = []
        for r in runs:
            z = r.npz("overlays")
            if z is None:
                out.append(note(f"{r.label}: no overlay cases saved (overlays.npz); re-run `pipe evaluate` to "
                                "get them."))
                continue
            methods = [r.record.method_named(str(n)) for n in z["method_names"]]   # overlays.npz's order
            head = "".join(f'<th class="pred">{swatch(self.palette(m))}prediction<br><span class="src">'
                           f"{esc(m.name)}</span></th>" for m in methods)
            rows = [self._case(z, i, item, kind, len(methods)) for i, (item, kind) in enumerate(zip(z["ids"], z["kind"]))]
            out.append(f'<p class="cap">{esc(self._cases_caption(r, methods))}</p><div class="tbl"><table '
                       f'class="cases"><thead><tr><th></th><th>image</th><th>truth</th>{head}</tr></thead>'
                       f"<tbody>{''.join(rows)}</tbody></table></div>")
        return "".join(out)

    @staticmethod
    def _case(z: dict, i: int, item, kind, n_methods: int) -> str:
        preds = ""
        for mi in range(n_methods):
            pred, dice = overlay_keys(mi)
            overlay = F.overlay_png(z["image"][i], z[pred][i], F.PREDICTION, outline=z["true"][i])
            preds += f'<td>{img(overlay, "prediction")}<div class="dice">Dice {float(z[dice][i]):.2f}</div></td>'
        return (f'<tr><th scope="row"><span class="tag {esc(kind)}">{esc(kind)}</span><br>'
                f"item {esc(item)}<br>{int(z['true'][i].sum()):,} px true</th>"
                f"<td>{img(F.plain_png(z['image'][i]), 'image')}</td>"
                f"<td>{img(F.overlay_png(z['image'][i], z['true'][i], F.TRUTH), 'true mask')}</td>{preds}</tr>")

    @staticmethod
    def _cases_caption(r: EvalRun, methods: list[Method]) -> str:
        info, target = r.record.overlays, r.record.target or "mask"
        fraction, seed, threshold = (("?", "?", "?") if info is None else
                                     (info.fraction, _known(info.seed), _known(info.threshold)))
        chosen = info.chosen_by if info is not None and info.chosen_by else methods[0].name if methods else "?"
        return (f"{r.label} · {target} · {fraction} labels, seed {seed}, threshold {threshold} · test images with "
                f"a {target} mask, best and worst by Dice of {chosen} · truth in green, prediction in red "
                "(with the true outline)")

    # --------------------------------------------------------------------- retrieval
    def retrieval(self) -> str:
        runs = self._of_task("retrieval")
        if not runs:
            return note("No retrieval runs among these runs.")
        out, loaded = [], []
        for r in runs:
            ex = r.examples()
            if ex is None:
                out.append(note(f"{r.label}: no retrieval examples saved (examples.json); re-run `pipe evaluate` "
                                "to get them."))
                continue
            z = r.npz("thumbnails") or {"ids": np.array([]), "images": np.zeros((0, 1, 1))}
            thumbs = {str(i): F.grey_png(im) for i, im in zip(z["ids"], z["images"])}
            loaded.append((r, ex, thumbs))
        if not loaded:
            return "".join(out)
        self._strip_px = {1: 96, 2: 64}.get(len(loaded), 48)
        heads = "".join(f"<th>{swatch(self.palette(r.record.method_named(ex.method)))}{esc(ex.method)}<br>"
                        f'<span class="src">{esc(r.label)}</span></th>' for r, ex, _ in loaded)
        # (the examples' direction, its title, whether the queries are images and the answers reports)
        for direction, title, image_query in (("image_to_text", "An image, and the reports ranked first for it", True),
                                              ("text_to_image", "A report, and the images ranked first for it", False)):
            queries = list(dict.fromkeys(q.query for _, ex, _ in loaded for q in ex.queries[direction]))
            rows = []
            for qid in queries:
                cols = []
                for r, ex, thumbs in loaded:
                    q = next((q for q in ex.queries[direction] if q.query == qid), None)
                    cols.append("<td></td>" if q is None else f"<td>{self._answers(image_query, q, ex, thumbs)}</td>")
                ex0, th0 = next((ex, th) for _, ex, th in loaded if any(q.query == qid for q in ex.queries[direction]))
                query = (self._thumb(th0, qid, 128) if image_query
                         else f'<div class="report">{esc(self._text(ex0, qid, 320))}</div>')
                rows.append(f'<tr><th scope="row">{query}<div class="src">item {esc(qid)}</div></th>{"".join(cols)}</tr>')
            out.append(f"<h3>{esc(title)}</h3><div class=\"tbl\"><table class=\"retrieval {direction}\"><thead><tr>"
                       f"<th>query</th>{heads}</tr></thead><tbody>{''.join(rows)}</tbody></table></div>")
        first = loaded[0][1]
        out.insert(0, f'<p class="cap">Queries spread evenly over the {esc(_known(first.n_test))} test '
                      f"pairs; the top {esc(first.k)} candidates of each, with cosine similarity. "
                      f'<span class="hitkey">✓ green</span>: the true match (a repeated report counts).</p>')
        return "".join(out)

    @staticmethod
    def _text(ex: Examples, item: str, n: int) -> str:
        t = ex.report(item)
        return t if len(t) <= n else t[: n - 1].rsplit(" ", 1)[0] + " …"

    @staticmethod
    def _thumb(thumbs: dict, item: str, width: int, cls: str = "") -> str:
        if item not in thumbs:
            return f'<div class="nothumb" style="width:{width}px;height:{width}px">image not available</div>'
        return img(thumbs[item], f"item {item}", cls=f"thumb {cls}", width=width)

    def _answers(self, reports: bool, q: Query, ex: Examples, thumbs: dict) -> str:
        """One query's top candidates: reports (an image's query), or thumbnails (a report's)."""
        tail = "" if q.hit else f'<div class="miss">true match at rank {esc(_known(q.true_rank))}</div>'
        if reports:
            items = "".join(f'<li class="{"hit" if c.true else ""}"><span class="score">{c.score:.3f}</span>'
                            f'{"<b>✓</b> " if c.true else ""}{esc(self._text(ex, c.id, TEXT_CHARS))}</li>'
                            for c in q.top)
            return f'<ol class="answers">{items}</ol>{tail}'
        items = "".join(f'<figure class="{"hit" if c.true else ""}">{self._thumb(thumbs, c.id, self._strip_px)}'
                        f'<figcaption>{i + 1}. {c.score:.3f}{" ✓" if c.true else ""}</figcaption></figure>'
                        for i, c in enumerate(q.top))
        return f'<div class="strip">{items}</div>{tail}'

    # --------------------------------------------------------------------- data card
    def data_card(self) -> str:
        cards: dict[str, DataCard] = {}
        for r in self.runs.evals:
            c = r.record.data_card
            if c is not None and c.items >= (cards[r.dataset].items if r.dataset in cards else -1):
                cards[r.dataset] = c
        out = []
        lacking = [r.label for r in self.runs.evals if r.record.data_card is None]
        if lacking:
            out.append(note(f"No data card recorded by {', '.join(lacking)} (runs made before data cards were "
                            "recorded)."))
        if not self.runs.evals:
            out.append(note("No evaluation runs: no data card."))
        for dataset, c in cards.items():
            out.append(f"<h3>{esc(dataset)}</h3><p class=\"cap\"><code>{esc(c.spec)}</code> · "
                       f"{esc(c.description or 'no description recorded')}</p><div class=\"grid2\">")
            rows = [[s, f"{n:,}"] for s, n in c.splits.items()] + [["all", f"{sum(c.splits.values()):,}"]]
            out.append(f"<div><h4>Items evaluated per split</h4>{simple_table(['split', 'items'], rows)}</div>")
            names = list(c.splits)
            if c.prevalence:
                rows = [[lab] + [self._prev(by_split.get(s)) for s in names] for lab, by_split in c.prevalence.items()]
                out.append(f"<div><h4>Label prevalence</h4>{simple_table(['label', *names], rows)}</div>")
            else:
                out.append(f"<div><h4>Label prevalence</h4>{note('No 0/1 labels.')}</div>")
            out.append("</div>")
            if c.labels_not_binary:
                out.append(note(f"Labels not 0/1 (not shown): {', '.join(c.labels_not_binary)}."))
            out.append(self._agreement(c.report_agreement))
            out.append(self._failures(c.failures))
        return "".join(out)

    @staticmethod
    def _prev(v: Prevalence | None) -> str:
        if v is None or not v.known:
            return "–"
        return f"{100 * v.positive / v.known:.1f}% ({v.positive:,}/{v.known:,})"

    @staticmethod
    def _agreement(a: dict | None) -> str:
        if not a:
            return "<h4>Label–report agreement</h4>" + note("Not measured for this dataset (the demo records it).")
        findings = [f for f in a.get("mentioned", {}) if f != "all"] + ["all"]
        rows = [[f, _share(a["mentioned"].get(f)), _share(a["hedged"].get(f)), _share(a["contradicted"].get(f)),
                 _share(a["false_mention"].get(f)), _share(a["negated"].get(f)),
                 f"{a['positives'].get(f, 0):,} / {a['negatives'].get(f, 0):,}"] for f in findings]
        return ("<h4>Label–report agreement</h4><p class=\"cap\">Of the positives: how many reports mention the "
                "finding, only hedge it, or negate it; of the negatives: how many reports still mention it, or "
                "negate it.</p>" + simple_table(["finding", "mentioned", "only hedged", "negated", "false mention",
                                                 "negated (negatives)", "positives / negatives"], rows))

    @staticmethod
    def _failures(f: Failures) -> str:
        if not f.count:
            return "<h4>Failures</h4>" + note("No item of this dataset failed to embed.", "ok")
        rows = [[x.reason, x.modality, f"{x.count:,}", ", ".join(x.items)] for x in f.reasons]
        return (f"<h4>Failures</h4><p class=\"cap\">{f.count:,} item(s) could not be embedded and are not "
                f"evaluated.</p>" + simple_table(["reason", "modality", "items", "e.g."], rows))

    # -------------------------------------------------------------------- provenance
    def provenance(self) -> str:
        out = []
        rows = [self._provenance_row(r) for r in self.runs.evals]
        if rows:
            out.append(simple_table(["run", "task", "created", "checkpoint", "cache fingerprints", "config hash",
                                     "command"], rows, cls="plain prov", raw=True))
        for t in self.runs.trainings:
            out.append(f"<p class=\"cap\">Adaptor training <b>{esc(t.label)}</b> ({esc(t.path)}): "
                       f"<code>{esc(t.provenance.command or 'command not recorded')}</code></p>")
        out.append(self._versions())
        configs = "".join(
            f"<details><summary>config of {esc(r.label)}</summary><pre>{esc(self._yaml(r.record.config))}"
            f"</pre></details>" for r in self.runs.evals)
        configs += "".join(f"<details><summary>config of the Adaptor training {esc(t.label)}</summary>"
                           f"<pre>{esc(self._yaml(t.config))}</pre></details>" for t in self.runs.trainings)
        return "".join(out) + f'<h4>Configs</h4><div class="configs">{configs}</div>'

    @staticmethod
    def _provenance_row(r: EvalRun) -> list[str]:
        rec, ck = r.record, r.record.checkpoint
        ckpt = (f"{ck.hash[:16]} · {ck.mode} mode · epoch {_known(ck.epoch)}" if ck else "none (frozen features)")
        fps = " · ".join(f"{k} {v[:16]}" for k, v in rec.fingerprints.items())
        created = (rec.created or "–").replace("T", " ")[:16]
        return [f"<b>{esc(r.label)}</b><br><span class=\"src\">{esc(r.path)}</span>",
                f'<span class="nw">{esc(rec.task)}</span>', f'<span class="nw">{esc(created)}</span>',
                esc(ckpt), esc(fps), esc((rec.config_hash or "–")[:16]),
                f"<code>{esc(rec.provenance.command or 'not recorded')}</code>"]

    @staticmethod
    def _yaml(d) -> str:
        return yaml.safe_dump(d or {}, sort_keys=False, allow_unicode=True, default_flow_style=None).strip()

    def _versions(self) -> str:
        recorded = [(r.label, r.record.provenance) for r in self.runs.evals]
        recorded += [(t.label, t.provenance) for t in self.runs.trainings]
        recorded = [(lab, p) for lab, p in recorded if p.versions]
        if not recorded:
            return note("No versions recorded by these runs.")
        keys = list(dict.fromkeys(k for _, p in recorded for k in p.versions))
        rows = []
        for k in keys:
            seen = list(dict.fromkeys(p.versions.get(k, "–") for _, p in recorded))
            rows.append([k, seen[0] if len(seen) == 1 else " | ".join(
                f"{lab}: {p.versions.get(k, '–')}" for lab, p in recorded)])
        sources = list(dict.fromkeys(p.source or "not a git checkout" for _, p in recorded))
        rows.append(["source tree", " | ".join(sources)])
        return "<h4>Versions</h4>" + simple_table(["", "version"], rows)

def _auroc(y: np.ndarray, s: np.ndarray) -> float:
    known = ~np.isnan(y)
    return float(auroc(y[known], s[known]))


def build_page(runs: Runs, title: str = "freeze-pipe report") -> str:
    return Page(runs, title).render()


def write_page(runs: Runs, path: Path, title: str = "freeze-pipe report") -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, build_page(runs, title))
    return path

