"""A run's settings: the config file (`imagefs.config`) merged with the command line's flags.

Flags win over the file: a `--registry-mirror` is tried before the file's mirrors of that
registry, `--insecure-registry` adds to the file's list, `--cache-size` replaces the file's
`cache-size`. The CLI passes the flags' values; nothing here knows argparse.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from imagefs.config import load_file_config, parse_mirror_flag
from imagefs.errors import UsageError

if TYPE_CHECKING:  # httpx and trio come with it: `imagefs mount` starts its daemon without
    from imagefs.registry.transport import TransportOptions


def transport_options(
    config_dir: Path,
    *,
    insecure_registries: Sequence[str] = (),
    mirror_flags: Sequence[str] = (),
    net_latency_ms: float | None = None,
    net_bandwidth: str | None = None,
    timeout: float | None = None,
) -> TransportOptions:
    from imagefs.registry.transport import TransportOptions

    file_cfg = load_file_config(config_dir)
    mirrors: dict[str, list[str]] = {k: list(v) for k, v in file_cfg.mirrors.items()}
    for flag in mirror_flags:
        host, url = parse_mirror_flag(flag)
        mirrors.setdefault(host, []).insert(0, url)
    link = None
    if net_latency_ms or net_bandwidth:
        from imagefs.registry.netem import Link, parse_rate  # experiments only

        try:
            rate = parse_rate(net_bandwidth) if net_bandwidth else None
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        link = Link(latency=(net_latency_ms or 0) / 1000, bandwidth=rate)
    return TransportOptions(
        insecure_registries=frozenset([*file_cfg.insecure_registries, *insecure_registries]),
        mirrors=mirrors,
        config_dir=config_dir,
        link=link,
        timeout=timeout,
    )


def cache_size(value: str | None, config_dir: Path) -> int:
    """The piece cache's cap in bytes: `value` (e.g. "512MiB"), else the config file's
    `cache-size`, else the default."""
    from imagefs.lazy.cache import DEFAULT_CACHE_SIZE, parse_size

    if value is None:
        cfg = load_file_config(config_dir).extra.get("cache-size")
        value = str(cfg) if cfg is not None else None
    if value is None:
        return DEFAULT_CACHE_SIZE
    try:
        return parse_size(value)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
