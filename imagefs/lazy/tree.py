"""One image's merged tree, filled on demand: the mount and `ls`/`cat` both ask it.

The pure `Overlay` answers lookups, listings and attributes from the layer TOCs it has; when
an answer needs a layer it has not got, it raises `NeedLayer(i)`. `LazyTree.ask` loads that
layer through the `LayerSet` (its index: from the store, a published index, the TOC, or the
blob), hands the TOC to the overlay — in every slot of the stack that holds the same blob —
and asks again. Nothing else differs between a mount and a browse here, so it lives once.

Error words are the caller's: the FUSE adapter turns a failed load into EIO and its own log
line (`ImageOperations`' tree overrides `load`), a browse lets the ImageFSError through.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, TypeVar

import trio

from imagefs.errors import ImageFSError
from imagefs.lazy import loading
from imagefs.lazy.layers import LayerSet
from imagefs.overlay import NeedLayer, Overlay

__all__ = ["LazyTree"]

T = TypeVar("T")

AHEAD = 4  # early index loads at a time (each may be a fetch of a TOC or published index)


class LazyTree:
    def __init__(self, overlay: Overlay, layers: LayerSet, log: logging.Logger) -> None:
        self.overlay = overlay
        self.layers = layers
        self.log = log  # the caller's: overlay warnings read as the mount's or the browse's
        # Per kind of early load, the index below which the layers have had one started:
        # each layer gets at most one of each (a kept index loads; one not kept will not be
        # kept a moment later), so a stack of n layers costs O(n) here, not O(n^2) (hostile
        # manifests list thousands).
        self._started: dict[loading.Ahead, int] = {"kept": 0, "metadata": 0}
        self._first_needed: int | None = None  # the first layer any request needed
        self._ahead = trio.CapacityLimiter(AHEAD)

    async def ask(self, fn: Callable[..., T], *args: Any) -> T:
        """Call a pure overlay method, loading the layers it asks for.

        Once the layers it needs are loaded (every warm request), this is one call of `fn`
        and nothing else: no await that yields, no thread hop, no loop set up."""
        try:
            return fn(*args)
        except NeedLayer as need:
            return await self._ask_loading(need.index, fn, args)
        finally:
            if self.overlay.warnings:
                self.log_warnings()

    async def _ask_loading(self, index: int, fn: Callable[..., T], args: tuple[Any, ...]) -> T:
        # Each round loads one more layer; more rounds than layers means something is wrong.
        for _ in range(self.overlay.layer_count + 1):
            await self.load(index)
            try:
                return fn(*args)
            except NeedLayer as need:
                index = need.index
            finally:
                if self.overlay.warnings:
                    self.log_warnings()
        raise ImageFSError(f"{getattr(fn, '__name__', fn)}: the image's layers never settle")

    async def load(self, index: int) -> None:
        """Load layer `index` and give its TOC to every slot holding the same blob (a layer
        repeated in the stack is fetched and parsed once)."""
        self._load_below_soon(index)
        idx = await self.layers.ensure(index)
        digest = self.layers.layers[index].digest
        for j, layer in enumerate(self.layers.layers):
            if layer.digest == digest and not self.overlay.has_layer(j):
                self.overlay.set_layer(j, idx.toc)

    def _load_below_soon(self, index: int) -> None:
        """Start loading the indexes of the layers below `index` in the background.

        A request that needs layer i often goes on to need the layers below it (a
        directory merges down the stack: a lookup of `etc` needs every layer), and it asks
        for them one at a time. Loading them concurrently turns a start-up of one index
        load after another into about one: the request's own load of a lower layer then
        waits for the load already in flight. How far such a load may go:

        - below the first layer any request needed, only indexes kept on this machine
          (`ahead="kept"`): a path the upper layers decide (a `cat` of a file of the top
          layer) still costs nothing below, and a remount loads its kept indexes side by
          side;
        - once a request has needed a layer below that one (the walk goes down the stack),
          the layers below it from their metadata (`ahead="metadata"`: the TOC the manifest
          names, its published index, fetched as stargz-snapshotter fetches every layer's
          TOC), never their data. A cold first stat of the bench image with published
          indexes: 0.24 s one load after another, ~0.15 s so.

        At most `AHEAD` at a time (a hostile manifest may list thousands of layers); each
        layer gets at most one early load of each kind. A load that fails here is only
        logged at debug level: the request that needs the layer loads it again and reports
        the error."""
        nursery = self.layers.nursery
        if nursery is None:
            return
        if self._first_needed is None:
            self._first_needed = index
        ahead: loading.Ahead = "metadata" if index < self._first_needed else "kept"
        started = self._started[ahead]
        if index <= started:
            return
        for j in range(index - 1, started - 1, -1):
            if not self.layers.loaded(j):
                nursery.start_soon(self._load_quietly, j, ahead)
        self._started[ahead] = index

    def load_top_soon(self) -> None:
        """Start loading the top layer's index from its metadata (`ahead="metadata"`: a TOC
        or published index, never layer data) as the mount comes up. Every request starts
        there (a lookup walks the stack top down), so the first one finds it loaded or in
        flight instead of starting it: the launcher's return and the caller's first
        request (~25 ms of a first byte) overlap the load. A failure is the request's to
        report, as for any early load."""
        top = self.overlay.layer_count - 1
        if self.layers.nursery is not None and top >= 0:
            self.layers.nursery.start_soon(self._load_quietly, top, "metadata")

    async def _load_quietly(self, index: int, ahead: loading.Ahead) -> None:
        async with self._ahead:
            try:
                await self.layers.ensure_ahead(index, ahead)
            except ImageFSError as exc:
                self.log.debug("early load of layer %d: %s", index, exc)

    def log_warnings(self) -> None:
        """The overlay notes entries it had to skip (a hard link whose target is missing in
        the layers below); each is reported once, when it is first discovered."""
        warnings = self.overlay.warnings
        while warnings:
            self.log.warning("%s", warnings.pop(0))
