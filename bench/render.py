"""Render the benchmark report's content (a list of blocks) as Markdown and as one self-contained HTML page.

Both formats come from the same blocks, so report.md and report.html say the same thing. The HTML page embeds
its PNGs as base64 data URIs, has inline CSS only, a Content-Security-Policy that forbids any request outside
the page, and a tiny inline script that marks <body data-images-ok="N/M"> once the images have decoded (the
headless-browser test reads it).

    python scripts/report.py results/bench_tiny      (writes report.md and report.html)

Blocks: ("h1" | "h2" | "h3", text), ("p", text), ("warn", text), ("ul", [text]), ("table", headers, rows),
("img", path relative to the report, alt text, absolute path). Text may use `code` and **bold**.
"""

from __future__ import annotations

import base64
import html
import re
from pathlib import Path

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 1200px;
       padding: 0 1em; color: #222; line-height: 1.45; }
h1, h2, h3 { color: #113; } h2 { border-bottom: 1px solid #ccd; padding-bottom: .2em; margin-top: 1.6em; }
table { border-collapse: collapse; margin: .8em 0; font-size: .88em; display: block; overflow-x: auto; }
th, td { border: 1px solid #ccd; padding: .3em .55em; text-align: left; vertical-align: top; }
th { background: #eef; } tr:nth-child(even) td { background: #f8f8fc; }
code { background: #f1f1f6; padding: 0 .25em; border-radius: 3px; font-size: .92em; }
.warn { background: #fff1f0; border-left: 5px solid #d33; padding: .5em .8em; }
figure { margin: 1em 0; } img { max-width: 100%; height: auto; border: 1px solid #dde; }
figcaption { font-size: .9em; color: #555; }
"""

SCRIPT = """
window.addEventListener("load", function () {
  var imgs = document.images, ok = 0;
  for (var i = 0; i < imgs.length; i++) { if (imgs[i].complete && imgs[i].naturalWidth > 0) { ok++; } }
  document.body.setAttribute("data-images-ok", ok + "/" + imgs.length);
});
"""

CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'"


def _md_cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def to_markdown(blocks: list[tuple]) -> str:
    out = []
    for kind, *rest in blocks:
        if kind in ("h1", "h2", "h3"):
            out.append("#" * int(kind[1]) + " " + rest[0])
        elif kind == "p":
            out.append(rest[0])
        elif kind == "warn":
            out.append(f"> **WARNING**: {rest[0]}")
        elif kind == "ul":
            out.append("\n".join(f"- {item}" for item in rest[0]))
        elif kind == "table":
            headers, rows = rest
            lines = ["| " + " | ".join(map(_md_cell, headers)) + " |", "|" + "---|" * len(headers)]
            out.append("\n".join(lines + ["| " + " | ".join(map(_md_cell, row)) + " |" for row in rows]))
        elif kind == "img":
            out.append(f"![{rest[1]}]({rest[0]})")
        else:
            raise ValueError(f"unknown block kind {kind!r}")
    return "\n\n".join(out) + "\n"


def _inline(text: str) -> str:
    """HTML-escaped text with the two Markdown marks the report uses: `code` and **bold**."""
    text = re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(str(text), quote=False))
    return re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", text)


def to_html(blocks: list[tuple], title: str) -> str:
    body = []
    for kind, *rest in blocks:
        if kind in ("h1", "h2", "h3"):
            body.append(f"<{kind}>{_inline(rest[0])}</{kind}>")
        elif kind == "p":
            body.append(f"<p>{_inline(rest[0])}</p>")
        elif kind == "warn":
            body.append(f'<p class="warn"><strong>WARNING</strong>: {_inline(rest[0])}</p>')
        elif kind == "ul":
            body.append("<ul>" + "".join(f"<li>{_inline(item)}</li>" for item in rest[0]) + "</ul>")
        elif kind == "table":
            headers, rows = rest
            head = "".join(f"<th>{_inline(h)}</th>" for h in headers)
            cells = ("".join(f"<td>{_inline(c)}</td>" for c in row) for row in rows)
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>"
                        + "".join(f"<tr>{c}</tr>" for c in cells) + "</tbody></table>")
        elif kind == "img":
            data = base64.b64encode(Path(rest[2]).read_bytes()).decode()
            body.append(f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(rest[1])}">'
                        f"<figcaption>{_inline(rest[1])}</figcaption></figure>")
        else:
            raise ValueError(f"unknown block kind {kind!r}")
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f'<meta http-equiv="Content-Security-Policy" content="{CSP}">\n'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f"<title>{html.escape(title)}</title>\n<style>{CSS}</style>\n<script>{SCRIPT}</script>\n</head>\n"
            f"<body>\n" + "\n".join(body) + "\n</body>\n</html>\n")
