"""docker's output conventions: `--format` (table / json / Go template), its tabwriter
table, `--filter KEY=VALUE` arguments, human sizes and times.

The rules are docker's (cli/command/formatter): `json` prints `{{json .}}` of each item, one
per line; `table TEMPLATE` prints a header row (the template run on the column titles) and one
row per item, aligned by a tabwriter (minimum width 10, padding 3); any other template prints
each item on its own line. In a template, a literal `\\t` and `\\n` stand for a tab and a newline.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Mapping, Sequence
from typing import Any

from imagefs.errors import UsageError

__all__ = [
    "docker_time",
    "human_ago",
    "human_size",
    "parse_filters",
    "render",
    "tabwriter",
]


def render(
    fmt: str, items: Sequence[Mapping[str, Any]], headers: Mapping[str, str], default: str
) -> str:
    """Format `items` (dicts with docker's field names) as `--format fmt` asks.

    `headers` titles the columns for `table` formats (a field without one is titled by its
    name in capitals); `default` is the template `table` alone stands for.
    """
    if fmt == "json":
        return "".join(_json_line(item) + "\n" for item in items)
    # ~30 ms to import: paid by the commands that render, not by `imagefs mount`.
    from imagefs.gotemplate import Header, parse

    if fmt == "table":
        fmt = default
    is_table = fmt.startswith("table")
    if is_table:
        fmt = fmt[len("table") :]
    source = fmt.strip(" ").replace("\\t", "\t").replace("\\n", "\n")
    template = parse(source)
    out = [template.execute(item) + "\n" for item in items]
    if not is_table:
        return "".join(out)
    titles = {k: Header(headers.get(k, k.upper())) for k in _keys(items, headers)}
    head = template.execute(titles, header=True) + "\n"
    return tabwriter(head + "".join(out))


def _keys(items: Sequence[Mapping[str, Any]], headers: Mapping[str, str]) -> list[str]:
    keys = list(headers)
    for item in items[:1]:
        keys += [k for k in item if k not in headers]
    return keys


def _json_line(item: Mapping[str, Any]) -> str:
    return json.dumps(item, ensure_ascii=False, separators=(",", ":"))


def tabwriter(text: str, *, minwidth: int = 10, padding: int = 3) -> str:
    """Go's text/tabwriter as docker sets it up: tab-terminated cells are padded to their
    column's width (widest cell + padding, at least `minwidth`); the text after a line's last
    tab is not part of a column. A column's width is taken over a block of consecutive lines
    that have that cell, as Go does (a line with fewer cells ends the block)."""
    cells = [line.split("\t") for line in text.split("\n")]
    out: list[str] = []

    def write(line0: int, line1: int, widths: list[int]) -> None:
        for parts in cells[line0:line1]:
            out.append(
                "".join(c.ljust(widths[j]) if j < len(widths) else c for j, c in enumerate(parts))
            )

    def format_block(line0: int, line1: int, widths: list[int]) -> None:
        column = len(widths)
        this = line0
        while this < line1:
            if column >= len(cells[this]) - 1:
                this += 1
                continue
            write(line0, this, widths)
            line0 = this
            width = minwidth
            while this < line1 and column < len(cells[this]) - 1:
                width = max(width, len(cells[this][column]) + padding)
                this += 1
            format_block(line0, this, [*widths, width])
            line0 = this
        write(line0, line1, widths)

    format_block(0, len(cells), [])
    return "\n".join(out)


def parse_filters(values: Sequence[str], known: Sequence[str]) -> dict[str, list[str]]:
    """`--filter KEY=VALUE` arguments (repeatable) as {KEY: [VALUE, ...]}, docker's way:
    the same key twice means either value, different keys must all hold."""
    found: dict[str, list[str]] = {}
    for value in values:
        key, sep, arg = value.partition("=")
        key = key.strip().lower()
        if not sep:
            raise UsageError(f"bad format of filter (expected name=value): {value}")
        if key not in known:
            raise UsageError(f"invalid filter '{key}'")
        found.setdefault(key, []).append(arg.strip())
    return found


def human_size(n: int) -> str:
    """docker's units: decimal, three significant digits."""
    value = float(n)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if value < 1000 or unit == "TB":
            if unit == "B":
                return f"{int(value)}B"
            return f"{value:.3g}{unit}"
        value /= 1000
    return f"{n}B"


def parse_time(timestamp: str | None) -> dt.datetime | None:
    if not timestamp:
        return None
    try:
        when = dt.datetime.fromisoformat(timestamp.replace("Z", "+00:00"))
    except ValueError:
        return None
    return when if when.tzinfo is not None else when.replace(tzinfo=dt.UTC)


def human_ago(timestamp: str | None, now: dt.datetime | None = None) -> str:
    when = parse_time(timestamp)
    if when is None:
        return timestamp or "N/A"
    secs = ((now or dt.datetime.now(dt.UTC)) - when).total_seconds()
    for unit, size in (
        ("year", 365 * 86400),
        ("month", 30 * 86400),
        ("week", 7 * 86400),
        ("day", 86400),
        ("hour", 3600),
        ("minute", 60),
    ):
        if secs >= size:
            k = int(secs // size)
            return f"{k} {unit}{'s' if k > 1 else ''} ago"
    return "Less than a minute ago"


def docker_time(timestamp: str | None) -> str:
    """docker's CreatedAt: Go's time.String() in UTC, `2024-02-27 00:52:43 +0000 UTC`."""
    when = parse_time(timestamp)
    if when is None:
        return ""
    return when.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%S +0000 UTC")
