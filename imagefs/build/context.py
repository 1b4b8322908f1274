"""The build context: `.dockerignore` (docker's rules), COPY/ADD source selection, and the
content digest of a step's sources that keys the build cache.

`.dockerignore` as docker reads it (moby/patternmatcher): one pattern a line, `#` comments,
blank lines skipped, surrounding whitespace trimmed, each pattern cleaned like Go's
`filepath.Clean` with a leading `/` dropped; `*` and `?` do not cross `/`, `**` matches any
number of directories; `!pattern` re-includes; the last matching pattern wins; a path is
excluded when it or one of its parent directories is.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import posixpath
import re
import stat
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from imagefs.errors import BuildError


def clean(path: str) -> str:
    """Go's filepath.Clean, relative to the context root ("" for the root itself)."""
    cleaned = posixpath.normpath("/" + path).lstrip("/")
    return "" if cleaned == "." else cleaned


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    out = []
    i, n = 0, len(pattern)
    while i < n:
        ch = pattern[i]
        if ch == "*":
            if pattern.startswith("**", i):
                i += 2
                if pattern.startswith("/", i):  # `**/` matches zero or more directories
                    out.append("(?:.*/)?")
                    i += 1
                else:
                    out.append(".*")
                continue
            out.append("[^/]*")
        elif ch == "?":
            out.append("[^/]")
        elif ch == "[":
            end = pattern.find("]", i + 1)
            if end < 0:
                raise BuildError(f".dockerignore: bad pattern {pattern!r}")
            body = pattern[i + 1 : end].replace("\\", "\\\\")
            if body.startswith("^") or body.startswith("!"):
                body = "^" + body[1:]
            out.append(f"[{body}]")
            i = end
        elif ch == "\\" and i + 1 < n:
            out.append(re.escape(pattern[i + 1]))
            i += 1
        else:
            out.append(re.escape(ch))
        i += 1
    return re.compile("".join(out) + r"\Z")


@dataclass(frozen=True)
class IgnoreRules:
    rules: tuple[tuple[re.Pattern[str], bool], ...]  # (pattern, is_exception)

    @classmethod
    def parse(cls, text: str) -> IgnoreRules:
        rules = []
        for raw in text.splitlines():
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            exception = line.startswith("!")
            if exception:
                line = line[1:].strip()
            pattern = clean(line)
            if pattern:
                rules.append((_pattern_regex(pattern), exception))
        return cls(tuple(rules))

    @classmethod
    def load(cls, context: Path) -> IgnoreRules:
        try:
            return cls.parse((context / ".dockerignore").read_text(errors="surrogateescape"))
        except FileNotFoundError:
            return cls(())

    def excluded(self, rel: str) -> bool:
        """Is the context path `rel` (clean, slash-separated) left out of the build?"""
        if not self.rules or not rel:
            return False
        parts = rel.split("/")
        candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        result = False
        for regex, exception in self.rules:
            if any(regex.match(c) for c in candidates):
                result = not exception
        return result


@dataclass(frozen=True)
class Source:
    """One file system object to copy: where it is and where it goes below the destination."""

    path: Path
    rel: str
    """Relative to the destination ("" = the destination itself)."""


def _has_magic(text: str) -> bool:
    return any(c in text for c in "*?[")


def select(root: Path, pattern: str, ignore: IgnoreRules | None) -> list[tuple[Path, str]]:
    """The paths a COPY source names inside `root` (globs as Go's filepath.Match), sorted.

    Returns (absolute path, path relative to root). Never follows a symlink out of `root`:
    matching is done on names, and the caller copies symlinks as symlinks.
    """
    rel = clean(pattern)
    if not _has_magic(rel):
        path = root / rel if rel else root
        if not os.path.lexists(path) or (ignore is not None and ignore.excluded(rel)):
            return []
        return [(path, rel)]
    parts = rel.split("/")
    found: list[tuple[Path, str]] = [(root, "")]
    for part in parts:
        nxt: list[tuple[Path, str]] = []
        for base, base_rel in found:
            if not base.is_dir() or base.is_symlink():
                continue
            for name in sorted(os.listdir(base)):
                if fnmatch.fnmatchcase(name, part) if _has_magic(part) else name == part:
                    child_rel = f"{base_rel}/{name}" if base_rel else name
                    if ignore is not None and ignore.excluded(child_rel):
                        continue
                    nxt.append((base / name, child_rel))
        found = nxt
    return found


def walk(path: Path, rel: str, ignore: IgnoreRules | None, dest_rel: str = "") -> Iterator[Source]:
    """`path` and, for a directory, everything below it (not excluded), parents first."""
    yield Source(path, dest_rel)
    st = path.lstat()
    if not stat.S_ISDIR(st.st_mode):
        return
    for name in sorted(os.listdir(path)):
        child_rel = f"{rel}/{name}" if rel else name
        if ignore is not None and ignore.excluded(child_rel):
            continue
        yield from walk(path / name, child_rel, ignore, f"{dest_rel}/{name}" if dest_rel else name)


def digest_sources(sources: Sequence[Source]) -> str:
    """sha256 over names, modes, owners, link targets and file contents: the cache key part."""
    h = hashlib.sha256()
    for src in sources:
        st = src.path.lstat()
        h.update(os.fsencode(src.rel) + b"\0")
        h.update(f"{st.st_mode:o} {st.st_uid} {st.st_gid}\0".encode())
        if stat.S_ISLNK(st.st_mode):
            h.update(os.fsencode(os.readlink(src.path)) + b"\0")
        elif stat.S_ISREG(st.st_mode):
            with open(src.path, "rb") as f:
                while chunk := f.read(1 << 20):
                    h.update(chunk)
            h.update(f"\0{st.st_size}\0".encode())
    return h.hexdigest()


def heredoc_source(work: Path, name: str, content: str) -> list[Source]:
    """A COPY <<NAME here-document, written to a file in `work` (0644, as BuildKit does)."""
    path = work / f"heredoc-{uuid.uuid4().hex[:8]}" / name
    path.parent.mkdir(parents=True)
    path.write_text(content)
    os.chmod(path, 0o644)
    return [Source(path, "")]
