"""One page model, two renderings: the report is a list of blocks (headings, bullet lists,
tables, figures) written to Markdown and to self-contained HTML in the same order.

Text comes partly from runs (directory and module names, rule names, event values), so both
renderings escape it: HTML entities in HTML; in Markdown, HTML-significant characters as
entities and Markdown's own punctuation backslash-escaped. A `backquoted` span is code in
both (in Markdown only when it holds nothing HTML could read).
"""

from __future__ import annotations

import base64
import html
import re
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Heading:
    text: str
    level: int = 2


@dataclass
class Bullets:
    items: list[str]
    strong_prefix: bool = False  # "name: text" with the name in bold


@dataclass
class Paragraph:
    text: str


@dataclass
class Table:
    header: tuple[str, ...]
    rows: list[tuple[str, ...]]


@dataclass
class Figure:
    """A drawn figure, or the sentence saying why it is not drawn."""

    title: str
    image: Path | None
    caption: str
    missing: str = ""
    points: int = 0
    details: bool = False  # below the first screen


Block = Heading | Bullets | Paragraph | Table | Figure

_MD_SPECIAL = re.compile(r"([\\*_\[\]#|])")


def _md_plain(text: str) -> str:
    return _MD_SPECIAL.sub(r"\\\1", html.escape(text, quote=False))


def _md_code(text: str) -> str:
    # A code span is literal in CommonMark, but not every renderer agrees, and a | ends a
    # table cell even inside one: such text is written escaped instead.
    return _md_plain(text) if any(c in text for c in "<>&|") else f"`{text}`"


def _md_text(text: str) -> str:
    parts = text.split("`")
    return "".join(_md_code(p) if i % 2 else _md_plain(p) for i, p in enumerate(parts))


def _html_text(text: str) -> str:
    parts = html.escape(text).split("`")
    return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))


def _split_name(item: str) -> tuple[str, str]:
    name, _, rest = item.partition(": ")
    return name, rest


def markdown(blocks: list[Block]) -> str:
    lines: list[str] = []
    for b in blocks:
        if isinstance(b, Heading):
            lines += ["", "#" * b.level + " " + _md_text(b.text), ""]
        elif isinstance(b, Paragraph):
            lines += [_md_text(b.text), ""]
        elif isinstance(b, Bullets):
            for item in b.items:
                if b.strong_prefix:
                    name, rest = _split_name(item)
                    lines.append(f"- **{_md_plain(name)}**: {_md_text(rest)}")
                else:
                    lines.append(f"- {_md_text(item)}")
            lines.append("")
        elif isinstance(b, Table):
            lines.append("| " + " | ".join(map(_md_plain, b.header)) + " |")
            lines.append("|" + "---|" * len(b.header))
            lines += ["| " + " | ".join(_md_text(c) for c in row) + " |" for row in b.rows]
            lines.append("")
        else:
            lines += ["", "## " + _md_text(b.title), ""]
            if b.image is None:
                lines += [f"_Not drawn: {_md_text(b.missing)}._", ""]
            else:
                lines += [f"![{_md_plain(b.title)}]({b.image.name})", "", _md_text(b.caption), ""]
    return "\n".join(lines).lstrip("\n") + "\n"


_CSS = (
    "body{font-family:system-ui,sans-serif;max-width:1100px;margin:auto;padding:0 1em;"
    "line-height:1.4}img{max-width:100%}h2{margin-top:1.4em;border-bottom:1px solid #ddd}"
    ".headlines{font-size:1.1em}.headlines li{margin:.3em 0}.run{font-family:monospace;"
    "font-weight:bold}.caption{color:#555;font-size:.9em}"
    "table{border-collapse:collapse;font-size:.85em}td,th{border:1px solid #ccc;padding:2px 6px}"
    "code{font-size:.85em}"
)


def _html_figure(b: Figure) -> list[str]:
    title = html.escape(b.title)
    parts = [
        f"<section data-title='{title}' data-points='{b.points}'><h2>{_html_text(b.title)}</h2>"
    ]
    if b.image is None:
        parts.append(f"<p><em>Not drawn: {_html_text(b.missing)}.</em></p>")
    else:
        data = base64.b64encode(b.image.read_bytes()).decode()
        parts.append(f"<img alt='{title}' src='data:image/png;base64,{data}'>")
        parts.append(f"<p class='caption'>{_html_text(b.caption)}</p>")
    parts.append("</section>")
    return parts


def html_page(blocks: list[Block], title: str = "mxprobe report") -> str:
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
        f"<style>{_CSS}</style></head><body>",
    ]
    for b in blocks:
        if isinstance(b, Heading):
            parts.append(f"<h{b.level}>{_html_text(b.text)}</h{b.level}>")
        elif isinstance(b, Paragraph):
            parts.append(f"<p>{_html_text(b.text)}</p>")
        elif isinstance(b, Bullets):
            css = " class='headlines'" if b.strong_prefix else ""
            parts.append(f"<ul{css}>")
            for item in b.items:
                if b.strong_prefix:
                    name, rest = _split_name(item)
                    parts.append(
                        f"<li class='headline' data-run='{html.escape(name)}'><span class='run'>"
                        f"{html.escape(name)}</span>: {_html_text(rest)}</li>"
                    )
                else:
                    parts.append(f"<li>{_html_text(item)}</li>")
            parts.append("</ul>")
        elif isinstance(b, Table):
            parts.append("<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in b.header))
            parts.append("</tr>")
            parts += [
                "<tr>" + "".join(f"<td>{_html_text(c)}</td>" for c in row) + "</tr>"
                for row in b.rows
            ]
            parts.append("</table>")
        else:
            parts += _html_figure(b)
    parts.append("</body></html>")
    return "\n".join(parts)
