"""PURE: the subset of Go's text/template that docker's `--format` speaks.

Why our own: PyPI has no maintained pure-Python implementation of Go's text/template (the one
package that claims it wraps Go's engine through CGo, needs a Go toolchain to build and is at
0.0.x). docker users write a small, stable subset, so a small evaluator does the job:

- text and `{{ actions }}`, with the `{{-`/`-}}` whitespace trim markers and `{{/* comments */}}`;
- fields `.A.B`, `.`, `$` (the data), `$name` variables (`{{$x := .A}}`, `range $k, $v := ...`);
- pipelines `a | f b` (the previous value is the last argument), parentheses, string / number /
  true / false / nil literals;
- `if` / `else if` / `else`, `range` (lists, maps by sorted key) with `else`, `with`, `end`;
- Go's functions `and or not len index print printf println eq ne lt le gt ge` and docker's
  `json join split upper lower title truncate pad`.

Values are JSON-shaped Python values (dict, list, str, int, float, bool, None) and print the way
Go prints them (`[a b]`, `map[k:v]`, `true`, `<no value>`). A field that is not there is an
error naming it (docker's inspect runs with `missingkey=error`), not a silent empty string.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from imagefs.errors import UsageError

__all__ = ["Header", "Template", "TemplateError", "go_string", "parse"]


class TemplateError(UsageError):
    """A --format template that does not parse or cannot be executed on this data."""

    def __init__(self, message: str) -> None:
        super().__init__(f"template: {message}")


class Header(str):
    """A table header standing in for a value: any field of it is itself (docker renders the
    header row by running the template on a context whose every field is a column title)."""

    __slots__ = ()


# -- lexing -----------------------------------------------------------------------------------

_ACTION = re.compile(r"\{\{(-\s)?(.*?)(\s-)?\}\}", re.S)
_TOKEN = re.compile(
    r"""\s*(?:
      (?P<str>"(?:[^"\\]|\\.)*")
    | (?P<raw>`[^`]*`)
    | (?P<num>-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?)
    | (?P<decl>:=)
    | (?P<field>(?:\$[A-Za-z0-9_]*)?(?:\.[A-Za-z0-9_]+)+|\.|\$[A-Za-z0-9_]*)
    | (?P<ident>[A-Za-z_][A-Za-z0-9_]*)
    | (?P<punct>[|(),=])
    )""",
    re.X,
)
_CHAIN = re.compile(r"(?:\.[A-Za-z0-9_]+)+")


def _tokens(text: str) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    pos = 0
    text = text.rstrip()
    while pos < len(text):
        if out and out[-1] == ("punct", ")") and (chain := _CHAIN.match(text, pos)):
            out.append(("chain", chain.group(0)))  # `(...).B`: fields of the parenthesis
            pos = chain.end()
            continue
        m = _TOKEN.match(text, pos)
        if m is None or m.end() == pos:
            raise TemplateError(f"unexpected {text[pos:].strip()[:20]!r} in action")
        kind = m.lastgroup
        assert kind is not None
        out.append((kind, m.group(kind)))
        pos = m.end()
    return out


# -- the tree ---------------------------------------------------------------------------------


@dataclass
class _Field:
    var: str  # "" for the dot, "$" for the data, "$name" for a variable
    names: tuple[str, ...]
    source: str


@dataclass
class _Lit:
    value: Any


@dataclass
class _Func:
    name: str


@dataclass
class _Sub:
    pipe: _Pipe
    names: tuple[str, ...] = ()


_Arg = _Field | _Lit | _Func | _Sub


@dataclass
class _Pipe:
    commands: list[list[_Arg]]
    decl: list[str] = field(default_factory=list)


@dataclass
class _Text:
    text: str


@dataclass
class _Action:
    pipe: _Pipe


@dataclass
class _Block:
    kind: str  # if, range, with
    pipe: _Pipe
    body: list[_Node] = field(default_factory=list)
    orelse: list[_Node] = field(default_factory=list)


_Node = _Text | _Action | _Block


class _Parser:
    def __init__(self, toks: list[tuple[str, str]]) -> None:
        self.toks = toks
        self.i = 0

    def peek(self) -> tuple[str, str] | None:
        return self.toks[self.i] if self.i < len(self.toks) else None

    def take(self) -> tuple[str, str]:
        tok = self.peek()
        if tok is None:
            raise TemplateError("unexpected end of action")
        self.i += 1
        return tok

    def pipeline(self, *, allow_decl: bool = True) -> _Pipe:
        decl: list[str] = []
        if allow_decl:
            j = self.i
            names = []
            while j < len(self.toks) and self.toks[j][0] == "field":
                name = self.toks[j][1]
                if not name.startswith("$") or "." in name:
                    break
                names.append(name)
                j += 1
                if j < len(self.toks) and self.toks[j] == ("punct", ","):
                    j += 1
                    continue
                break
            if names and j < len(self.toks) and self.toks[j][0] == "decl":
                decl, self.i = names, j + 1
            elif names and j < len(self.toks) and self.toks[j] == ("punct", "="):
                raise TemplateError("assigning to a variable (=) is not supported; use :=")
        commands: list[list[_Arg]] = [[]]
        while (tok := self.peek()) is not None and tok != ("punct", ")"):
            if tok == ("punct", "|"):
                self.take()
                if not commands[-1]:
                    raise TemplateError("missing command before |")
                commands.append([])
                continue
            commands[-1].append(self.operand())
        if not commands[-1]:
            raise TemplateError("missing value for command")
        return _Pipe(commands, decl)

    def operand(self) -> _Arg:
        kind, text = self.take()
        if kind == "str":
            try:
                return _Lit(json.loads(text))
            except ValueError:
                raise TemplateError(f"bad string {text}") from None
        if kind == "raw":
            return _Lit(text[1:-1])
        if kind == "num":
            return _Lit(float(text) if any(c in text for c in ".eE") else int(text))
        if kind == "field":
            var, _, rest = text.partition(".") if text.startswith("$") else ("", "", text[1:])
            names = tuple(n for n in rest.split(".") if n)
            return _Field(var, names, text)
        if kind == "ident":
            if text in ("true", "false"):
                return _Lit(text == "true")
            if text == "nil":
                return _Lit(None)
            if text in _KEYWORDS:
                raise TemplateError(f"unexpected {text!r} in operand")
            if text not in FUNCTIONS:
                raise TemplateError(f'function "{text}" not defined')
            return _Func(text)
        if (kind, text) == ("punct", "("):
            pipe = self.pipeline(allow_decl=False)
            if self.take() != ("punct", ")"):
                raise TemplateError("unclosed (")
            chain: tuple[str, ...] = ()
            nxt = self.peek()
            if nxt is not None and nxt[0] == "chain":
                self.take()  # `(index .A 0).B`: a field chain right after the parenthesis
                chain = tuple(n for n in nxt[1].split(".") if n)
            return _Sub(pipe, chain)
        raise TemplateError(f"unexpected {text!r} in operand")


_KEYWORDS = {"if", "else", "end", "range", "with", "define", "template", "block", "break"}


@dataclass
class _Frame:
    block: _Block
    outer: list[_Node]  # the list to go back to at {{end}}
    chained: bool = False  # an `else if`: its {{end}} also ends the block it continues
    in_else: bool = False


def parse(source: str) -> Template:
    """Parse a template; raises `TemplateError` naming what is wrong."""
    nodes: list[_Node] = []
    stack: list[_Frame] = []
    current = nodes
    pos = 0
    trim_next = False
    for m in _ACTION.finditer(source):
        text = source[pos : m.start()]
        if trim_next:
            text = text.lstrip()
        if m.group(1):
            text = text.rstrip()
        if text:
            current.append(_Text(text))
        pos = m.end()
        trim_next = bool(m.group(3))
        body = m.group(2).strip()
        if body.startswith("/*"):
            if not body.endswith("*/"):
                raise TemplateError("unclosed comment")
            continue
        toks = _tokens(body)
        if not toks:
            raise TemplateError("missing value for command")
        head = toks[0]
        if head == ("ident", "end"):
            if not stack or len(toks) > 1:
                raise TemplateError("unexpected {{end}}")
            frame = stack.pop()
            while frame.chained:
                frame = stack.pop()
            current = frame.outer
            continue
        if head == ("ident", "else"):
            if not stack or stack[-1].in_else:
                raise TemplateError("unexpected {{else}}")
            frame = stack[-1]
            frame.in_else = True
            current = frame.block.orelse
            if len(toks) > 1 and toks[1] in (("ident", "if"), ("ident", "with")):
                # `else if X` is an `else` holding one `if X`, ended by the same {{end}}.
                inner = _Block(toks[1][1], _statement(toks[2:], toks[1][1]))
                current.append(inner)
                stack.append(_Frame(inner, current, chained=True))
                current = inner.body
            elif len(toks) > 1:
                raise TemplateError("unexpected tokens after {{else}}")
            continue
        if head[0] == "ident" and head[1] in ("if", "range", "with"):
            block = _Block(head[1], _statement(toks[1:], head[1]))
            current.append(block)
            stack.append(_Frame(block, current))
            current = block.body
            continue
        if head[0] == "ident" and head[1] in _KEYWORDS:
            raise TemplateError(f"{{{{{head[1]}}}}} is not supported")
        current.append(_Action(_statement(toks, "action")))
    tail = source[pos:]
    if trim_next:
        tail = tail.lstrip()
    if "{{" in tail:
        raise TemplateError("unclosed action")
    if tail:
        current.append(_Text(tail))
    if stack:
        raise TemplateError(f"unexpected EOF: {{{{{stack[-1].block.kind}}}}} has no {{{{end}}}}")
    return Template(nodes)


def _statement(toks: list[tuple[str, str]], what: str) -> _Pipe:
    if not toks:
        raise TemplateError(f"missing value for {what}")
    p = _Parser(toks)
    pipe = p.pipeline(allow_decl=what != "if")
    extra = p.peek()
    if extra is not None:
        raise TemplateError(f"unexpected {extra[1]!r} in {what}")
    return pipe


# -- execution --------------------------------------------------------------------------------


class _Scope:
    def __init__(self, data: Any) -> None:
        self.vars: list[tuple[str, Any]] = [("$", data)]

    def get(self, name: str) -> Any:
        for k, v in reversed(self.vars):
            if k == name:
                return v
        raise TemplateError(f'undefined variable "{name}"')


@dataclass
class Template:
    nodes: list[_Node]
    _header: bool = False

    def execute(self, data: Any, *, header: bool = False) -> str:
        """Run the template on `data`. With `header`, docker's functions hand back a `Header`
        argument unchanged (docker's HeaderFunctions), so `table {{upper .ID}}` titles the
        column `IMAGE ID`, not `IMAGE ID` upper-cased by accident of the data."""
        out: list[str] = []
        self._header = header
        self._run(self.nodes, data, _Scope(data), out)
        return "".join(out)

    def _run(self, nodes: Sequence[_Node], dot: Any, scope: _Scope, out: list[str]) -> None:
        for node in nodes:
            if isinstance(node, _Text):
                out.append(node.text)
            elif isinstance(node, _Action):
                value = self._pipe(node.pipe, dot, scope)
                if not node.pipe.decl:
                    out.append(go_string(value))
            else:
                mark = len(scope.vars)
                self._block(node, dot, scope, out)
                del scope.vars[mark:]

    def _block(self, node: _Block, dot: Any, scope: _Scope, out: list[str]) -> None:
        if node.kind == "range":
            value = self._eval_pipe(node.pipe, dot, scope)
            if isinstance(value, Mapping):
                items = [(k, value[k]) for k in sorted(value)]
            elif isinstance(value, (list, tuple)):
                items = list(enumerate(value))
            elif isinstance(value, int) and not isinstance(value, bool):
                items = [(i, i) for i in range(value)]
            elif value is None:
                items = []
            else:
                raise TemplateError(f"range can't iterate over {go_string(value)}")
            if not items:
                self._run(node.orelse, dot, scope, out)
            for key, item in items:
                mark = len(scope.vars)
                decl = node.pipe.decl
                if len(decl) == 1:
                    scope.vars.append((decl[0], item))
                elif len(decl) == 2:
                    scope.vars += [(decl[0], key), (decl[1], item)]
                self._run(node.body, item, scope, out)
                del scope.vars[mark:]
            return
        value = self._pipe(node.pipe, dot, scope)
        if truth(value):
            self._run(node.body, value if node.kind == "with" else dot, scope, out)
        else:
            self._run(node.orelse, dot, scope, out)

    def _pipe(self, pipe: _Pipe, dot: Any, scope: _Scope) -> Any:
        value = self._eval_pipe(pipe, dot, scope)
        if pipe.decl:
            scope.vars.append((pipe.decl[0], value))
        return value

    def _eval_pipe(self, pipe: _Pipe, dot: Any, scope: _Scope) -> Any:
        value: Any = _NOTHING
        for command in pipe.commands:
            value = self._command(command, dot, scope, value)
        return value

    def _command(self, command: list[_Arg], dot: Any, scope: _Scope, prev: Any) -> Any:
        first = command[0]
        if isinstance(first, _Func):
            args = [self._arg(a, dot, scope) for a in command[1:]]
            if prev is not _NOTHING:
                args.append(prev)
            if self._header and first.name in _DOCKER_FUNCTIONS:
                titles = [a for a in args if isinstance(a, Header)]
                if titles:
                    return titles[0]
            try:
                return FUNCTIONS[first.name](*args)
            except TemplateError:
                raise
            except (TypeError, ValueError, KeyError, IndexError) as exc:
                raise TemplateError(f"error calling {first.name}: {exc}") from None
        if len(command) > 1 or prev is not _NOTHING:
            raise TemplateError(f"can't give argument to non-function {_show(first)}")
        return self._arg(first, dot, scope)

    def _arg(self, arg: _Arg, dot: Any, scope: _Scope) -> Any:
        if isinstance(arg, _Lit):
            return arg.value
        if isinstance(arg, _Func):
            return FUNCTIONS[arg.name]()
        if isinstance(arg, _Sub):
            return _walk(self._eval_pipe(arg.pipe, dot, scope), arg.names, "(...)")
        base = dot if arg.var == "" else scope.get(arg.var)
        return _walk(base, arg.names, arg.source)


_NOTHING = object()


def _show(arg: _Arg) -> str:
    if isinstance(arg, _Field):
        return arg.source
    if isinstance(arg, _Lit):
        return go_string(arg.value)
    return "(...)"


def _walk(value: Any, names: Sequence[str], source: str) -> Any:
    for name in names:
        if isinstance(value, Header):
            return value
        if isinstance(value, Mapping):
            if name not in value:
                raise TemplateError(f'executing at <{source}>: map has no entry for key "{name}"')
            value = value[name]
        elif value is None:
            raise TemplateError(f"executing at <{source}>: nil pointer evaluating .{name}")
        else:
            raise TemplateError(
                f"executing at <{source}>: can't evaluate field {name} in {go_string(value)!r}"
            )
    return value


# -- values and functions ---------------------------------------------------------------------


def go_string(value: Any) -> str:
    """How Go's fmt prints a value (`%v`), for JSON-shaped values."""
    if value is None or value is _NOTHING:
        return "<no value>"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value
    if isinstance(value, float):
        return (
            repr(value).replace("e+0", "e+").replace("e-0", "e-") if value % 1 else str(int(value))
        )
    if isinstance(value, Mapping):
        return "map[" + " ".join(f"{k}:{_inner(value[k])}" for k in sorted(value)) + "]"
    if isinstance(value, (list, tuple)):
        return "[" + " ".join(_inner(v) for v in value) + "]"
    return str(value)


def _inner(value: Any) -> str:
    return "<nil>" if value is None else go_string(value)


def truth(value: Any) -> bool:
    """Go's truth: false, 0, nil and empty strings, lists and maps are false."""
    return value is not _NOTHING and bool(value)


def _json(value: Any) -> str:
    # docker's `json`: encoding/json with HTML escaping off, no trailing newline.
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _index(value: Any, *keys: Any) -> Any:
    for key in keys:
        if isinstance(value, Mapping):
            value = value.get(key)  # Go: a missing key of a map is its zero value
        elif isinstance(value, (list, tuple, str)):
            if not isinstance(key, int) or not 0 <= key < len(value):
                raise TemplateError(f"error calling index: index out of range: {key}")
            value = value[key]
        elif value is None:
            raise TemplateError("error calling index: index of untyped nil")
        else:
            raise TemplateError(f"error calling index: can't index item of type {type(value)}")
    return value


def _printf(fmt: str, *args: Any) -> str:
    it = iter(args)

    def one(m: re.Match[str]) -> str:
        verb = m.group(2)
        if verb == "%":
            return "%"
        value = next(it, _NOTHING)
        if value is _NOTHING:
            return f"%!{verb}(MISSING)"
        text = json.dumps(value) if verb == "q" else go_string(value)
        width = m.group(1)
        if width:
            n = int(width.lstrip("-"))
            text = text.ljust(n) if width.startswith("-") else text.rjust(n)
        return text

    return re.sub(r"%(-?\d+)?([svdqt%])", one, fmt)


def _compare(op: Callable[[Any, Any], bool]) -> Callable[..., bool]:
    def fn(a: Any, b: Any) -> bool:
        try:
            return op(a, b)
        except TypeError:
            raise TemplateError(f"incompatible types for comparison: {a!r}, {b!r}") from None

    return fn


def _and(*args: Any) -> Any:
    for a in args:
        if not truth(a):
            return a
    return args[-1]


def _or(*args: Any) -> Any:
    for a in args:
        if truth(a):
            return a
    return args[-1]


_DOCKER_FUNCTIONS = {"json", "join", "split", "upper", "lower", "title", "truncate", "pad"}

FUNCTIONS: dict[str, Callable[..., Any]] = {
    # Go's builtins
    "and": _and,
    "or": _or,
    "not": lambda a: not truth(a),
    "len": lambda a: len(a),
    "index": _index,
    "print": lambda *a: " ".join(go_string(x) for x in a),
    "println": lambda *a: " ".join(go_string(x) for x in a) + "\n",
    "printf": _printf,
    "eq": lambda a, *b: any(a == x for x in b),
    "ne": _compare(lambda a, b: a != b),
    "lt": _compare(lambda a, b: a < b),
    "le": _compare(lambda a, b: a <= b),
    "gt": _compare(lambda a, b: a > b),
    "ge": _compare(lambda a, b: a >= b),
    # docker's (cli/templates)
    "json": _json,
    "join": lambda items, sep: sep.join(go_string(x) for x in items or []),
    "split": lambda s, sep: s.split(sep),
    "upper": lambda s: go_string(s).upper(),
    "lower": lambda s: go_string(s).lower(),
    "title": lambda s: re.sub(r"\b[a-z]", lambda m: m.group(0).upper(), go_string(s)),
    "truncate": lambda s, n: go_string(s)[: int(n)],
    "pad": lambda s, left, right: " " * int(left) + go_string(s) + " " * int(right),
}
