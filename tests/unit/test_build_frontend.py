"""The pure parts of `imagefs build`: word expansion, .dockerignore, parsing into stages."""

from __future__ import annotations

import pytest

from imagefs.build import frontend
from imagefs.build.context import IgnoreRules
from imagefs.build.words import Lexer
from imagefs.errors import BuildError

ENV = {"A": "a", "EMPTY": "", "SP": "x y"}


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("$A", "a"),
        ("${A}b", "ab"),
        ("${NOPE:-d}", "d"),
        ("${EMPTY:-d}", "d"),
        ("${EMPTY-d}", ""),
        ("${A:+alt}", "alt"),
        ("${NOPE:+alt}", ""),
        ("'$A'", "$A"),
        ('"$A b"', "a b"),
        (r"\$A", "$A"),
        ('"\\"q\\""', '"q"'),
        ("$", "$"),
        ("${NOPE:-${A}}", "a"),
    ],
)
def test_word_expansion(text: str, want: str) -> None:
    assert Lexer(ENV).word(text) == want


def test_words_split_and_used_names() -> None:
    lexer = Lexer(ENV)
    assert lexer.words('80 "a b" $SP') == ["80", "a b", "x", "y"]
    assert lexer.used == {"SP"}
    with pytest.raises(BuildError, match="not set"):
        Lexer({}).word("${X:?}")


def test_dockerignore_rules() -> None:
    rules = IgnoreRules.parse("# c\n**/*.log\n!keep.log\nbuild/*\n/secret\n")
    assert rules.excluded("a.log") and rules.excluded("x/y/z.log")
    assert not rules.excluded("keep.log")
    assert rules.excluded("build/out") and not rules.excluded("build")
    assert rules.excluded("secret/key")  # a parent directory matches
    assert not rules.excluded("src/main")


def test_parse_stages_args_and_errors() -> None:
    df = frontend.parse(
        "ARG V=1\nFROM base:$V AS one\nRUN a \\\n  b\nFROM one\nCOPY --from=one /x /y\n"
        "FROM other AS unused\n"
    )
    assert [s.label for s in df.stages] == ["one", "stage-1", "unused"]
    meta = frontend.meta_arg_values(df, {"V": "2"})
    assert frontend.resolve_base(df.stages[0], meta, df.escape) == "base:2"
    target = frontend.select_target(df, "one")
    assert [s.index for s in frontend.needed_stages(df, df.stages[1], meta)] == [0, 1]
    assert target.index == 0
    with pytest.raises(BuildError, match="Dockerfile:2: unknown instruction"):
        frontend.parse("FROM a\nNOPE x\n")
    with pytest.raises(BuildError, match="before the first FROM"):
        frontend.parse("RUN x\n")
    with pytest.raises(BuildError, match="target stage 'zz'"):
        frontend.select_target(df, "zz")
