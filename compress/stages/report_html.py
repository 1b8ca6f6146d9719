"""``report.html``: the run report as one self-contained file (images inline), for sharing.

Why a converter of our own: no markdown library is a dependency of adc (``markdown`` is not
installed; ``markdown-it-py`` only arrives with some versions of other packages), and the
report uses a small, fixed subset that this module covers: ``#`` headings, paragraphs, ``- ``
lists, pipe tables, images, links, inline code and ``**bold**``. Images (and small linked files,
such as ``per_image.csv``) become ``data:`` URIs read from the run directory, so the file
opens anywhere, without the run directory beside it.
"""

from __future__ import annotations

import base64
import html
import mimetypes
import re
from pathlib import Path

from ..io import atomic_write_text

EMBED_LINK_LIMIT = 512 * 1024  # linked files up to this size travel inside the HTML
_IMAGE = re.compile(r"!\[([^\]]*)\]\(([^)\s]+)\)")
_LINK = re.compile(r"\[([^\]]+)\]\(([^)\s]+)\)")
_BOLD = re.compile(r"\*\*(.+?)\*\*")
_STYLE = """body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1100px;margin:2em auto;
padding:0 1em;line-height:1.45;color:#222}table{border-collapse:collapse;margin:.6em 0 1.2em}
th,td{border:1px solid #ccc;padding:.3em .6em;text-align:left;vertical-align:top}th{background:#f3f3f3}
img{max-width:100%}td img{max-width:420px}code{background:#f3f3f3;padding:0 .2em;border-radius:3px}"""


def _data_uri(path: Path, limit: int | None = None) -> str | None:
    if not path.is_file() or (limit is not None and path.stat().st_size > limit):
        return None
    mime = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode('ascii')}"


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", re.sub(r"<[^>]+>", "", text).lower()).strip("-")


def _inline(text: str, root: Path) -> str:
    """Inline markdown of one line or cell -> HTML (code spans first: nothing inside them is formatted)."""
    out = []
    for i, part in enumerate(re.split(r"(`[^`]*`)", text)):
        if i % 2:
            out.append(f"<code>{html.escape(part[1:-1])}</code>")
            continue
        s = html.escape(part, quote=False)

        def image(m: re.Match) -> str:
            src = html.unescape(m[2])
            uri = _data_uri(root / src) if not re.match(r"^[a-z]+:", src) else None
            return f'<img alt="{html.escape(html.unescape(m[1]))}" src="{html.escape(uri or src)}">'

        def link(m: re.Match) -> str:
            href = html.unescape(m[2])
            if href.startswith("#") or re.match(r"^[a-z]+:", href):
                return f'<a href="{html.escape(href)}">{m[1]}</a>'
            uri = _data_uri(root / href, EMBED_LINK_LIMIT)
            if uri is None:  # too large to carry: a link relative to the run directory
                return f'<a href="{html.escape(href)}">{m[1]}</a>'
            return f'<a href="{html.escape(uri)}" download="{html.escape(Path(href).name)}">{m[1]}</a>'

        s = _IMAGE.sub(image, s)
        s = _LINK.sub(link, s)
        out.append(_BOLD.sub(r"<strong>\1</strong>", s))
    return "".join(out)


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def markdown_to_html(text: str, root: Path) -> str:
    """The report's markdown subset as an HTML body fragment; ``root``: where relative paths point."""
    lines, out, i = text.splitlines(), [], 0
    while i < len(lines):
        line = lines[i]
        if not line.strip():
            i += 1
        elif m := re.match(r"^(#{1,6})\s+(.*)$", line):
            level, body = len(m[1]), _inline(m[2], root)
            out.append(f'<h{level} id="{_slug(body)}">{body}</h{level}>')
            i += 1
        elif line.lstrip().startswith("|"):
            block = []
            while i < len(lines) and lines[i].lstrip().startswith("|"):
                block.append(lines[i])
                i += 1
            has_header = len(block) > 1 and re.fullmatch(r"[\s|:\-]+", block[1]) is not None
            rows = [block[0]] + block[2:] if has_header else block
            html_rows = []
            for r, row in enumerate(rows):
                tag = "th" if has_header and r == 0 else "td"
                html_rows.append("<tr>" + "".join(f"<{tag}>{_inline(c, root)}</{tag}>" for c in _cells(row)) + "</tr>")
            out.append("<table>\n" + "\n".join(html_rows) + "\n</table>")
        elif re.match(r"^\s*[-*] ", line):
            items = []
            while i < len(lines) and re.match(r"^\s*[-*] ", lines[i]):
                items.append("<li>" + _inline(re.sub(r"^\s*[-*] ", "", lines[i]), root) + "</li>")
                i += 1
            out.append("<ul>\n" + "\n".join(items) + "\n</ul>")
        else:
            para = []
            while i < len(lines) and lines[i].strip() and not re.match(r"^(#{1,6}\s|\s*\||\s*[-*] )", lines[i]):
                para.append(_inline(lines[i].strip(), root))
                i += 1
            out.append("<p>" + "\n".join(para) + "</p>")
    return "\n".join(out)


def write_html(markdown: str, path: Path, root: Path, title: str) -> Path:
    """Write ``markdown`` as a standalone HTML page at ``path`` (images from ``root`` inline)."""
    body = markdown_to_html(markdown, root)
    page = (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>{html.escape(title)}</title>\n'
            f"<style>{_STYLE}</style>\n</head>\n<body>\n{body}\n</body>\n</html>\n")
    return atomic_write_text(path, page)


__all__ = ["markdown_to_html", "write_html"]
