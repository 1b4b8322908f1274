"""Where imagefs keeps things, and the optional config file.

- store root: `--root`, else `$IMAGEFS_ROOT`, else `/var/lib/imagefs` for root, else
  `$XDG_DATA_HOME/imagefs` (`~/.local/share/imagefs`);
- config dir: `--config`, else `$IMAGEFS_CONFIG`, else `/etc/imagefs` for root, else
  `$XDG_CONFIG_HOME/imagefs`; it holds `config.json` and `certs.d/HOST[:PORT]/ca.crt`;
- credentials: Docker's own `config.json` (`$DOCKER_CONFIG` or `~/.docker`), see
  `imagefs.registry.credentials`.

`config.json` keys (all optional), named as in docker's `daemon.json` where docker has one:

```json
{"insecure-registries": ["myhost:5000"],
 "registry-mirrors": ["https://mirror.example"],          // for docker.io, as docker
 "mirrors": {"quay.io": ["https://quay-mirror.example"]}, // per registry
 "cache-size": "10GiB"}
```
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from imagefs.errors import UsageError


def default_root() -> Path:
    env = os.environ.get("IMAGEFS_ROOT")
    if env:
        return Path(env)
    if os.geteuid() == 0:
        return Path("/var/lib/imagefs")
    data = os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share")
    return Path(data) / "imagefs"


def default_config_dir() -> Path:
    env = os.environ.get("IMAGEFS_CONFIG")
    if env:
        return Path(env)
    if os.geteuid() == 0:
        return Path("/etc/imagefs")
    conf = os.environ.get("XDG_CONFIG_HOME") or os.path.expanduser("~/.config")
    return Path(conf) / "imagefs"


@dataclass(frozen=True)
class FileConfig:
    insecure_registries: tuple[str, ...] = ()
    mirrors: Mapping[str, Sequence[str]] = field(default_factory=dict)
    extra: Mapping[str, Any] = field(default_factory=dict)


def load_file_config(config_dir: Path) -> FileConfig:
    path = config_dir / "config.json"
    try:
        obj = json.loads(path.read_bytes())
    except FileNotFoundError:
        return FileConfig()
    except (OSError, ValueError) as exc:
        raise UsageError(f"{path}: {exc}") from None
    if not isinstance(obj, dict):
        raise UsageError(f"{path}: expected a JSON object")
    mirrors: dict[str, list[str]] = {}
    for url in obj.get("registry-mirrors", []):
        mirrors.setdefault("docker.io", []).append(str(url))
    for host, urls in dict(obj.get("mirrors", {})).items():
        mirrors.setdefault(str(host), []).extend(str(u) for u in urls)
    return FileConfig(
        insecure_registries=tuple(str(h) for h in obj.get("insecure-registries", [])),
        mirrors=mirrors,
        extra=obj,
    )


def parse_mirror_flag(value: str) -> tuple[str, str]:
    """`--registry-mirror URL` (docker.io, as docker) or `REGISTRY=URL`."""
    if "=" in value:
        host, url = value.split("=", 1)
        return host, url
    return "docker.io", value
