"""What a run writes: one csv per finding and report.html, a static page linking them
with the grids, thumbnails, counts and the thresholds used. Every link is relative and
every file it names lies in the output folder, so the folder can be copied and opened
offline."""
import csv
import html
import os
from dataclasses import dataclass, field
from typing import Dict, List, Sequence, Tuple

from common.files.atomic import atomic_path


def write_csv(path: str, header: Sequence[str], rows: Sequence[Sequence]) -> str:
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


@dataclass
class Section:
    """One finding in the report: a headline count, its files, and a table whose cells are
    (thumbnail path or "", text)."""
    title: str
    summary: str
    files: List[str] = field(default_factory=list)  # csvs and grids, linked
    grids: List[str] = field(default_factory=list)  # shown inline
    header: List[str] = field(default_factory=list)
    rows: List[List[Tuple[str, str]]] = field(default_factory=list)
    marked: List[int] = field(default_factory=list)  # item rows the embedding map marks


# overflow-wrap: a long path breaks anywhere rather than widening its table past the page
STYLE = ("body{font-family:sans-serif;margin:2em;max-width:80em}table{border-collapse:collapse;max-width:100%}"
         "td,th{border:1px solid #ccc;padding:4px;vertical-align:top;font-size:90%}td{overflow-wrap:anywhere}"
         "img.grid{max-width:100%;border:1px solid #ccc}h2{margin-top:2em}")


def _cell(folder: str, thumb: str, text: str) -> str:
    img = f'<img src="{html.escape(os.path.relpath(thumb, folder))}" alt=""><br>' if thumb else ""
    return f"<td>{img}{html.escape(text)}</td>"


def write_html(folder: str, title: str, settings: Dict[str, object], sections: Sequence[Section]) -> str:
    """OUTPUT_DIR/report.html."""
    rel = lambda p: html.escape(os.path.relpath(p, folder))  # noqa: E731
    out = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
           f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>",
           "<table>" + "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>"
                               for k, v in settings.items()) + "</table>",
           "<ul>" + "".join(f"<li><a href='#s{i}'>{html.escape(s.title)}</a>: {html.escape(s.summary)}</li>"
                            for i, s in enumerate(sections)) + "</ul>"]
    for i, s in enumerate(sections):
        out.append(f"<h2 id='s{i}'>{html.escape(s.title)}</h2><p>{html.escape(s.summary)}</p>")
        if s.files:
            out.append("<p>" + " &middot; ".join(f"<a href='{rel(p)}'>{html.escape(os.path.basename(p))}</a>"
                                                   for p in s.files) + "</p>")
        out += [f"<p><a href='{rel(g)}'><img class='grid' src='{rel(g)}' alt='{html.escape(os.path.basename(g))}'>"
                f"</a></p>" for g in s.grids]
        if s.rows:
            out.append("<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in s.header) + "</tr>"
                       + "".join("<tr>" + "".join(_cell(folder, t, x) for t, x in r) + "</tr>" for r in s.rows)
                       + "</table>")
    out.append("</body></html>")
    path = os.path.join(folder, "report.html")
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write("\n".join(out))
    return path
