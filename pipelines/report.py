"""The run report: ``report.html`` and PNG plots (``report/``) next to a mining/distillation output, built from
the run's own tables (the candidates table, the training JSONL, the run manifest).

What it shows: positive vs chosen-negative score histograms (student and teacher) and the margin
lowest positive - negative; candidates removed per rule and queries dropped or rejected per reason; rows
in/out/rejected, seconds and rows/s per stage; a sample of queries with their positives and chosen negatives
to eyeball false negatives. Score plots read at most ``max_queries`` rows of the candidates table (the report
says how many), so a report over a billion-row run costs seconds, not a second pass.
"""

from __future__ import annotations

import dataclasses
import html
import io
import json
import posixpath
from dataclasses import dataclass, field

import numpy as np
import pyarrow.parquet as pq

from operators.storage import read_json, resolve

REPORT_HTML = "report.html"
PLOTS_DIR = "report"
SCORE_COLUMNS = ("pos_ids", "pos_scores", "teacher_pos_scores", "candidate_ids", "candidate_scores", "neg_ids",
                 "neg_scores")  # fmt: skip


@dataclass
class ScoreSeries:
    """Scores of the positives and of the chosen negatives, and margins (lowest positive - negative, one per
    chosen negative), for one scorer. Empty arrays when the scorer did not run."""

    pos: np.ndarray = field(default_factory=lambda: np.zeros(0))
    neg: np.ndarray = field(default_factory=lambda: np.zeros(0))
    margin: np.ndarray = field(default_factory=lambda: np.zeros(0))


def score_series(rows: list[dict]) -> tuple[ScoreSeries, ScoreSeries]:
    """Candidates-table rows -> (student, teacher) series. The student score of a chosen negative is its
    candidate score (the chosen negatives are candidates); its teacher score is ``neg_scores`` when a teacher
    rescored the run (``teacher_pos_scores`` present), else ``neg_scores`` are the student's."""
    sp, sn, sm, tp, tn, tm = [], [], [], [], [], []
    for r in rows:
        pos = list(r.get("pos_scores") or [])
        if not pos:
            continue
        teacher_pos = r.get("teacher_pos_scores")
        by_id = dict(zip(r.get("candidate_ids") or [], r.get("candidate_scores") or []))
        student_neg = [by_id[i] for i in (r.get("neg_ids") or []) if i in by_id]
        sp += pos
        sn += student_neg
        sm += [min(pos) - s for s in student_neg]
        if teacher_pos is not None and len(teacher_pos):
            teacher_neg = list(r.get("neg_scores") or [])
            tp += list(teacher_pos)
            tn += teacher_neg
            tm += [min(teacher_pos) - s for s in teacher_neg]
    a = lambda x: np.asarray(x, dtype=np.float64)  # noqa: E731
    return ScoreSeries(a(sp), a(sn), a(sm)), ScoreSeries(a(tp), a(tn), a(tm))


def _read_rows(fs, root: str, columns: tuple[str, ...], limit: int) -> list[dict]:
    """Up to ``limit`` rows of the committed files of the output at ``root`` (its manifest lists them)."""
    rows: list[dict] = []
    for f in read_json(fs, posixpath.join(root, "_manifest.json"))["files"]:
        path = posixpath.join(root, f)
        if f.endswith(".jsonl"):  # line by line: only the rows wanted are read, not a whole 50k-row file
            with fs.open_input_stream(path) as fh:
                for line in io.TextIOWrapper(fh, encoding="utf-8"):
                    if len(rows) >= limit:
                        break
                    if line.strip():
                        r = json.loads(line)
                        rows.append({c: r.get(c) for c in columns})
        else:
            t = pq.read_table(path, columns=[c for c in columns if c in pq.read_schema(path, filesystem=fs).names],
                              filesystem=fs)  # fmt: skip
            rows += t.slice(0, limit - len(rows)).to_pylist()
        if len(rows) >= limit:
            break
    return rows


def _sample(train_rows: list[dict], n: int, seed: int) -> list[dict]:
    if len(train_rows) <= n:
        return train_rows
    pick = np.random.default_rng(seed).choice(len(train_rows), size=n, replace=False)
    return [train_rows[i] for i in sorted(pick)]


def _plots(student: ScoreSeries, teacher: ScoreSeries, report: dict) -> list[tuple[str, str, bytes]]:
    """(file name, caption, PNG bytes) per plot, drawn with matplotlib's Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    out = []

    def save(fig, name, caption):
        buf = io.BytesIO()
        fig.tight_layout()
        fig.savefig(buf, format="png", dpi=100)
        plt.close(fig)
        out.append((name, caption, buf.getvalue()))

    for who, s in (("student", student), ("teacher", teacher)):
        if not len(s.pos):
            continue
        fig, ax = plt.subplots(figsize=(6.4, 3.6))
        lo, hi = float(min(s.pos.min(), s.neg.min(initial=s.pos.min()))), float(max(s.pos.max(), s.neg.max(
            initial=s.pos.max())))  # fmt: skip
        bins = np.linspace(lo, hi if hi > lo else lo + 1e-6, 41)
        # Densities: there are num_negatives times more negatives than positives, and the shapes are what matter.
        ax.hist(s.pos, bins=bins, alpha=0.6, density=True, label=f"positives ({len(s.pos):,})", color="C0")
        ax.hist(s.neg, bins=bins, alpha=0.6, density=True, label=f"chosen negatives ({len(s.neg):,})", color="C1")
        ax.set_xlabel(f"{who} score")
        ax.set_ylabel("density")
        ax.set_title(f"{who.capitalize()} scores: positives vs chosen negatives")
        ax.legend()
        save(fig, f"scores_{who}.png", f"{who.capitalize()} scores of positives and of the chosen negatives.")
    series = [(w, s.margin) for w, s in (("student", student), ("teacher", teacher)) if len(s.margin)]
    if series:
        fig, axes = plt.subplots(1, len(series), figsize=(max(6.4, 4.6 * len(series)), 3.6), squeeze=False)
        for ax, (who, m) in zip(axes[0], series):
            ax.hist(m, bins=40, color="C2")
            ax.axvline(0, color="k", lw=1, ls="--")
            ax.set_xlabel(f"{who}: lowest positive - negative")
            ax.set_ylabel("count")
            ax.set_title(f"{who.capitalize()} margins ({(m < 0).sum():,} of {len(m):,} below 0)")
        save(fig, "margins.png", "Margin of each chosen negative below its query's lowest positive; a negative "
             "left of 0 scores above a positive (a likely false negative, or a weak positive).")  # fmt: skip
    removed = report.get("candidates_removed_by_rule") or {}
    dropped = {
        **(report["queries"].get("dropped_by_reason") or {}),
        **{f"rejected: {k}": v for k, v in (report["queries"].get("rejected_by_reason") or {}).items()},
    }
    if removed or dropped:
        n = int(bool(removed)) + int(bool(dropped))
        fig, axes = plt.subplots(1, n, figsize=(max(6.4, 4.6 * n), 3.6), squeeze=False)
        for ax, (title, counts, color) in zip(axes[0], [x for x in (("Candidates removed, per rule", removed, "C3"),
                                                                    ("Queries dropped or rejected", dropped, "C4"))
                                                        if x[1]]):  # fmt: skip
            keys = sorted(counts, key=counts.get)
            ax.barh(keys, [counts[k] for k in keys], color=color)
            ax.set_title(title)
            ax.set_xlabel("count")
        save(fig, "rules.png", "Candidates removed by each selection rule, and queries that yield no training row.")
    stages = report.get("stages") or []
    if stages:
        fig, ax = plt.subplots(figsize=(6.4, 0.5 * len(stages) + 1.2))
        names = [s["stage"] for s in stages][::-1]
        secs = [s["seconds"] for s in stages][::-1]
        ax.barh(names, secs, color="C0")
        for y, s in enumerate(stages[::-1]):
            r = s.get("rows_per_s")
            rate = "nothing to do" if not r else (f"{r:,.0f} rows/s" if r >= 100 else f"{r:.1f} rows/s")
            ax.text(s["seconds"], y, f" {s['seconds']:.1f} s, {rate}", va="center", fontsize=8)
        ax.set_xlabel("seconds")
        ax.set_xlim(0, max(secs + [1]) * 1.45)
        ax.set_title("Time per stage")
        save(fig, "stages.png", "Wall time of each stage in this run, with its rows/s.")
    return out


def _window_end(cfg: dict):
    """The rules' window end as the run resolved it (range_max None: range_min + num_negatives, x10 with a score
    rule), or "" when the config does not hold the rules."""
    from pipelines.mine import SelectionSettings

    names = {f.name for f in dataclasses.fields(SelectionSettings)}
    try:
        return SelectionSettings(**{k: v for k, v in cfg.items() if k in names}).select().window_end()
    except (TypeError, ValueError):
        return ""


def _table(headers: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_cell(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _cell(v) -> str:
    if isinstance(v, float):
        return f"{v:,.4g}" if abs(v) < 1000 else f"{v:,.0f}"
    if isinstance(v, int):
        return f"{v:,}"
    return "" if v is None else str(v)


def _summary(s: ScoreSeries) -> list:
    if not len(s.pos):
        return ["-"] * 5
    mean_neg = float(np.mean(s.neg)) if len(s.neg) else None
    median_margin = float(np.median(s.margin)) if len(s.margin) else None
    return [float(np.mean(s.pos)), mean_neg, median_margin, int((s.margin < 0).sum()), len(s.margin)]


def render_html(report: dict, plots: list[tuple[str, str, bytes]], student: ScoreSeries, teacher: ScoreSeries,
                sample: list[dict], student_by_query: dict, queries_read: int) -> str:  # fmt: skip
    cfg = report.get("config", {})
    qid = cfg.get("query_id_column", "query_id")
    q = report["queries"]
    t = report.get("teacher") or {}
    settings = [
        ["student", cfg.get("model") or "bundled all-MiniLM-L6-v2"],
        ["teacher", f"{t.get('name', '-')} ({t.get('kind', '-')}) at {t.get('path', '-')}"],
        ["index", json.dumps(report.get("index"))],
        ["negatives per query", cfg.get("num_negatives")],
        ["window", f"[{cfg.get('range_min')}, {_window_end(cfg)})"],
        ["margins (absolute / relative)", f"{cfg.get('absolute_margin')} / {cfg.get('relative_margin')}"],
    ]
    parts = [f"<h1>kalm {html.escape(report['command'])} report</h1>",
             "<p>" + html.escape(f"{q['rows_out']:,} of {q['rows_in']:,} queries kept, {report['negatives_chosen']:,} "
                                 f"negatives chosen, {report['positives_missing_from_corpus']:,} positives missing "
                                 f"from the corpus; {report['timings_s']['total']:.1f} s in all.") + "</p>",
             _table(["setting", "value"], settings),
             "<h2>Stages</h2>",
             _table(["stage", "rows in", "rows out", "rejected", "rows this run", "seconds", "rows/s"],
                    [[s["stage"], s["rows_in"], s["rows_out"], s["rows_rejected"], s["rows_this_run"], s["seconds"],
                      s["rows_per_s"]] for s in report.get("stages", [])]),
             "<h2>Scores</h2>",
             f"<p>From the first {queries_read:,} queries of the candidates table.</p>",
             _table(["scorer", "mean positive", "mean negative", "median margin", "negatives above a positive",
                     "negatives"], [["student", *_summary(student)], ["teacher", *_summary(teacher)]])]  # fmt: skip
    for name, caption, _ in plots:
        parts.append(f'<figure><img src="{PLOTS_DIR}/{name}" alt="{html.escape(caption)}">'
                     f"<figcaption>{html.escape(caption)}</figcaption></figure>")  # fmt: skip
    rules = report.get("candidates_removed_by_rule") or {}
    dropped, rejected = q.get("dropped_by_reason") or {}, q.get("rejected_by_reason") or {}
    parts += ["<h2>Rules and drops</h2>",
              _table(["rule", "candidates removed"], sorted(rules.items())),
              _table(["queries dropped (selection)", "count"], sorted(dropped.items())),
              _table(["queries rejected (input)", "count"], sorted(rejected.items()))]  # fmt: skip
    parts.append(f"<h2>Sample of {len(sample)} training rows</h2><p>Scores: teacher (student). A negative scoring "
                 "near or above the positive deserves a look: it may be a false negative.</p>")  # fmt: skip
    for r in sample:
        stu = student_by_query.get(r.get(qid), {})
        items = [("positive", t, s, stu.get(i)) for t, s, i in zip(r["pos"], r["pos_scores"], r.get("pos_ids") or [])]
        items += [("negative", t, s, stu.get(i)) for t, s, i in zip(r["neg"], r["neg_scores"], r.get("neg_ids") or [])]
        rows = "".join(f'<tr class="{k}"><td>{k}</td><td>{_cell(s)}' + (f" ({_cell(st)})" if st is not None else "")
                       + f"</td><td>{html.escape(t[:400])}</td></tr>" for k, t, s, st in items)  # fmt: skip
        parts.append(f'<div class="sample"><p class="q">{html.escape(str(r["query"]))}</p><table>{rows}</table></div>')
    style = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}"
             "table{border-collapse:collapse;margin:.5em 0 1em}td,th{border:1px solid #ccc;padding:3px 8px;"
             "text-align:left;vertical-align:top;font-size:13px}figure{display:inline-block;margin:.5em}"
             "img{max-width:100%}.q{font-weight:600;margin:1em 0 .2em}.negative td:first-child{color:#b35}"
             ".positive td:first-child{color:#27a}")  # fmt: skip
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>kalm {html.escape(report['command'])} report"
            f"</title><style>{style}</style></head><body>{''.join(parts)}</body></html>")  # fmt: skip


def write_report(root_uri: str, storage, report: dict, *, max_queries: int = 200_000, samples: int = 20,
                 seed: int = 0) -> str:  # fmt: skip
    """Build and write ``{root}/report.html`` and ``{root}/report/*.png``; returns the HTML's URI."""
    fs, root = resolve(root_uri, storage)
    qid = report.get("config", {}).get("query_id_column", "query_id")
    rows = _read_rows(fs, posixpath.join(root, "candidates"), (qid, *SCORE_COLUMNS), max_queries)
    student, teacher = score_series(rows)
    student_by_query = {r[qid]: dict(zip(r["candidate_ids"] or [], r["candidate_scores"] or []))
                        | dict(zip(r["pos_ids"] or [], r["pos_scores"] or [])) for r in rows}  # fmt: skip
    train = _read_rows(fs, posixpath.join(root, "train"),
                       (qid, "query", "pos", "neg", "pos_scores", "neg_scores", "pos_ids", "neg_ids"),
                       max(samples * 50, 1000))  # fmt: skip
    plots = _plots(student, teacher, report)
    fs.create_dir(posixpath.join(root, PLOTS_DIR), recursive=True)
    for name, _, png in plots:
        with fs.open_output_stream(posixpath.join(root, PLOTS_DIR, name)) as fh:
            fh.write(png)
    page = render_html(report, plots, student, teacher, _sample(train, samples, seed), student_by_query, len(rows))
    with fs.open_output_stream(posixpath.join(root, REPORT_HTML)) as fh:
        fh.write(page.encode())
    return f"{root_uri.rstrip('/')}/{REPORT_HTML}"
