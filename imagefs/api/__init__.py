"""The verbs of imagefs as plain async functions: the CLI and the tests both call these.

Each verb takes a `Session` (store root, transport options, one registry client per host) and
returns values; printing is the CLI's business. Disk work runs in worker threads through one
limiter so the trio thread stays free for the network.

One module per idea; everything is re-exported here (`from imagefs import api; api.pull`):

- `imagefs.pulling`: pull, find_or_pull (below the verbs: mount, ls/cat and build use them)
- `listing`: images and docker's filters; `inspecting`: inspect
- `removing`: tag, rmi, prune; `pushing`: push; `indexing`: index; `logins`: login, logout
- `profiles`: prefetch profiles (record, push, pull)
"""

from __future__ import annotations

from imagefs.api.indexing import IndexResult, LayerIndexed, index
from imagefs.api.inspecting import dump_json, inspect, inspect_json, inspect_one
from imagefs.api.listing import IMAGE_FILTERS, ImageSummary, images, layer_cached_bytes, thaw
from imagefs.api.logins import login, logout, normalize_registry_host, read_password_interactively
from imagefs.api.profiles import load_profile, pull_profile, push_profile, record_profile
from imagefs.api.pushing import PushResult, push
from imagefs.api.removing import PruneResult, RmiResult, prune, rmi, rmi_one, sweep_derived, tag
from imagefs.errors import Unauthorized
from imagefs.pulling import ProgressFn, PullResult, find_or_pull, pull
from imagefs.session import Session, fetch_blob, keep_whole_blob
from imagefs.store.lookup import find_record, find_records, is_dangling
from imagefs.store.refs import now_rfc3339

__all__ = [
    "IMAGE_FILTERS",
    "ImageSummary",
    "IndexResult",
    "LayerIndexed",
    "ProgressFn",
    "PruneResult",
    "PullResult",
    "PushResult",
    "RmiResult",
    "Session",
    "Unauthorized",
    "dump_json",
    "fetch_blob",
    "find_or_pull",
    "find_record",
    "find_records",
    "images",
    "index",
    "inspect",
    "inspect_json",
    "inspect_one",
    "is_dangling",
    "keep_whole_blob",
    "layer_cached_bytes",
    "load_profile",
    "login",
    "logout",
    "normalize_registry_host",
    "now_rfc3339",
    "prune",
    "pull",
    "pull_profile",
    "push",
    "push_profile",
    "read_password_interactively",
    "record_profile",
    "rmi",
    "rmi_one",
    "sweep_derived",
    "tag",
    "thaw",
]
