"""One self-contained HTML page for one or several runs: `pipe report RUN... --html report.html`.

Everything is inside the file: styles inline, pictures as ``data:`` URIs, no script, no
font, nothing fetched (a Content-Security-Policy says so to the browser too). Every text
that comes from a run (names, paths, reports, configs) is HTML-escaped. A section whose
data the runs lack says so in one line. Several runs share each section: their tables are
merged, their curves drawn on the same axes, their examples set side by side.
"""
from __future__ import annotations

import html
import re
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import yaml

from core.atomic import atomic_write_text
from stages.evaluate.metrics import auroc
from stages.evaluate.tables import merge_tables, pct
from stages.report import figures as F
from stages.report.runs import EvalRun, Runs, TrainRun

TASK_ORDER = ("classification", "segmentation", "retrieval", "zero-shot")
PRIMARY = {"classification": {"auroc", "macro_auroc", "accuracy", "macro_f1", "ece"},
           "segmentation": {"dice_positive", "dice_empty_is_one"}}
LOWER_IS_BETTER = {"ece"}
SPLITS = ("train", "valid", "test")
TEXT_CHARS = 220   # of a report shown in a retrieval list


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


def _centre(row: dict, col: str) -> float | None:
    """A cell's point estimate (a fraction), from its figures or, for fixed rows (chance), its text."""
    v = (row.get("values") or {}).get(col) or {}
    x = v.get("mean", v.get("value"))
    if x is None:
        try:
            x = float(row["cells"].get(col, "")) / 100
        except ValueError:
            return None
    return x if np.isfinite(x) else None


def short_name(method: str) -> str:
    """A method's name without its encoders: "Adaptor, pooled", "no Adaptor", "least-squares map", ..."""
    m = re.match(r"Adaptor \((\w+)\)", method)
    if m and "raw patch tokens" in method:  # a pooled Adaptor's segmentation row decodes the raw tokens
        return f"{m[1]}: raw tokens"
    if m:
        return f"Adaptor, {m[1]}" + ("+ITM" if "ITM re-rank" in method else "")
    for prefix, name in (("no Adaptor", "no Adaptor"), ("native joint space", "native joint space"),
                         ("linear map", "least-squares map"),
                         ("all-empty", "all-empty predictor"), ("chance", "chance")):
        if method.startswith(prefix):
            return name
    return method if len(method) < 40 else method[:38] + "…"


def _rank(method: str) -> int:
    """Row order of a results table: ours, then the references, then the fixed predictors."""
    if method.startswith("Adaptor"):
        return 0
    return 2 if method.startswith(("all-empty", "chance")) else 1


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
        nav = "".join(f'<a href="#{sid}">{esc(title.split(":")[0])}</a>' for sid, title, _ in sections)
        body = "".join(f'<section id="{sid}"><h2>{esc(title)}</h2>{content}</section>'
                       for sid, title, content in sections)
        return (f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
                f"<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; img-src data:; "
                f"style-src 'unsafe-inline'\">"
                f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
                f"<title>{esc(self.title)}</title><style>{CSS}</style></head><body>"
                f"<header>{self.header()}<nav>{nav}</nav></header><main>{body}</main>"
                f"<footer>Written by <code>pipe report</code> · freeze-pipe {esc(self._version())} · "
                f"{esc(time.strftime('%Y-%m-%d %H:%M'))} · one file: no script, nothing fetched</footer>"
                f"</body></html>\n")

    def _version(self) -> str:
        for r in self.runs.evals:
            v = ((r.results.get("provenance") or {}).get("versions") or {}).get("freeze-pipe")
            if v:
                return v
        from pipeline.provenance import versions  # lazy: only when no run recorded it

        return versions().get("freeze-pipe", "?")

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
        tables = merge_tables([r.results for r in evals], [r.label for r in evals])
        by_task = defaultdict(list)
        for t in tables:
            by_task[t["title"].split(" · ")[0]].append(t)
        out = [self._glance(by_task)]
        for task in sorted(by_task, key=lambda k: TASK_ORDER.index(k) if k in TASK_ORDER else 99):
            # each table says what its cells and intervals are (pipeline.tables.interval_note)
            cells = next((t["note"] for t in by_task[task] if t.get("note")), "Cells: value [interval].")
            main = [t for t in by_task[task] if task not in PRIMARY or t.get("metric") in PRIMARY[task]]
            more = [t for t in by_task[task] if t not in main]
            out.append(f'<h3>{esc(task.capitalize())}</h3><p class="cap">{esc(cells)} In %. <b>Bold</b>: the best '
                       f'in its column. Rows in grey are references: no Adaptor, the least-squares map, the '
                       f'all-empty predictor, chance.</p>')
            out.append('<div class="tables">' + "".join(self._table(t) for t in main) + "</div>")
            if more:
                inner = "".join(self._table(t) for t in more)
                out.append(f"<details><summary>{len(more)} more {esc(task)} table{'s' * (len(more) > 1)} "
                           f"({esc(', '.join(self._short(t) for t in more))})</summary>{inner}</details>")
        notes = list(dict.fromkeys(f"{r.label}: {n}" for r in evals for n in r.results.get("notes") or []))
        if notes:
            items = "".join(f"<li>{esc(n)}</li>" for n in notes)
            out.append(f'<details class="notes"><summary>Notes the runs recorded ({len(notes)})</summary>'
                       f"<ul>{items}</ul></details>")
        return "".join(out)

    GLANCE = {"classification": ("macro_auroc", "auroc", "accuracy"), "segmentation": ("dice_positive",),
              "retrieval": ("recall",), "zero-shot": ("auroc",)}
    GLANCE_COLUMN = {"retrieval": "image→text R@5", "zero-shot": "macro"}

    def _glance(self, by_task: dict) -> str:
        """One tile per task: its headline figure for every method, as bars (plain HTML)."""
        tiles = []
        for task in sorted(by_task, key=lambda k: TASK_ORDER.index(k) if k in TASK_ORDER else 99):
            t = next((t for key in self.GLANCE.get(task, ()) for t in by_task[task] if t.get("metric") == key), None)
            if t is None or not t["columns"]:
                continue
            col = self.GLANCE_COLUMN.get(task, t["columns"][-1])
            col = col if col in t["columns"] else t["columns"][-1]
            bars = []
            for r in sorted(t["rows"], key=lambda r: _rank(r["method"])):
                x = _centre(r, col)
                if x is None:
                    continue
                bars.append(f'<div class="bar"><span class="name">{swatch(self.palette(r["method"]))}'
                            f'{esc(short_name(r["method"]))}</span><span class="track"><span class="fill" style="'
                            f'width:{max(0.0, min(100.0, 100 * x)):.1f}%;background:{self.palette(r["method"])}">'
                            f'</span></span><span class="num">{esc(pct(x))}</span></div>')
            what = " · ".join(t["title"].split(" · ")[1:-1]).replace(" (%)", "")
            where = col if task in self.GLANCE_COLUMN else f"{col} labels"
            tiles.append(f'<div class="tile"><div class="tt">{esc(task.capitalize())}</div><div class="ts">'
                         f"{esc(what)} · {esc(where)}</div>{''.join(bars)}</div>")
        return f'<div class="glance">{"".join(tiles)}</div>' if tiles else ""

    @staticmethod
    def _short(t: dict) -> str:
        parts = t["title"].split(" · ")
        return " · ".join(parts[1:-1]).replace(" (%)", "") or t["title"]

    def _table(self, t: dict) -> str:
        parts = t["title"].split(" · ")
        title, dataset = " · ".join(parts[1:-1]) or parts[0], parts[-1]
        cols, lower = t["columns"], t.get("metric") in LOWER_IS_BETTER
        centre = {}
        for i, r in enumerate(t["rows"]):
            for c in cols:
                v = (r.get("values") or {}).get(c) or {}
                x = v.get("mean", v.get("value"))
                if x is not None and np.isfinite(x):
                    centre[(i, c)] = x
        best = {}
        for c in cols:
            xs = [x for (i, cc), x in centre.items() if cc == c]
            if len(xs) > 1:
                best[c] = min(xs) if lower else max(xs)
        seeds = sorted({v.get("n_seeds") for r in t["rows"] for v in (r.get("values") or {}).values()
                        if isinstance(v, dict) and v.get("n_seeds")})
        head = "".join(f"<th>{esc(c)}</th>" for c in cols)
        rows = []
        for i in sorted(range(len(t["rows"])), key=lambda i: (_rank(t["rows"][i]["method"]), i)):
            r = t["rows"][i]
            method = r["method"]
            ours = method.startswith("Adaptor")
            cells = []
            for c in cols:
                v = (r.get("values") or {}).get(c) or {}
                is_best = (i, c) in centre and best.get(c) == centre[(i, c)]
                cells.append(f'<td class="{"best" if is_best else ""}">{self._cell(v, r["cells"].get(c, ""))}</td>')
            rows.append(f'<tr class="{"ours" if ours else "ref"}"><th scope="row">{swatch(self.palette(method))}'
                        f"{esc(method)}</th>{''.join(cells)}</tr>")
        seed_note = f" · {', '.join(map(str, seeds))} seed{'s' * (seeds != [1])} per cell" if seeds else ""
        better = " · lower is better" if lower else ""
        return (f'<div class="tbl"><table class="results"><caption>{esc(title)}<span class="ds">'
                f"{esc(dataset)}{esc(seed_note)}{esc(better)}</span></caption><thead><tr><th>method</th>{head}</tr>"
                f"</thead><tbody>{''.join(rows)}</tbody></table></div>")

    @staticmethod
    def _cell(v: dict, text: str) -> str:
        x = v.get("mean", v.get("value")) if v else None
        if x is None or not np.isfinite(x):
            return f'<span class="na">{esc(text or "n/a")}</span>'
        out = f'<span class="v">{esc(pct(x))}</span>'
        if v.get("n_seeds", 1) > 1 and v.get("std") is not None:
            out += f'<span class="pm"> ± {esc(pct(v["std"]))}</span>'
        ci = v.get("ci")
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
            legend = "".join(f'<span class="key">{swatch(self.palette(t.method))}{esc(t.method)} '
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
        return [f"{swatch(self.palette(t.method))}{esc(t.method)}<br><span class=\"src\">{esc(t.label)}</span>",
                esc(f"{last['epoch']:g}"), esc(t.config.get("batch_size", "–")), esc(best), esc(recall),
                esc(f"{sum(secs):.1f} s" if secs else "–"), esc(f"{np.mean(secs):.2f}" if secs else "–"),
                esc(f"{np.mean(sps):,.0f}" if sps else "–"), esc(f"{mem:,.0f} MiB" if mem else "–")]

    # ------------------------------------------------------------ ROC and calibration
    def _score_sets(self, task: str) -> tuple[dict, list[str]]:
        """{dataset: {"labels": [...], "methods": {name: (y, scores, what)}}} of the task's runs, and
        one line per run that saved no scores."""
        groups: dict[str, dict] = {}
        missing = []
        for r in [r for r in self.runs.evals if r.task == task]:
            z = r.npz("predictions")
            if z is None:
                missing.append(f"{r.label}: no per-item test scores saved (predictions.npz); re-run `pipe evaluate` "
                               "to get its ROC curves.")
                continue
            g = groups.setdefault(r.dataset, {"labels": [str(x) for x in z["label_names"]], "methods": {}, "what": ""})
            for mi, m in enumerate(r.results.get("methods") or []):
                key, what = self._score_key(r, mi, m, z)
                if key is None or m["name"] in g["methods"]:
                    continue
                g["methods"][m["name"]] = (z["y"], z[key])
                g["what"] = g["what"] or what
        return groups, missing

    @staticmethod
    def _score_key(r: EvalRun, mi: int, m: dict, z: dict) -> tuple[str | None, str]:
        if r.task == "zero-shot":
            return (f"m{mi}" if f"m{mi}" in z else None), "test split"
        heads = m.get("heads") or {}
        kinds = (r.results.get("config", {}).get("heads") or {}).get("kinds") or list(heads)
        kind = next((k for k in kinds if k in heads), None)
        if kind is None or not heads[kind]:
            return None, ""
        fl = max(heads[kind], key=lambda c: float(c.rstrip("%")))
        seed = heads[kind][fl]["runs"][0]["seed"]
        key = f"m{mi}/{kind}/{fl}/seed{seed}"
        return (key if key in z else None), f"{kind} head · {fl} labels · seed {seed} · test split"

    def _score_cards(self, task: str, calibrated: bool) -> str:
        runs = [r for r in self.runs.evals if r.task == task]
        if not runs:
            return note(f"No {task} runs among these runs.")
        groups, missing = self._score_sets(task)
        out = [note(m) for m in missing]
        for dataset, g in groups.items():
            methods = dict(sorted(g["methods"].items(), key=lambda kv: _rank(kv[0])))  # ours first
            legend = "".join(f'<span class="key">{swatch(self.palette(n))}{esc(n)}</span>' for n in methods)
            cards = []
            for j, label in enumerate(g["labels"]):
                curves = [(n, self.palette(n), y[:, j], s[:, j]) for n, (y, s) in methods.items()]
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
        if not any(r.task == "zero-shot" for r in self.runs.evals):
            return note("No zero-shot runs among these runs.")
        return (note("No reliability diagram: zero-shot scores are differences of cosine similarities, not "
                     "probabilities.", "info") + self._score_cards("zero-shot", calibrated=False))

    # ------------------------------------------------------------------ segmentation
    def segmentation(self) -> str:
        runs = [r for r in self.runs.evals if r.task == "segmentation"]
        if not runs:
            return note("No segmentation runs among these runs.")
        out = []
        for r in runs:
            z = r.npz("overlays")
            if z is None:
                out.append(note(f"{r.label}: no overlay cases saved (overlays.npz); re-run `pipe evaluate` to "
                                "get them."))
                continue
            info = (r.results.get("data") or {}).get("overlays") or {}
            target = (r.results.get("data") or {}).get("target", "mask")
            names = [str(n) for n in z["method_names"]]
            head = "".join(f'<th class="pred">{swatch(self.palette(n))}prediction<br><span class="src">{esc(n)}</span>'
                           f"</th>" for n in names)
            rows = []
            for i, (item, kind) in enumerate(zip(z["ids"], z["kind"])):
                preds = "".join(
                    f"<td>{img(F.overlay_png(z['image'][i], z[f'pred{mi}'][i], F.PREDICTION, outline=z['true'][i]), 'prediction')}"
                    f'<div class="dice">Dice {float(z[f"dice{mi}"][i]):.2f}</div></td>' for mi in range(len(names)))
                rows.append(f'<tr><th scope="row"><span class="tag {esc(kind)}">{esc(kind)}</span><br>'
                            f"item {esc(item)}<br>{int(z['true'][i].sum()):,} px true</th>"
                            f"<td>{img(F.plain_png(z['image'][i]), 'image')}</td>"
                            f"<td>{img(F.overlay_png(z['image'][i], z['true'][i], F.TRUTH), 'true mask')}</td>"
                            f"{preds}</tr>")
            cap = (f"{r.label} · {target} · {info.get('fraction', '?')} labels, seed {info.get('seed', '?')}, "
                   f"threshold {info.get('threshold', '?')} · test images with a {target} mask, best and worst by "
                   f"Dice of {info.get('chosen_by', names[0] if names else '?')} · truth in green, prediction in red "
                   "(with the true outline)")
            out.append(f'<p class="cap">{esc(cap)}</p><div class="tbl"><table class="cases"><thead><tr><th></th>'
                       f"<th>image</th><th>truth</th>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table></div>")
        return "".join(out)

    # --------------------------------------------------------------------- retrieval
    def retrieval(self) -> str:
        runs = [r for r in self.runs.evals if r.task == "retrieval"]
        if not runs:
            return note("No retrieval runs among these runs.")
        out, loaded = [], []
        for r in runs:
            ex = r.json("examples")
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
        heads = "".join(f"<th>{swatch(self.palette(ex['method']))}{esc(ex['method'])}<br>"
                        f'<span class="src">{esc(r.label)}</span></th>' for r, ex, _ in loaded)
        for direction, title in (("image_to_text", "An image, and the reports ranked first for it"),
                                 ("text_to_image", "A report, and the images ranked first for it")):
            queries = list(dict.fromkeys(q["query"] for _, ex, _ in loaded for q in ex.get(direction, [])))
            rows = []
            for qid in queries:
                cols = []
                for r, ex, thumbs in loaded:
                    q = next((q for q in ex.get(direction, []) if q["query"] == qid), None)
                    cols.append("<td></td>" if q is None else f"<td>{self._answers(direction, q, ex, thumbs)}</td>")
                ex0, th0 = next((ex, th) for _, ex, th in loaded if any(q["query"] == qid for q in ex[direction]))
                query = (self._thumb(th0, qid, 128) if direction == "image_to_text"
                         else f'<div class="report">{esc(self._text(ex0, qid, 320))}</div>')
                rows.append(f'<tr><th scope="row">{query}<div class="src">item {esc(qid)}</div></th>{"".join(cols)}</tr>')
            out.append(f"<h3>{esc(title)}</h3><div class=\"tbl\"><table class=\"retrieval {direction}\"><thead><tr>"
                       f"<th>query</th>{heads}</tr></thead><tbody>{''.join(rows)}</tbody></table></div>")
        k = loaded[0][1].get("k", 5)
        out.insert(0, f'<p class="cap">Queries spread evenly over the {esc(loaded[0][1].get("n_test", "?"))} test '
                      f"pairs; the top {esc(k)} candidates of each, with cosine similarity. "
                      f'<span class="hitkey">✓ green</span>: the true match (a repeated report counts).</p>')
        return "".join(out)

    @staticmethod
    def _text(ex: dict, item: str, n: int) -> str:
        t = str((ex.get("reports") or {}).get(item, "(report not saved)"))
        return t if len(t) <= n else t[: n - 1].rsplit(" ", 1)[0] + " …"

    @staticmethod
    def _thumb(thumbs: dict, item: str, width: int, cls: str = "") -> str:
        if item not in thumbs:
            return f'<div class="nothumb" style="width:{width}px;height:{width}px">image not available</div>'
        return img(thumbs[item], f"item {item}", cls=f"thumb {cls}", width=width)

    def _answers(self, direction: str, q: dict, ex: dict, thumbs: dict) -> str:
        tail = ("" if any(c["true"] for c in q["top"]) else
                f'<div class="miss">true match at rank {esc(q.get("true_rank", "?"))}</div>')
        if direction == "image_to_text":
            items = "".join(f'<li class="{"hit" if c["true"] else ""}"><span class="score">{c["score"]:.3f}</span>'
                            f'{"<b>✓</b> " if c["true"] else ""}{esc(self._text(ex, c["id"], TEXT_CHARS))}</li>'
                            for c in q["top"])
            return f'<ol class="answers">{items}</ol>{tail}'
        items = "".join(f'<figure class="{"hit" if c["true"] else ""}">{self._thumb(thumbs, c["id"], self._strip_px)}'
                        f'<figcaption>{i + 1}. {c["score"]:.3f}{" ✓" if c["true"] else ""}</figcaption></figure>'
                        for i, c in enumerate(q["top"]))
        return f'<div class="strip">{items}</div>{tail}'

    # --------------------------------------------------------------------- data card
    def data_card(self) -> str:
        cards: dict[str, dict] = {}
        for r in self.runs.evals:
            c = r.results.get("data_card")
            if c and c.get("items", 0) >= cards.get(r.dataset, {}).get("items", -1):
                cards[r.dataset] = c
        out = []
        lacking = [r.label for r in self.runs.evals if not r.results.get("data_card")]
        if lacking:
            out.append(note(f"No data card recorded by {', '.join(lacking)} (runs made before data cards were "
                            "recorded)."))
        if not self.runs.evals:
            out.append(note("No evaluation runs: no data card."))
        for dataset, c in cards.items():
            out.append(f"<h3>{esc(dataset)}</h3><p class=\"cap\"><code>{esc(c.get('spec', ''))}</code> · "
                       f"{esc(c.get('description') or 'no description recorded')}</p><div class=\"grid2\">")
            splits = c.get("splits") or {}
            rows = [[s, f"{n:,}"] for s, n in splits.items()] + [["all", f"{sum(splits.values()):,}"]]
            out.append(f"<div><h4>Items evaluated per split</h4>{simple_table(['split', 'items'], rows)}</div>")
            prev = c.get("prevalence") or {}
            names = list(splits)
            if prev:
                rows = [[lab] + [self._prev(v.get(s)) for s in names] for lab, v in prev.items()]
                out.append(f"<div><h4>Label prevalence</h4>{simple_table(['label', *names], rows)}</div>")
            else:
                out.append(f"<div><h4>Label prevalence</h4>{note('No 0/1 labels.')}</div>")
            out.append("</div>")
            if c.get("labels_not_binary"):
                out.append(note(f"Labels not 0/1 (not shown): {', '.join(c['labels_not_binary'])}."))
            out.append(self._agreement(c.get("report_agreement")))
            out.append(self._failures(c.get("failures") or {}))
        return "".join(out)

    @staticmethod
    def _prev(v: dict | None) -> str:
        if not v or not v.get("known"):
            return "–"
        return f"{100 * v['positive'] / v['known']:.1f}% ({v['positive']:,}/{v['known']:,})"

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
    def _failures(f: dict) -> str:
        if not f.get("count"):
            return "<h4>Failures</h4>" + note("No item of this dataset failed to embed.", "ok")
        rows = [[x["reason"], x["modality"], f"{x['count']:,}", ", ".join(x["items"])] for x in f.get("reasons", [])]
        return (f"<h4>Failures</h4><p class=\"cap\">{f['count']:,} item(s) could not be embedded and are not "
                f"evaluated.</p>" + simple_table(["reason", "modality", "items", "e.g."], rows))

    # -------------------------------------------------------------------- provenance
    def provenance(self) -> str:
        out = []
        rows = []
        for r in self.runs.evals:
            res, prov = r.results, r.results.get("provenance") or {}
            ck = res.get("checkpoint")
            ckpt = (f"{ck.get('hash', '')[:16]} · {ck.get('mode', '?')} mode · epoch {ck.get('epoch', '?')}"
                    if ck else "none (frozen features)")
            fps = " · ".join(f"{k} {v[:16]}" for k, v in (res.get("fingerprints") or {}).items())
            created = str(res.get("created", "–")).replace("T", " ")[:16]
            rows.append([f"<b>{esc(r.label)}</b><br><span class=\"src\">{esc(r.path)}</span>",
                         f'<span class="nw">{esc(res.get("task"))}</span>', f'<span class="nw">{esc(created)}</span>',
                         esc(ckpt), esc(fps),
                         esc(str(res.get("config_hash", "–"))[:16]),
                         f"<code>{esc(prov.get('command') or 'not recorded')}</code>"])
        if rows:
            out.append(simple_table(["run", "task", "created", "checkpoint", "cache fingerprints", "config hash",
                                     "command"], rows, cls="plain prov", raw=True))
        for t in self.runs.trainings:
            prov = t.provenance or {}
            out.append(f"<p class=\"cap\">Adaptor training <b>{esc(t.label)}</b> ({esc(t.path)}): "
                       f"<code>{esc(prov.get('command') or 'command not recorded')}</code></p>")
        out.append(self._versions())
        configs = "".join(
            f"<details><summary>config of {esc(r.label)}</summary><pre>{esc(self._yaml(r.results.get('config')))}"
            f"</pre></details>" for r in self.runs.evals)
        configs += "".join(f"<details><summary>config of the Adaptor training {esc(t.label)}</summary>"
                           f"<pre>{esc(self._yaml(t.config))}</pre></details>" for t in self.runs.trainings)
        return "".join(out) + f'<h4>Configs</h4><div class="configs">{configs}</div>'

    @staticmethod
    def _yaml(d) -> str:
        return yaml.safe_dump(d or {}, sort_keys=False, allow_unicode=True, default_flow_style=None).strip()

    def _versions(self) -> str:
        recorded = [(r.label, (r.results.get("provenance") or {})) for r in self.runs.evals]
        recorded += [(t.label, t.provenance or {}) for t in self.runs.trainings]
        recorded = [(lab, p) for lab, p in recorded if p.get("versions")]
        if not recorded:
            return note("No versions recorded by these runs.")
        keys = list(dict.fromkeys(k for _, p in recorded for k in p["versions"]))
        rows = []
        for k in keys:
            seen = list(dict.fromkeys(p["versions"].get(k, "–") for _, p in recorded))
            rows.append([k, seen[0] if len(seen) == 1 else " | ".join(
                f"{lab}: {p['versions'].get(k, '–')}" for lab, p in recorded)])
        sources = list(dict.fromkeys(p.get("source") or "not a git checkout" for _, p in recorded))
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


CSS = """
:root{--fg:#1f2328;--muted:#59636e;--line:#d1d9e0;--soft:#f6f8fa;--accent:#1f6feb;--hit:#dafbe1;--hitline:#2da44e}
*{box-sizing:border-box}
body{margin:0;font:14px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;color:var(--fg);
background:#eef1f4}
header{background:linear-gradient(135deg,#0d1b2a,#1b3a5c);color:#fff;padding:22px 32px 0}
header h1{margin:0;font-size:24px;letter-spacing:.2px}
header .sub{margin:2px 0 0;color:#c9d6e3;font-size:15px}
header .facts{margin:6px 0 10px;color:#9fb3c8;font-size:13px}
.chips{display:flex;flex-wrap:wrap;gap:6px;margin-bottom:14px}
.chip{background:rgba(255,255,255,.12);border-radius:12px;padding:2px 10px;font-size:12px;color:#e6edf3}
.chip b{color:#fff;font-weight:600}.chip.train{background:rgba(255,196,0,.18)}
nav{display:flex;gap:2px;flex-wrap:wrap}
nav a{color:#c9d6e3;text-decoration:none;padding:8px 12px;font-size:13px;border-radius:6px 6px 0 0}
nav a:hover{background:#eef1f4;color:#0d1b2a}
main{max-width:1240px;margin:0 auto;padding:18px 24px 8px}
section{background:#fff;border:1px solid var(--line);border-radius:10px;padding:18px 24px;margin:0 0 18px}
h2{margin:0 0 10px;font-size:19px;border-bottom:2px solid var(--soft);padding-bottom:6px}
h3{margin:20px 0 4px;font-size:15.5px}
h4{margin:14px 0 6px;font-size:13.5px;color:var(--muted);text-transform:uppercase;letter-spacing:.4px}
.cap{color:var(--muted);margin:2px 0 10px;font-size:13px}
.ok{color:#116329;background:#dafbe1;border-left:3px solid #2da44e;padding:5px 10px;margin:6px 0;font-size:13px;
border-radius:0 4px 4px 0}
.info{color:#31383f;background:var(--soft);border-left:3px solid #8c959f;padding:5px 10px;margin:6px 0;
font-size:13px;border-radius:0 4px 4px 0}
.missing{color:#7d4e00;background:#fff8c5;border-left:3px solid #d4a72c;padding:5px 10px;margin:6px 0;
font-size:13px;border-radius:0 4px 4px 0}
.tbl{overflow-x:auto;margin:6px 0 14px}
table{border-collapse:collapse;font-size:13px}
table.results{width:100%}
.tables{display:grid;grid-template-columns:repeat(auto-fit,minmax(520px,1fr));gap:0 28px}
.glance{display:grid;grid-template-columns:repeat(auto-fit,minmax(260px,1fr));gap:12px;margin:4px 0 10px}
.tile{border:1px solid var(--line);border-radius:8px;padding:10px 12px;background:linear-gradient(#fbfcfd,#fff)}
.tile .tt{font-weight:700;font-size:14px}.tile .ts{color:var(--muted);font-size:12px;margin-bottom:6px}
.bar{display:grid;grid-template-columns:146px 1fr 36px;align-items:center;gap:6px;font-size:12px;margin:3px 0}
.bar .name{white-space:nowrap;overflow:hidden;text-overflow:ellipsis}
.bar .track{background:#eef1f4;border-radius:3px;height:10px;overflow:hidden}
.bar .fill{display:block;height:10px;border-radius:3px}
.bar .num{text-align:right;font-variant-numeric:tabular-nums;font-weight:600}
table.results caption{text-align:left;font-weight:600;padding:4px 0 6px;font-size:13.5px}
table.results caption .ds{font-weight:400;color:var(--muted);margin-left:8px;font-size:12px}
th,td{padding:6px 10px;border-bottom:1px solid var(--line);vertical-align:top}
thead th{background:var(--soft);text-align:left;font-weight:600;font-size:12.5px;color:#31383f;
border-bottom:1px solid var(--line)}
table.results td{text-align:right;white-space:nowrap;font-variant-numeric:tabular-nums}
table.results thead th:not(:first-child){text-align:right}
table.results tbody th{text-align:left;font-weight:500;max-width:430px}
tr.ours th{font-weight:600}tr.ours{background:#f3f8ff}
tr.ref th,tr.ref td{color:#57606a}
td .v{font-size:14px}td .pm{color:var(--muted);font-size:12px}
td .ci{display:block;color:#8c959f;font-size:11px}
td.best .v{font-weight:700;color:#0b4fbf}tr.ref td.best .v{color:#1f2328}
.na{color:#8c959f}
.sw{display:inline-block;width:10px;height:10px;border-radius:2px;margin-right:7px;vertical-align:baseline}
.src{color:#8c959f;font-size:11.5px;font-weight:400}
.legend{display:flex;flex-wrap:wrap;gap:14px;margin:4px 0 8px;font-size:12.5px}
figure{margin:0}figure.wide img{width:100%;height:auto}
.cards{display:grid;grid-template-columns:repeat(auto-fill,minmax(520px,1fr));gap:12px}
.card{border:1px solid var(--line);border-radius:8px;padding:8px 10px;background:#fff}
.card img{width:auto;max-width:100%;height:auto;display:block;margin:0 auto}
.cards.narrow{grid-template-columns:repeat(auto-fill,minmax(340px,1fr))}
.card figcaption{font-size:12.5px;margin-bottom:4px}.card figcaption b{margin-right:8px;font-size:13.5px}
.stat{margin-right:10px;color:var(--muted);white-space:nowrap}
table.cases td,table.cases th{text-align:center;vertical-align:middle}
table.cases tbody th{text-align:left;font-weight:400;font-size:12.5px;min-width:120px}
table.cases img{width:150px;height:150px;border-radius:4px;image-rendering:auto}
table.cases th.pred{max-width:210px;font-weight:600}
.dice{font-size:12px;color:var(--muted)}
.tag{display:inline-block;border-radius:10px;padding:0 8px;font-size:11.5px;font-weight:600}
.tag.best{background:var(--hit);color:#116329}.tag.worst{background:#ffebe9;color:#a40e26}
table.retrieval{width:100%}
table.retrieval tbody th{width:150px;font-weight:400;text-align:left}
table.retrieval .report{font-size:12.5px;background:var(--soft);border-radius:6px;padding:6px 8px}
table.retrieval.text_to_image tbody th{width:300px;min-width:260px}
ol.answers{margin:0;padding-left:20px;font-size:12.5px}
ol.answers li{padding:3px 6px;border-radius:4px;margin-bottom:2px}
ol.answers li.hit{background:var(--hit);outline:1px solid var(--hitline)}
.score{float:right;color:#8c959f;margin-left:8px;font-variant-numeric:tabular-nums}
.strip{display:flex;flex-wrap:wrap;gap:5px}.strip figure{text-align:center;font-size:11px;color:var(--muted)}
.strip figure.hit img{outline:3px solid var(--hitline)}.strip figure.hit figcaption{color:#116329;font-weight:600}
img.thumb{border-radius:4px;display:block}
.nothumb{background:var(--soft);color:#8c959f;font-size:11px;display:flex;align-items:center;justify-content:center}
.miss{color:#a40e26;font-size:12px;margin-top:2px}
.hitkey{background:var(--hit);padding:0 4px;border-radius:3px}
.grid2{display:grid;grid-template-columns:minmax(200px,1fr) 3fr;gap:24px}
table.plain{margin:4px 0 10px}
table.prov td{font-size:12px;max-width:360px;word-break:break-word}
.nw{white-space:nowrap}
.configs{display:flex;flex-wrap:wrap;gap:0 22px}.configs details{min-width:260px}.configs details[open]{flex-basis:100%}
code{font:12px/1.4 ui-monospace,"DejaVu Sans Mono",monospace;background:var(--soft);padding:1px 4px;border-radius:4px}
pre{font:12px/1.45 ui-monospace,"DejaVu Sans Mono",monospace;background:var(--soft);padding:10px;
border-radius:6px;overflow-x:auto;max-height:420px}
details{margin:8px 0}summary{cursor:pointer;color:var(--accent);font-size:13px}
footer{text-align:center;color:#8c959f;font-size:12px;padding:6px 0 24px}
@media print{header{background:#fff;color:#000}nav{display:none}section{break-inside:avoid}}
"""
