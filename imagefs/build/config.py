"""PURE. How each metadata instruction changes the image config, as docker writes it.

The config object uses docker's keys (`Env`, `Cmd`, `Entrypoint`, `WorkingDir`, `User`,
`Labels`, `ExposedPorts`, `Volumes`, `StopSignal`, `Healthcheck`, `OnBuild`, `Shell`).
`apply` returns the `history[].created_by` text BuildKit writes for the step.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

from imagefs.build.frontend import Instruction
from imagefs.build.words import Lexer
from imagefs.errors import BuildError

DEFAULT_SHELL = ["/bin/sh", "-c"]
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")
_UNIT_NS = {"ns": 1, "us": 1_000, "µs": 1_000, "ms": 1_000_000, "s": 10**9, "m": 60 * 10**9,
            "h": 3600 * 10**9}  # fmt: skip


def set_env(config: dict[str, Any], name: str, value: str) -> None:
    env = [e for e in config.get("Env") or []]
    for i, item in enumerate(env):
        if item.partition("=")[0] == name:
            env[i] = f"{name}={value}"
            break
    else:
        env.append(f"{name}={value}")
    config["Env"] = env


def env_map(config: Mapping[str, Any]) -> dict[str, str]:
    out = {}
    for item in config.get("Env") or []:
        k, _, v = item.partition("=")
        out[k] = v
    return out


def pairs(ins: Instruction, lexer: Lexer) -> list[tuple[str, str]]:
    """ENV/LABEL arguments as (key, value) with quotes removed and variables expanded."""
    args = list(ins.args)
    if len(args) % 2:
        raise BuildError(f"Dockerfile:{ins.line}: {ins.cmd} needs KEY=VALUE pairs")
    out = []
    for k, v in zip(args[::2], args[1::2], strict=True):
        key = lexer.word(k)
        if not key:
            raise BuildError(f"Dockerfile:{ins.line}: {ins.cmd} names an empty key")
        out.append((key, lexer.word(v)))
    return out


def command_form(ins: Instruction, shell: list[str]) -> list[str]:
    """CMD/ENTRYPOINT/RUN: the JSON form as is, the shell form wrapped in SHELL."""
    if ins.json:
        return list(ins.args)
    return [*shell, " ".join(ins.args)]


def parse_duration(text: str, ins: Instruction) -> int:
    """A Go duration (`30s`, `1m30s`) in nanoseconds."""
    pos, total = 0, 0
    for m in _DURATION.finditer(text):
        if m.start() != pos:
            break
        total += int(float(m.group(1)) * _UNIT_NS[m.group(2)])
        pos = m.end()
    if pos != len(text) or not text:
        raise BuildError(f"Dockerfile:{ins.line}: bad duration {text!r}")
    return total


def apply(config: dict[str, Any], ins: Instruction, lexer: Lexer, state: dict[str, Any]) -> str:
    """Apply a metadata instruction to `config`; `state` holds `cmd_set` and `shell`."""
    cmd = ins.cmd
    if cmd == "ENV":
        kv = pairs(ins, lexer)
        for k, v in kv:
            set_env(config, k, v)
            lexer.env = {**lexer.env, k: v}
        return "ENV " + " ".join(f"{k}={v}" for k, v in kv)
    if cmd == "LABEL":
        kv = pairs(ins, lexer)
        config["Labels"] = {**(config.get("Labels") or {}), **dict(kv)}
        return "LABEL " + " ".join(f"{k}={v}" for k, v in kv)
    if cmd == "USER":
        user = lexer.word(" ".join(ins.args))
        if not user:
            raise BuildError(f"Dockerfile:{ins.line}: USER needs a user")
        config["User"] = user
        return f"USER {user}"
    if cmd == "EXPOSE":
        ports = dict(config.get("ExposedPorts") or {})
        for raw in ins.args:
            for word in lexer.words(raw):
                port, _, proto = word.partition("/")
                if not port.replace("-", "").isdigit():
                    raise BuildError(f"Dockerfile:{ins.line}: invalid port {word!r}")
                ports[f"{port}/{(proto or 'tcp').lower()}"] = {}
        config["ExposedPorts"] = ports
        return "EXPOSE " + " ".join(ins.args)
    if cmd == "VOLUME":
        volumes = dict(config.get("Volumes") or {})
        items = list(ins.args) if ins.json else [w for a in ins.args for w in lexer.words(a)]
        for v in items:
            value = lexer.word(v) if ins.json else v
            if not value:
                raise BuildError(f"Dockerfile:{ins.line}: VOLUME names an empty path")
            volumes[value] = {}
        config["Volumes"] = volumes
        return f"VOLUME [{' '.join(items)}]"
    if cmd == "STOPSIGNAL":
        sig = lexer.word(" ".join(ins.args))
        config["StopSignal"] = sig
        return f"STOPSIGNAL {sig}"
    if cmd == "CMD":
        config["Cmd"] = command_form(ins, state["shell"])
        state["cmd_set"] = True
        return f"CMD {json.dumps(config['Cmd'])}"
    if cmd == "ENTRYPOINT":
        config["Entrypoint"] = command_form(ins, state["shell"])
        if not state["cmd_set"]:
            config["Cmd"] = None  # docker: ENTRYPOINT resets a CMD inherited from the base
        return f"ENTRYPOINT {json.dumps(config['Entrypoint'])}"
    if cmd == "SHELL":
        if not ins.json:
            raise BuildError(f"Dockerfile:{ins.line}: SHELL requires the JSON form")
        state["shell"] = list(ins.args)
        config["Shell"] = list(ins.args)
        return f"SHELL {json.dumps(list(ins.args))}"
    if cmd == "ONBUILD":
        trigger = ins.original.split(None, 1)[1] if " " in ins.original else ""
        if ins.sub_cmd in ("ONBUILD", "FROM", "MAINTAINER"):
            raise BuildError(f"Dockerfile:{ins.line}: {ins.sub_cmd} is not allowed in ONBUILD")
        config["OnBuild"] = [*(config.get("OnBuild") or []), trigger]
        return f"ONBUILD {trigger}"
    if cmd == "HEALTHCHECK":
        config["Healthcheck"] = healthcheck(ins, state["shell"])
        return f"HEALTHCHECK {' '.join(ins.args)}"
    if cmd == "MAINTAINER":
        state["author"] = " ".join(ins.args)
        return f"MAINTAINER {' '.join(ins.args)}"
    raise AssertionError(cmd)


def healthcheck(ins: Instruction, shell: list[str]) -> dict[str, Any]:
    ins.check_flags(["interval", "timeout", "start-period", "start-interval", "retries"])
    if not ins.args:
        raise BuildError(f"Dockerfile:{ins.line}: HEALTHCHECK needs CMD or NONE")
    kind = ins.args[0].upper()
    if kind == "NONE":
        return {"Test": ["NONE"]}
    if kind != "CMD":
        raise BuildError(f"Dockerfile:{ins.line}: HEALTHCHECK needs CMD or NONE")
    rest = list(ins.args[1:])
    test = ["CMD", *rest] if ins.json else ["CMD-SHELL", " ".join(rest)]
    hc: dict[str, Any] = {"Test": test}
    for flag, key in (
        ("interval", "Interval"),
        ("timeout", "Timeout"),
        ("start-period", "StartPeriod"),
        ("start-interval", "StartInterval"),
    ):
        value = ins.flag(flag)
        if value:
            hc[key] = parse_duration(value, ins)
    retries = ins.flag("retries")
    if retries:
        if not retries.isdigit():
            raise BuildError(f"Dockerfile:{ins.line}: --retries must be a number")
        hc["Retries"] = int(retries)
    return hc
