"""PURE. Docker's word processing for Dockerfile arguments: quotes, escapes, `$VAR` expansion.

The `dockerfile` parser hands us instruction arguments as written (`ENV A="x y"` gives
`"x y"` with its quotes): quote removal and variable expansion are the builder's job, done by
BuildKit's `shell.Lex`. This is that lexer's behaviour for what Dockerfiles use:

- `'...'` is literal; inside `"..."` the escape character only escapes `"`, `$` and itself;
  outside quotes it escapes any character;
- `$NAME`, `${NAME}`, `${NAME:-word}` / `${NAME-word}` (default when unset-or-empty / unset),
  `${NAME:+word}` / `${NAME+word}` (alternative), `${NAME:?msg}` / `${NAME?msg}` (error);
  `word` is itself expanded; an unknown variable expands to nothing;
- `$` not followed by a name or `{` is a literal dollar.

`Lexer.used` collects the names looked up, so the build cache can key a step on the build
arguments it really used.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from imagefs.errors import BuildError

_NAME_START = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ_")
_NAME = _NAME_START | frozenset("0123456789")


@dataclass
class Lexer:
    env: Mapping[str, str]
    escape: str = "\\"
    used: set[str] = field(default_factory=set)

    def word(self, text: str) -> str:
        """One word: quotes removed, variables expanded, whitespace kept."""
        words = self._process(text, split=False)
        return words[0] if words else ""

    def words(self, text: str) -> list[str]:
        """Split on unquoted whitespace after expansion (EXPOSE, VOLUME in shell form)."""
        return self._process(text, split=True)

    # -- the scanner --------------------------------------------------------------------------

    def _process(self, text: str, *, split: bool) -> list[str]:
        out: list[str] = []
        cur: list[str] = []
        have_word = False
        i, n = 0, len(text)
        while i < n:
            ch = text[i]
            if split and ch in " \t\n":
                if have_word:
                    out.append("".join(cur))
                    cur, have_word = [], False
                i += 1
                continue
            have_word = True
            if ch == "'":
                end = text.find("'", i + 1)
                if end < 0:
                    raise BuildError(f"unterminated single quote in {text!r}")
                cur.append(text[i + 1 : end])
                i = end + 1
            elif ch == '"':
                i = self._double_quoted(text, i + 1, cur)
            elif ch == self.escape:
                if i + 1 < n:
                    cur.append(text[i + 1])
                i += 2
            elif ch == "$":
                value, i = self._dollar(text, i + 1)
                if split and value:
                    # An unquoted expansion is split like the rest of the word.
                    parts = value.split()
                    if value[0].isspace() and have_word and cur:
                        out.append("".join(cur))
                        cur = []
                    for part in parts[:-1]:
                        cur.append(part)
                        out.append("".join(cur))
                        cur = []
                    if parts:
                        cur.append(parts[-1])
                    if value[-1].isspace():
                        out.append("".join(cur))
                        cur, have_word = [], False
                else:
                    cur.append(value)
            else:
                cur.append(ch)
                i += 1
        if have_word or (not split and not out):
            out.append("".join(cur))
        return out

    def _double_quoted(self, text: str, i: int, cur: list[str]) -> int:
        n = len(text)
        while i < n:
            ch = text[i]
            if ch == '"':
                return i + 1
            if ch == self.escape and i + 1 < n and text[i + 1] in ('"', "$", self.escape):
                cur.append(text[i + 1])
                i += 2
            elif ch == "$":
                value, i = self._dollar(text, i + 1)
                cur.append(value)
            else:
                cur.append(ch)
                i += 1
        raise BuildError(f"unterminated double quote in {text!r}")

    def _lookup(self, name: str) -> str | None:
        self.used.add(name)
        return self.env.get(name)

    def _dollar(self, text: str, i: int) -> tuple[str, int]:
        """Expand what follows a `$` at text[i:]; return (value, index after it)."""
        n = len(text)
        if i < n and text[i] == "{":
            return self._braced(text, i + 1)
        if i < n and text[i] in _NAME_START:
            j = i
            while j < n and text[j] in _NAME:
                j += 1
            return self._lookup(text[i:j]) or "", j
        return "$", i

    def _braced(self, text: str, i: int) -> tuple[str, int]:
        n = len(text)
        j = i
        while j < n and text[j] in _NAME:
            j += 1
        name = text[i:j]
        if not name:
            raise BuildError(f"bad substitution in {text!r}")
        if j >= n:
            raise BuildError(f"missing '}}' in {text!r}")
        if text[j] == "}":
            return self._lookup(name) or "", j + 1
        colon = text[j] == ":"
        if colon:
            j += 1
        if j >= n or text[j] not in "-+?":
            raise BuildError(f"unsupported modifier in ${{{name}...}} in {text!r}")
        op = text[j]
        word, end = self._until_brace(text, j + 1)
        value = self._lookup(name)
        present = value is not None and (value != "" or not colon)
        if op == "-":
            return (value if present and value is not None else word), end
        if op == "+":
            return (word if present else ""), end
        if not present:  # "?"
            raise BuildError(f"{name}: {word or 'is not set'}")
        return value or "", end

    def _until_brace(self, text: str, i: int) -> tuple[str, int]:
        """The expanded word of `${NAME:-word}` and the index after its closing brace."""
        depth = 0
        j = i
        n = len(text)
        while j < n:
            ch = text[j]
            if ch == self.escape:
                j += 2
                continue
            if ch == "{":
                depth += 1
            elif ch == "}":
                if depth == 0:
                    return self.word(text[i:j]), j + 1
                depth -= 1
            j += 1
        raise BuildError(f"missing '}}' in {text!r}")
