"""tools/bench: imagefs against a natively extracted tree and ratarmount, side by side.

Run it through `tools/bench` (which installs what it needs). Modules:

* `util`      subprocesses, page-cache drops, mount polling, /proc readings
* `images`    the benchmark image: recipes, building with umoci, the file catalog, pushing
* `systems`   what is measured: imagefs (plain gzip, or with its index published), the floor,
              a native extraction, ratarmount (pluggable)
* `floorfs`   the floor: the same tree served from memory by a minimal pyfuse3 filesystem
              with imagefs's kernel-cache settings (its own process; `--systems floor`)
* `workloads` what is done to each system: find, read-all, largest file, random reads,
              first byte (start-up, mount included)
* `adaptercost` the FUSE adapter's own cost per request, replayed without FUSE
* `report`    medians, targets and the markdown table
* `main`      argument parsing and the run loop (`--experiment issue3|lazy|slacker`)
* `convert`   gzip tar layers to eStargz (tar entries to imagefs's eStargz writer)
* `lazyrun`   shared by the lazy experiments: networks, fresh mounts, pull-and-extract
* `shaper`    a shaping TCP proxy (RTT + shared rate) for when tc netem is unavailable
* `lazy`      `--experiment lazy`: first byte and read-all, per lazy format (docs/bench.md)
* `slacker`   `--experiment slacker`: real workloads, lazy/profile/pull (docs/slacker.md)
* `svgplot`   grouped log-scale bar charts as SVG (no matplotlib)
"""
