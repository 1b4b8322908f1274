"""The Go text/template subset of docker's --format, and docker's table/json/filter rules.

Expected outputs are what Go's text/template and docker print for the same template and data.
"""

from __future__ import annotations

from typing import Any

import pytest

from imagefs.errors import UsageError
from imagefs.formats import parse_filters, render, tabwriter
from imagefs.gotemplate import TemplateError, parse

DATA: dict[str, Any] = {
    "Id": "sha256:abc",
    "RepoTags": ["a:1", "b:2"],
    "Size": 1234,
    "Config": {
        "Env": ["PATH=/bin", "X=1"],
        "Cmd": None,
        "Labels": {"org.x": "1", "b": "two words"},
        "Tty": False,
    },
}


@pytest.mark.parametrize(
    "template,want",
    [
        ("{{.Id}}", "sha256:abc"),
        ("{{.Config.Env}}", "[PATH=/bin X=1]"),
        ("{{.Config.Labels}}", "map[b:two words org.x:1]"),
        ("{{.Size}} {{.Config.Tty}}", "1234 false"),
        ("{{.Config.Cmd}}", "<no value>"),
        ("{{json .Config.Env}}", '["PATH=/bin","X=1"]'),
        ("{{json .Config.Cmd}}", "null"),
        ('{{join .RepoTags ", "}}', "a:1, b:2"),
        ('{{index .Config.Labels "org.x"}}', "1"),
        ("{{index .RepoTags 1}}", "b:2"),
        ("{{(index .RepoTags 0) | upper}}", "A:1"),
        ("{{truncate .Id 9 | upper}}", "SHA256:AB"),
        ('{{title (index .Config.Labels "b")}}', "Two Words"),
        ("{{range .RepoTags}}[{{.}}]{{end}}", "[a:1][b:2]"),
        ("{{range $i, $t := .RepoTags}}{{$i}}={{$t}} {{end}}", "0=a:1 1=b:2 "),
        ("{{range $k, $v := .Config.Labels}}{{$k}}:{{$v}};{{end}}", "b:two words;org.x:1;"),
        ("{{range .Config.Cmd}}x{{else}}empty{{end}}", "empty"),
        ("{{if .Config.Cmd}}cmd{{else if .Config.Env}}env{{else}}none{{end}}", "env"),
        ("{{if not .Config.Tty}}no tty{{end}}", "no tty"),
        ("{{with .Config}}{{len .Env}}{{end}}", "2"),
        ("{{$n := len .RepoTags}}{{$n}} tags, {{$.Size}}", "2 tags, 1234"),
        ("a  {{- .Size -}}  b", "a1234b"),
        ("{{/* a comment */}}ok", "ok"),
        ('{{printf "%s has %d tags" .Id (len .RepoTags)}}', "sha256:abc has 2 tags"),
        ('{{eq (index .RepoTags 0) "a:1" "z"}} {{ne .Size 1}}', "true true"),
        ('{{split "a,b" ","}}', "[a b]"),
        ("{{println .Size}}", "1234\n"),
        (
            "{{json .}}",
            '{"Id":"sha256:abc","RepoTags":["a:1","b:2"],"Size":1234,"Config":'
            '{"Env":["PATH=/bin","X=1"],"Cmd":null,"Labels":{"org.x":"1","b":"two words"},'
            '"Tty":false}}',
        ),
    ],
)
def test_templates_print_what_go_prints(template: str, want: str) -> None:
    assert parse(template).execute(DATA) == want


@pytest.mark.parametrize(
    "template,message",
    [
        ("{{.Nope}}", 'map has no entry for key "Nope"'),
        ("{{.Config.Cmd.X}}", "nil pointer evaluating .X"),
        ("{{.Id.X}}", "can't evaluate field X"),
        ("{{.Id", "unclosed action"),
        ("{{if .Id}}x", "{{if}} has no {{end}}"),
        ("{{end}}", "unexpected {{end}}"),
        ("{{nosuch .Id}}", 'function "nosuch" not defined'),
        ("{{index .RepoTags 5}}", "index out of range"),
        ("{{.Id .Size}}", "can't give argument to non-function .Id"),
        ('{{define "x"}}{{end}}', "not supported"),
        ("{{$x = 1}}", "not supported"),
        ("{{$nope}}", 'undefined variable "$nope"'),
    ],
)
def test_bad_templates_are_usage_errors_naming_the_problem(template: str, message: str) -> None:
    with pytest.raises(TemplateError, match="^template: .*" + _re(message)) as info:
        parse(template).execute(DATA)
    assert isinstance(info.value, UsageError) and info.value.exit_code == 2


def _re(text: str) -> str:
    import re

    return re.escape(text)


ROWS = [
    {"Repository": "alpine", "Tag": "3.19", "ID": "0123456789ab", "Size": "7.8MB"},
    {"Repository": "example.com/a/long-name", "Tag": "<none>", "ID": "ba9876543210", "Size": "1GB"},
]
HEADERS = {"Repository": "REPOSITORY", "Tag": "TAG", "ID": "IMAGE ID", "Size": "SIZE"}
DEFAULT = "table {{.Repository}}\t{{.Tag}}\t{{.ID}}\t{{.Size}}"


def test_table_is_docker_tabwriter_layout() -> None:
    # docker images, byte for byte: columns at least 10 wide, 3 spaces of padding.
    assert render("table", ROWS, HEADERS, DEFAULT) == (
        "REPOSITORY                TAG       IMAGE ID       SIZE\n"
        "alpine                    3.19      0123456789ab   7.8MB\n"
        "example.com/a/long-name   <none>    ba9876543210   1GB\n"
    )


def test_table_template_titles_columns_and_escapes_tabs() -> None:
    got = render("table {{.ID}}\\t{{upper .Repository}}", ROWS, HEADERS, DEFAULT)
    assert got.splitlines() == [
        "IMAGE ID       REPOSITORY",
        "0123456789ab   ALPINE",
        "ba9876543210   EXAMPLE.COM/A/LONG-NAME",
    ]


def test_plain_template_and_json_print_a_line_per_item() -> None:
    assert render("{{.ID}}: {{.Repository}}", ROWS, HEADERS, DEFAULT) == (
        "0123456789ab: alpine\nba9876543210: example.com/a/long-name\n"
    )
    assert render("{{json .}}", ROWS[:1], HEADERS, DEFAULT) == render(
        "json", ROWS[:1], HEADERS, DEFAULT
    )
    assert render("json", ROWS[:1], HEADERS, DEFAULT) == (
        '{"Repository":"alpine","Tag":"3.19","ID":"0123456789ab","Size":"7.8MB"}\n'
    )


def test_tabwriter_blocks_follow_go() -> None:
    # A line with fewer cells ends a column block; text after the last tab is not a cell.
    assert tabwriter("a\tb\tc\nlonger-than-ten\tx\n\nq\tr") == (
        "a                 b         c\nlonger-than-ten   x\n\nq         r"
    )


def test_filters_parse_as_docker() -> None:
    got = parse_filters(
        ["dangling=true", "label=a=b", "label=c", "reference=x*"],
        ["dangling", "label", "reference"],
    )
    assert got == {"dangling": ["true"], "label": ["a=b", "c"], "reference": ["x*"]}
    with pytest.raises(UsageError, match="invalid filter 'color'"):
        parse_filters(["color=red"], ["dangling"])
    with pytest.raises(UsageError, match="expected name=value"):
        parse_filters(["dangling"], ["dangling"])
