"""PURE. A Dockerfile as stages of instructions, parsed by BuildKit's own parser.

The parser is the PyPI `dockerfile` package: a compiled wrapper of
`github.com/moby/buildkit/frontend/dockerfile/parser`, the grammar docker itself uses (line
continuations, the `# escape=` directive, JSON vs shell form, heredocs). It ships manylinux
wheels, so it installs without a Go toolchain. A hand-written parser would drift from docker
on exactly the corners (continuations inside comments, heredocs) users trip over.

What the parser leaves to the builder, and this module does: checking instruction names,
splitting the file into stages at each FROM, the `ARG`s declared before the first FROM
(usable only in FROM lines, and in a stage that re-declares them), and choosing which stages
a `--target` needs.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import dockerfile

from imagefs.build.words import Lexer
from imagefs.errors import BuildError

KNOWN = frozenset(
    [
        "ADD",
        "ARG",
        "CMD",
        "COPY",
        "ENTRYPOINT",
        "ENV",
        "EXPOSE",
        "FROM",
        "HEALTHCHECK",
        "LABEL",
        "MAINTAINER",
        "ONBUILD",
        "RUN",
        "SHELL",
        "STOPSIGNAL",
        "USER",
        "VOLUME",
        "WORKDIR",
    ]
)
_ESCAPE_DIRECTIVE = re.compile(r"^#\s*escape\s*=\s*(\S)\s*$", re.IGNORECASE)


@dataclass(frozen=True)
class Heredoc:
    name: str
    content: str


@dataclass(frozen=True)
class Instruction:
    cmd: str
    """Upper case: RUN, COPY, ..."""
    args: tuple[str, ...]
    """As the parser split them, before quote removal and expansion."""
    flags: tuple[str, ...]
    json: bool
    original: str
    line: int
    heredocs: tuple[Heredoc, ...] = ()
    sub_cmd: str | None = None
    """ONBUILD's instruction name."""

    def flag(self, name: str) -> str | None:
        """The value of `--name=VALUE` (last one wins), or None."""
        found = None
        for f in self.flags:
            key, eq, value = f.partition("=")
            if key == f"--{name}":
                found = value if eq else "true"
        return found

    def check_flags(self, allowed: Sequence[str]) -> None:
        for f in self.flags:
            key = f.partition("=")[0].removeprefix("--")
            if key not in allowed:
                raise BuildError(f"Dockerfile:{self.line}: unknown flag {f!r} for {self.cmd}")


@dataclass(frozen=True)
class Stage:
    index: int
    name: str | None
    base: str
    """The FROM argument, unexpanded."""
    platform: str | None
    instructions: tuple[Instruction, ...]
    line: int

    @property
    def label(self) -> str:
        """What BuildKit's progress calls the stage."""
        return self.name or f"stage-{self.index}"


@dataclass(frozen=True)
class Dockerfile:
    meta_args: tuple[Instruction, ...]
    stages: tuple[Stage, ...]
    escape: str


def parse(text: str) -> Dockerfile:
    """Parse Dockerfile text; a syntax error or unknown instruction names its line."""
    try:
        commands = dockerfile.parse_string(text)
    except dockerfile.GoParseError as exc:
        raise BuildError(f"Dockerfile: {_one_line(str(exc))}") from None
    escape = _escape_directive(text)
    meta: list[Instruction] = []
    stages: list[Stage] = []
    current: list[Instruction] | None = None
    head: Instruction | None = None

    def close() -> None:
        if head is not None and current is not None:
            stages.append(_stage(len(stages), head, current))

    for c in commands:
        ins = Instruction(
            cmd=c.cmd.upper(),
            args=tuple(c.value),
            flags=tuple(c.flags),
            json=bool(c.json),
            original=c.original,
            line=c.start_line,
            heredocs=tuple(Heredoc(h.name, h.content) for h in c.heredocs),
            sub_cmd=c.sub_cmd.upper() if c.sub_cmd else None,
        )
        if ins.cmd not in KNOWN:
            raise BuildError(f"Dockerfile:{ins.line}: unknown instruction: {c.cmd}")
        if ins.json and ins.cmd in ("RUN", "CMD", "ENTRYPOINT", "SHELL") and not ins.args:
            raise BuildError(f"Dockerfile:{ins.line}: {ins.cmd} needs a command")
        if ins.cmd == "FROM":
            close()
            head, current = ins, []
        elif current is None:
            if ins.cmd != "ARG":
                raise BuildError(
                    f"Dockerfile:{ins.line}: {ins.cmd} before the first FROM (only ARG may be)"
                )
            meta.append(ins)
        else:
            current.append(ins)
    close()
    if not stages:
        raise BuildError("Dockerfile: no FROM instruction")
    names = [s.name for s in stages if s.name]
    for name in names:
        if names.count(name) > 1:
            raise BuildError(f"Dockerfile: stage name {name!r} is used twice")
    return Dockerfile(tuple(meta), tuple(stages), escape)


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _escape_directive(text: str) -> str:
    """The `# escape=` parser directive (only among the first comment lines)."""
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        m = _ESCAPE_DIRECTIVE.match(line)
        if m:
            return m.group(1)
    return "\\"


def _stage(index: int, head: Instruction, body: list[Instruction]) -> Stage:
    head.check_flags(["platform"])
    args = list(head.args)
    name = None
    if len(args) == 3 and args[1].upper() == "AS":
        name = args[2].lower()
        if not re.fullmatch(r"[a-z][a-z0-9\-_.]*", name):
            raise BuildError(f"Dockerfile:{head.line}: invalid stage name {args[2]!r}")
    elif len(args) != 1:
        raise BuildError(f"Dockerfile:{head.line}: FROM takes IMAGE [AS NAME]")
    return Stage(index, name, args[0], head.flag("platform"), tuple(body), head.line)


def meta_arg_values(df: Dockerfile, build_args: Mapping[str, str]) -> dict[str, str]:
    """Values of the ARGs before the first FROM (defaults may use earlier ones)."""
    values: dict[str, str] = {}
    for ins in df.meta_args:
        for name, default in arg_pairs(ins, Lexer(values, df.escape)):
            if name in build_args:
                values[name] = build_args[name]
            elif default is not None:
                values[name] = default
    return values


def arg_pairs(ins: Instruction, lexer: Lexer) -> list[tuple[str, str | None]]:
    """`ARG A B=1` -> [("A", None), ("B", "1")], defaults expanded."""
    out: list[tuple[str, str | None]] = []
    for raw in ins.args:
        name, eq, default = raw.partition("=")
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise BuildError(f"Dockerfile:{ins.line}: invalid ARG name {name!r}")
        out.append((name, lexer.word(default) if eq else None))
    return out


def resolve_base(stage: Stage, meta: Mapping[str, str], escape: str) -> str:
    base = Lexer(meta, escape).word(stage.base)
    if not base:
        raise BuildError(f"Dockerfile:{stage.line}: FROM names an empty image")
    return base


def find_stage(df: Dockerfile, name: str, before: int | None = None) -> Stage | None:
    """A stage by name (case-insensitive) or index, among those before `before`."""
    pool = df.stages if before is None else df.stages[:before]
    for stage in pool:
        if stage.name == name.lower():
            return stage
    if name.isdigit() and int(name) < len(pool):
        return pool[int(name)]
    return None


def needed_stages(df: Dockerfile, target: Stage, meta: Mapping[str, str]) -> list[Stage]:
    """The target and the stages it depends on (FROM a stage, COPY --from), in file order."""
    need: set[int] = set()

    def visit(stage: Stage) -> None:
        if stage.index in need:
            return
        need.add(stage.index)
        base = find_stage(df, resolve_base(stage, meta, df.escape), stage.index)
        if base is not None:
            visit(base)
        for ins in stage.instructions:
            src = ins.flag("from") if ins.cmd in ("COPY", "ADD") else None
            if src is not None:
                dep = find_stage(df, Lexer(meta, df.escape).word(src), stage.index)
                if dep is not None:
                    visit(dep)

    visit(target)
    return [s for s in df.stages if s.index in need]


def select_target(df: Dockerfile, target: str | None) -> Stage:
    if target is None:
        return df.stages[-1]
    found = find_stage(df, target)
    if found is None or found.name is None:
        raise BuildError(f"target stage {target!r} could not be found")
    return found
