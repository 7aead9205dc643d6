"""roff, the markup of manual pages (man(7)), and Markdown turned into it.

Text in, text out: used to build port-broker(1) and port-broker.toml(5) from the
argument parser and docs/configuration.md (`broker.manual`).

Must never: import anything of the broker's own or outside the standard library, or
let text through unescaped (a line of a document starting with "." would be a request).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Final

_INLINE: Final = re.compile(r"`([^`]+)`|\*\*([^*]+)\*\*|\[([^\]]+)\]\(([^)]+)\)")
"""Markdown's inline code, bold and links: all the inline markup the docs use."""


def escape(text: str) -> str:
    """`text` as roff prints it literally: backslashes, hyphens (so that options
    copied from the page work) and a leading control character escaped."""
    return text.replace("\\", "\\e").replace("-", "\\-")


def inline(text: str) -> str:
    """Markdown inline markup as roff fonts: `code` and **bold** in bold, a link as its
    text."""
    out: list[str] = []
    position = 0
    for match in _INLINE.finditer(text):
        out.append(escape(text[position : match.start()]))
        code, strong, label, _target = match.groups()
        out.append(inline(label) if label is not None else bold(code or strong))
        position = match.end()
    out.append(escape(text[position:]))
    return line("".join(out))


def line(text: str) -> str:
    """A line of text that roff will not take for a request (one starting with . or ')."""
    return f"\\&{text}" if text[:1] in (".", "'") else text


# --- markdown → roff (docs/configuration.md) --------------------------------------


def markdown(text: str) -> list[str]:
    """The roff of a Markdown document with the constructs the docs use: headings,
    paragraphs, fenced code, tables and bullet lists. The first heading (the title) is
    left out: the page's .TH says it."""
    out: list[str] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        current = lines[i]
        if not current.strip() or current.startswith("# "):  # the title: .TH says it
            i += 1
        elif current.startswith(("## ", "### ")):
            level, _, title = current.partition(" ")
            title = title.strip().replace("`", "")
            out.append(f".SH {escape(title.upper())}" if level == "##" else f".SS {escape(title)}")
            i += 1
        elif current.startswith("```"):
            end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
            out += [".PP", ".RS 4", ".nf", *(line(escape(c)) for c in lines[i + 1 : end])]
            out += [".fi", ".RE"]
            i = end + 1
        elif current.startswith("|"):
            end = i
            while end < len(lines) and lines[end].startswith("|"):
                end += 1
            out += _table([cells(row) for row in lines[i:end] if not _separator(row)])
            i = end
        elif current.startswith("- "):
            end = i + 1
            while end < len(lines) and lines[end].startswith("  ") and lines[end].strip():
                end += 1
            words = " ".join(part.strip() for part in [current[2:], *lines[i + 1 : end]])
            out += [".IP \\(bu 2", inline(words)]
            i = end
        else:
            end = i
            while end < len(lines) and lines[end].strip() and not _starts_block(lines[end]):
                end += 1
            out += [".PP", inline(" ".join(part.strip() for part in lines[i:end]))]
            i = end
    return out


def _starts_block(text: str) -> bool:
    return text.startswith(("#", "```", "|", "- "))


def cells(row: str) -> list[str]:
    """The cells of a Markdown table row, stripped."""
    return [cell.strip() for cell in row.strip().strip("|").split("|")]


def _separator(row: str) -> bool:
    return set(row.replace(" ", "")) <= set("|-:")


def _table(rows: list[list[str]]) -> list[str]:
    """A table as a tagged list: the first cell is the tag; the cells between say their
    column's heading; the last is the text."""
    heading, *body = rows
    out: list[str] = []
    for row in body:
        out += [".TP", inline(row[0])]
        middle = [f"{heading[k]}: {row[k]}" for k in range(1, len(row) - 1)]
        if middle:
            out += [inline("; ".join(middle)) + ".", ".br"]
        out.append(inline(row[-1]))
    return out


def tagged(entries: Iterable[tuple[str, str]]) -> list[str]:
    """A tagged list: each (tag, text) pair, both already roff (a tag may have no text)."""
    return [part for tag, text in entries for part in (".TP", tag, text) if part]


def bold(text: str) -> str:
    """`text` in bold (an option, a command, a file), escaped."""
    return f"\\fB{escape(text)}\\fR"
