"""tools/bench: imagefs against a natively extracted tree and ratarmount, side by side.

Run it through `tools/bench` (which installs what it needs). Modules:

* `util`      subprocesses, page-cache drops, mount polling, /proc readings
* `images`    the benchmark image: recipes, building with umoci, the file catalog, pushing
* `systems`   what is measured: imagefs, a native extraction, ratarmount (pluggable)
* `workloads` what is done to each system: find, read-all, largest file, random reads
* `report`    medians, targets and the markdown table
* `main`      argument parsing and the run loop
"""
