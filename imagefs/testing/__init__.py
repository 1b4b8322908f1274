"""Real-parts test infrastructure shipped with imagefs (like `trio.testing`).

Tests, `tools/demo` and `tools/bench` all need the same things: a real `docker-registry`
on loopback (plain, htpasswd over TLS, or token auth with our own issuer) and images built
by tools that are not imagefs (umoci, skopeo, GNU tar). Keeping them in the package means
one implementation that every caller exercises, instead of three drifting copies.
"""

from __future__ import annotations

from imagefs.testing.images import (
    LayoutImage,
    PushedImage,
    PushedIndex,
    SampleImage,
    SkopeoError,
    build_umoci_image,
    layout_add_tar_layer,
    push,
    push_multiplatform,
    skopeo_inspect,
    small_sample_image,
    umoci_unpack,
)
from imagefs.testing.registry import (
    InfraError,
    LocalRegistry,
    LoggedRequest,
    TokenIssuer,
    TokenRequest,
)

__all__ = [
    "InfraError",
    "LayoutImage",
    "LocalRegistry",
    "LoggedRequest",
    "PushedImage",
    "PushedIndex",
    "SampleImage",
    "SkopeoError",
    "TokenIssuer",
    "TokenRequest",
    "build_umoci_image",
    "layout_add_tar_layer",
    "push",
    "push_multiplatform",
    "skopeo_inspect",
    "small_sample_image",
    "umoci_unpack",
]
