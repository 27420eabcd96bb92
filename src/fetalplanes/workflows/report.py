"""Self-contained HTML for the audit: one study's report and the department summary.

No external assets, no scripts: thumbnails are embedded as base64 PNG, the timeline is
inline SVG, styles are inline. Every text that comes from a file name, a checklist or a
model card is escaped, so a report opened from a shared folder runs nothing.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping, Sequence
from html import escape
from typing import Any

from fetalplanes.workflows.checklist import MISSING, NOT_ASSESSED_TEXT, PRESENT, Observation

#: Distinct colours for up to 13 views (then reused); grey: not a view, amber: uncertain.
PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf",
           "#bcbd22", "#ff7f0e", "#393b79", "#637939", "#843c39", "#7b4173")
NOT_TARGET_COLOUR, UNCERTAIN_COLOUR = "#d1d5db", "#fbbf24"
MAX_STILL_ROWS = 300

CSS = """
body{font:14px/1.45 system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;color:#111827;
margin:0;background:#f9fafb}
main{max-width:1100px;margin:0 auto;padding:16px 24px 48px}
h1{font-size:22px;margin:8px 0}h2{font-size:17px;margin:28px 0 8px}
.banner{background:#7f1d1d;color:#fff;padding:8px 24px;font-weight:600}
.summary{font-size:16px;margin:8px 0 12px}
.missing-box{border:2px solid #b91c1c;background:#fef2f2;padding:8px 14px;border-radius:6px}
.ok-box{border:2px solid #15803d;background:#f0fdf4;padding:8px 14px;border-radius:6px}
table{border-collapse:collapse;width:100%;background:#fff}
th,td{border-bottom:1px solid #e5e7eb;padding:6px 8px;text-align:left;vertical-align:top}
th{background:#f3f4f6;font-weight:600}
.status{font-weight:700;white-space:nowrap}
.present{color:#15803d}.missing{color:#b91c1c}.not_assessed{color:#6b7280}
.item-missing{background:#fef2f2}.item-not_assessed td{color:#6b7280}
img.thumb{max-width:220px;max-height:170px;border:1px solid #d1d5db;display:block}
.muted{color:#6b7280}.small{font-size:12px}
.card{background:#fff;border:1px solid #e5e7eb;border-radius:6px;padding:8px 14px}
.legend span{display:inline-block;margin:2px 10px 2px 0}
.legend i{display:inline-block;width:12px;height:12px;margin-right:4px;vertical-align:-1px}
svg{background:#fff;border:1px solid #e5e7eb}
"""


def _e(value: Any) -> str:
    return escape("" if value is None else str(value), quote=True)


def _page(title: str, body: str) -> str:
    return (
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        "<meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">"
        "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; "
        "img-src data:; style-src 'unsafe-inline'\">"
        f"<title>{_e(title)}</title><style>{CSS}</style></head><body>"
        "<div class=\"banner\" id=\"research-use\">Research software, not a medical device."
        "</div>"
        f"<main>{body}</main></body></html>\n"
    )


def _time(t: float | None) -> str:
    if t is None:
        return ""
    minutes, seconds = divmod(t, 60)
    return f"{int(minutes)}:{seconds:05.2f}" if minutes else f"{seconds:.2f} s"


def _where(d: Mapping[str, Any] | None) -> str:
    if not d:
        return ""
    text = _e(d["source"])
    if d.get("frame") is not None:
        text += f", frame {int(d['frame'])} at {_e(_time(d.get('time_s')))}"
    return text


def _colours(views: Sequence[str]) -> dict[str, str]:
    return {v: PALETTE[i % len(PALETTE)] for i, v in enumerate(views)}


# ------------------------------------------------------------------ study report
def study_report(data: Mapping[str, Any], observations: Sequence[Observation],
                 thumbs: Mapping[str, bytes]) -> str:
    """report.html of one study from its checklist.json dict, its observations (timeline,
    stills) and PNG thumbnails of the best frames (by item id)."""
    study, summary = data["study"], data["summary"]
    title = f"Exam checklist: {study['id']}"
    parts = [f"<h1>{_e(title)}</h1>",
             f"<p class=\"muted\">{_e(data['checklist']['title'])} &middot; study grouped by "
             f"{_e(study['grouped_by'])} &middot; {len(study['sources'])} file(s), "
             f"{int(data['observations'])} classified frames or images &middot; "
             f"{_e(data.get('created', ''))}</p>"]
    parts.append(_summary(data, summary))
    parts.append(_timelines(data, observations))
    parts.append(_items_table(data["items"], thumbs))
    parts.append(_stills(observations))
    parts.append(_model_section(data.get("model") or {}))
    parts.append(_about(data))
    return _page(title, "\n".join(parts))


def _summary(data: Mapping[str, Any], summary: Mapping[str, Any]) -> str:
    missing = data["missing"]
    head = (f"<p class=\"summary\" id=\"summary\"><b>{summary['present']} of "
            f"{summary['assessed']}</b> views this model can assess are present.")
    if summary["not_assessed"]:
        head += (f" {summary['not_assessed']} checklist items are "
                 f"<i>{_e(NOT_ASSESSED_TEXT)}</i> (listed below).")
    head += "</p>"
    if missing:
        items = "".join(f"<li>{_e(m)}</li>" for m in missing)
        box = (f"<div class=\"missing-box\" id=\"missing\"><b>Missing views "
               f"({len(missing)}):</b><ul>{items}</ul></div>")
    else:
        box = "<div class=\"ok-box\" id=\"missing\"><b>No missing views</b> among those " \
              "this model can assess.</div>"
    failures = data.get("failures") or []
    if failures:
        lines = "".join(f"<li>{_e(f)}</li>" for f in failures[:50])
        box += f"<p><b>Files not read ({len(failures)}):</b></p><ul class=\"small\">{lines}</ul>"
    return head + box


def _items_table(items: Sequence[Mapping[str, Any]], thumbs: Mapping[str, bytes]) -> str:
    rows = []
    section = None
    for it in items:
        if it["section"] != section:
            section = it["section"]
            rows.append(f"<tr><th colspan=\"5\">{_e(section)}</th></tr>")
        status = it["status"]
        word = {PRESENT: "present", MISSING: "MISSING"}.get(status, NOT_ASSESSED_TEXT)
        note = f"<div class=\"muted small\">{_e(it['note'])}</div>" if it.get("note") else ""
        views = ", ".join(it["views"]) or "no view of this model"
        optional = "" if it.get("required", True) else " <span class=\"muted\">(optional)</span>"
        best = it.get("best")
        img = ""
        if it["id"] in thumbs:
            b64 = base64.b64encode(thumbs[it["id"]]).decode("ascii")
            img = (f"<img class=\"thumb\" alt=\"best frame of {_e(it['name'])}\" "
                   f"src=\"data:image/png;base64,{b64}\">")
        where = ""
        if best:
            where = (f"{_where(best)}<br>as {_e(best['view'])}, confidence "
                     f"{best['confidence']:.3f}")
        seen = ""
        if it["frames"]:
            seen = f"{it['frames']} frame(s)"
            if it["first"] and it["first"].get("time_s") is not None:
                seen += f"<br>first {_where(it['first'])}<br>last {_where(it['last'])}"
        elif it["uncertain_frames"]:
            seen = f"<span class=\"muted\">{it['uncertain_frames']} uncertain frame(s)</span>"
        rows.append(
            f"<tr class=\"item item-{status}\" data-item=\"{_e(it['id'])}\">"
            f"<td>{_e(it['name'])}{optional}<div class=\"muted small\">model view: "
            f"{_e(views)}</div>{note}</td>"
            f"<td class=\"status {status}\">{_e(word)}</td><td>{img}</td><td>{where}</td>"
            f"<td>{seen}</td></tr>"
        )
    head = ("<tr><th>item</th><th>status</th><th>best frame</th><th>where</th>"
            "<th>seen</th></tr>")
    return f"<h2>Checklist</h2><table id=\"checklist\">{head}{''.join(rows)}</table>"


def label_runs(obs: Sequence[Observation]) -> list[tuple[float, float, str, str]]:
    """(start_s, end_s, label, status) runs of equal smoothed labels in a recording."""
    runs: list[tuple[float, float, str, str]] = []
    step = (obs[1].time_s - obs[0].time_s) if len(obs) > 1 else 0.04
    for o in obs:
        status = "not_target" if o.not_target else "uncertain" if o.uncertain else "view"
        label = "" if o.not_target else o.label
        t = float(o.time_s or 0.0)
        if runs and runs[-1][2] == label and runs[-1][3] == status:
            runs[-1] = (runs[-1][0], t + step, label, status)
        else:
            runs.append((t, t + step, label, status))
    return runs


def timeline_svg(source: str, obs: Sequence[Observation], views: Sequence[str],
                 best: Sequence[tuple[str, float]], width: int = 1000) -> str:
    """One recording as a coloured band over time (one colour per view, grey: no view,
    amber: uncertain), best frames marked with triangles, and a time axis."""
    colours = _colours(views)
    runs = label_runs(obs)
    end = max(runs[-1][1], 1e-6)
    left, band_w, top, band_h = 10, width - 20, 18, 34
    scale = band_w / end
    rects = []
    for start, stop, label, status in runs:
        colour = (NOT_TARGET_COLOUR if status == "not_target" else UNCERTAIN_COLOUR
                  if status == "uncertain" else colours.get(label, "#000000"))
        what = "no standard view" if status == "not_target" else label + (
            " (uncertain)" if status == "uncertain" else "")
        x, w = left + start * scale, max((stop - start) * scale, 0.5)
        rects.append(f"<rect x=\"{x:.2f}\" y=\"{top}\" width=\"{w:.2f}\" height=\"{band_h}\" "
                     f"fill=\"{colour}\"><title>{_e(what)}: {_e(_time(start))}-"
                     f"{_e(_time(stop))}</title></rect>")
    marks = []
    for name, t in best:
        x = left + t * scale
        marks.append(f"<path d=\"M{x:.2f} {top - 2} l-5 -9 h10 z\" fill=\"#111827\">"
                     f"<title>best frame of {_e(name)} at {_e(_time(t))}</title></path>")
    ticks = []
    n_ticks = 10
    for k in range(n_ticks + 1):
        t = end * k / n_ticks
        x = left + t * scale
        ticks.append(f"<line x1=\"{x:.1f}\" x2=\"{x:.1f}\" y1=\"{top + band_h}\" "
                     f"y2=\"{top + band_h + 5}\" stroke=\"#6b7280\"/>"
                     f"<text x=\"{x:.1f}\" y=\"{top + band_h + 17}\" font-size=\"10\" "
                     f"text-anchor=\"middle\" fill=\"#374151\">{_e(_time(t))}</text>")
    height = top + band_h + 24
    return (f"<svg role=\"img\" aria-label=\"timeline of {_e(source)}\" width=\"100%\" "
            f"viewBox=\"0 0 {width} {height}\" preserveAspectRatio=\"none\" "
            f"xmlns=\"http://www.w3.org/2000/svg\">{''.join(rects)}{''.join(marks)}"
            f"{''.join(ticks)}</svg>")


def _timelines(data: Mapping[str, Any], observations: Sequence[Observation]) -> str:
    recordings: dict[str, list[Observation]] = {}
    for o in observations:
        if o.frame is not None:
            recordings.setdefault(o.source, []).append(o)
    if not recordings:
        return ""
    views = list(data["model_views"])
    colours = _colours(views)
    legend = "".join(f"<span><i style=\"background:{c}\"></i>{_e(v)}</span>"
                     for v, c in colours.items())
    legend += (f"<span><i style=\"background:{NOT_TARGET_COLOUR}\"></i>no standard view</span>"
               f"<span><i style=\"background:{UNCERTAIN_COLOUR}\"></i>uncertain</span>"
               "<span>&#9660; best frame</span>")
    parts = ["<h2>Timeline</h2>", f"<div class=\"legend small\">{legend}</div>"]
    for source, obs in recordings.items():
        best = [(it["name"], it["best"]["time_s"]) for it in data["items"]
                if it.get("best") and it["best"]["source"] == source
                and it["best"].get("time_s") is not None]
        parts.append(f"<h3 class=\"small\">{_e(source)}</h3>")
        parts.append(timeline_svg(source, obs, views, best))
    return "\n".join(parts)


def _stills(observations: Sequence[Observation]) -> str:
    stills = [o for o in observations if o.frame is None]
    if not stills:
        return ""
    rows = []
    for o in stills[:MAX_STILL_ROWS]:
        label = "no standard view" if o.not_target else o.label + (
            " (uncertain)" if o.uncertain else "")
        rows.append(f"<tr><td>{_e(o.source)}</td><td>{_e(label)}</td>"
                    f"<td>{o.confidence:.3f}</td></tr>")
    more = ""
    if len(stills) > MAX_STILL_ROWS:
        more = f"<p class=\"muted\">... and {len(stills) - MAX_STILL_ROWS} more images.</p>"
    return ("<h2>Images</h2><table id=\"images\"><tr><th>image</th><th>view</th>"
            f"<th>confidence</th></tr>{''.join(rows)}</table>{more}")


def model_card_html(card: Mapping[str, Any]) -> str:
    """The model card summary: what the model is and is not (shown in every report)."""
    if not card:
        return ""
    rows = []
    for key, title in (("summary", "Model"), ("intended_use", "Intended use"),
                       ("training_data", "Training data"), ("folding", "Classes"),
                       ("not_medical_device", "Status")):
        if card.get(key):
            rows.append(f"<p><b>{title}.</b> {_e(card[key])}</p>")
    accuracy = card.get("accuracy") or []
    if accuracy:
        items = "".join(f"<li>{_e(a.get('what'))}: <b>{_e(a.get('result'))}</b> "
                        f"<span class=\"muted\">({_e(a.get('how'))})</span></li>"
                        for a in accuracy)
        rows.append(f"<p><b>Measured accuracy.</b></p><ul>{items}</ul>")
    failures = card.get("failure_modes") or []
    if failures:
        items = "".join(f"<li>{_e(f)}</li>" for f in failures)
        rows.append(f"<p><b>Known failure modes.</b></p><ul>{items}</ul>")
    return f"<div class=\"card\" id=\"model-card\">{''.join(rows)}</div>"


def _model_section(model: Mapping[str, Any]) -> str:
    if not model:
        return ""
    head = f"<h2>Model: {_e(model.get('name'))}</h2>"
    return head + model_card_html(model.get("card") or {})


def _about(data: Mapping[str, Any]) -> str:
    source = data["checklist"].get("source") or {}
    cite = _e(source.get("citation", ""))
    if source.get("doi"):
        cite += f" doi:{_e(source['doi'])}"
    settings = data.get("settings") or {}
    shown = ", ".join(f"{_e(k)} {_e(v)}" for k, v in settings.items() if v is not None)
    who = [f"{k} {_e(data['study'][k])}" for k in ("operator", "machine", "site")
           if data["study"].get(k)]
    who_text = f"<p>Pseudonyms: {', '.join(who)}.</p>" if who else ""
    return (f"<h2>About this report</h2><div class=\"small\"><p>Checklist: {cite}</p>"
            f"<p>{_e(source.get('note', ''))}</p>{who_text}<p>Settings: {shown}.</p>"
            f"<p>{_e(data['research_use'])}</p><p class=\"muted\">fetalplanes "
            f"{_e(data['fetalplanes_version'])}</p></div>")


# ------------------------------------------------------------------ department
def department_report(summary: Mapping[str, Any]) -> str:
    """department.html: completeness per view, per study, per operator, machine and site."""
    title = f"Department summary: {summary['checklist']['title']}"
    comp = summary.get("completeness")
    parts = [f"<h1>{_e(title)}</h1>",
             f"<p class=\"summary\"><b>{summary['studies']}</b> studies, "
             f"<b>{summary['complete_studies']}</b> with every assessed view; mean "
             f"completeness {'' if comp is None else f'{comp:.1%}'}.</p>"]
    rows = "".join(
        f"<tr><td>{_e(r['section'])}</td><td>{_e(r['name'])}</td><td>{r['present']} / "
        f"{r['assessed_studies']}</td><td>{_pct(r['rate'])}</td></tr>"
        if r["assessed_studies"] else
        f"<tr class=\"not_assessed\"><td>{_e(r['section'])}</td><td>{_e(r['name'])}</td>"
        f"<td colspan=\"2\">{_e(NOT_ASSESSED_TEXT)}</td></tr>"
        for r in summary["per_item"])
    parts.append("<h2>Completeness per view</h2><table id=\"per-item\"><tr><th>section</th>"
                 f"<th>item</th><th>studies with it</th><th>rate</th></tr>{rows}</table>")
    srows = "".join(
        f"<tr><td><a href=\"{_e(s['report'])}\">{_e(s['study'])}</a></td>"
        f"<td>{s['present']} / {s['assessed']}</td><td>{_e(', '.join(s['missing']))}</td>"
        f"<td>{_e(s['operator'] or '')}</td><td>{_e(s['machine'] or '')}</td>"
        f"<td>{_e(s['site'] or '')}</td></tr>" for s in summary["per_study"])
    parts.append("<h2>Studies</h2><table id=\"studies\"><tr><th>study</th><th>present</th>"
                 "<th>missing</th><th>operator</th><th>machine</th><th>site</th></tr>"
                 f"{srows}</table>")
    for kind, groups in summary["by"].items():
        if all(g["id"] == "not recorded" for g in groups):
            continue
        grows = "".join(
            f"<tr><td>{_e(g['id'])}</td><td>{g['studies']}</td><td>{g['complete_studies']}"
            f"</td><td>{_pct(g['completeness'])}</td></tr>" for g in groups)
        parts.append(f"<h2>Per {kind}</h2><table id=\"by-{kind}\"><tr><th>{kind} "
                     "(pseudonym)</th><th>studies</th><th>complete</th>"
                     f"<th>mean completeness</th></tr>{grows}</table>")
    parts.append(f"<p class=\"small\">Operators, machines and sites are salted-hash "
                 f"pseudonyms of the DICOM headers (salt {_e(summary.get('salt', ''))}); "
                 f"names are never written. {_e(summary['research_use'])}</p>")
    return _page(title, "\n".join(parts))


def _pct(rate: float | None) -> str:
    return "" if rate is None else f"{rate:.0%}"
