"""tools/demo: see the header of tools/demo. Run through it, not directly."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from imagefs.testing.images import build_umoci_image, push
from imagefs.testing.mounts import force_unmount
from imagefs.testing.registry import LocalRegistry


def say(text: str) -> None:
    print(f"\n\033[1m# {text}\033[0m", flush=True)


def run(*args: str, root: Path) -> str:
    shown = " ".join(shlex.quote(a) for a in ("imagefs", *args))
    print(f"$ {shown}", flush=True)
    proc = subprocess.run(
        [sys.executable, "-m", "imagefs", "--root", str(root), *args],
        capture_output=True,
        text=True,
    )
    sys.stdout.write(proc.stdout)
    sys.stderr.write(proc.stderr)
    if proc.returncode != 0:
        raise SystemExit(f"demo: `{shown}` failed")
    return proc.stdout


def copy_into(rootfs: Path, sources: list[str]) -> None:
    for src in sources:
        path = Path(src)
        if not path.exists():
            continue
        dest = rootfs / src.lstrip("/")
        dest.parent.mkdir(parents=True, exist_ok=True)
        if path.is_dir():
            shutil.copytree(path, dest, symlinks=True, dirs_exist_ok=True)
        else:
            shutil.copy2(path, dest)  # a symlinked file is copied as the file


def fetched_report(root: Path, ref: str, registry: LocalRegistry) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "imagefs", "--root", str(root), "inspect", ref],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    layers = json.loads(out)[0]["ImageFS"]["Layers"]
    total = sum(layer["Size"] for layer in layers)
    fetched = sum(layer["Cached"] for layer in layers)
    sent = [r for r in registry.requests() if r.is_blob_get]
    print(
        f"layer data cached so far: {fetched:,} of {total:,} compressed bytes "
        f"({100 * fetched / total:.2f}%); the registry has sent {len(sent)} blob responses, "
        f"{sum(r.bytes_written or 0 for r in sent):,} bytes in all (indexes and config included)"
    )


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="imagefs-demo-"))
    root = work / "store"
    mnt = work / "mnt"
    mnt.mkdir()
    registry = LocalRegistry(work / "registry")
    try:
        say("a throwaway registry on loopback")
        registry.start()
        print(registry.url)

        say("a 3-layer image from files on this machine, built by umoci, pushed by skopeo")
        layers = [
            lambda r: copy_into(r, ["/usr/share/doc", "/usr/share/common-licenses"]),
            lambda r: copy_into(r, ["/usr/bin/bash", "/usr/bin/grep", "/usr/bin/tar"]),
            lambda r: copy_into(r, ["/etc/os-release", "/etc/debian_version", "/etc/services"]),
        ]
        image = build_umoci_image(work / "layout", layers, tag="demo", cmd=("/usr/bin/bash",))
        pushed = push(image, registry, "demo/host-files:v1")
        print(f"pushed {pushed.ref} ({pushed.digest})")

        say("publish its layer indexes next to it, so a mount fetches byte ranges, not layers")
        run("index", "--push", pushed.ref, root=work / "indexer")

        say("mount it from an empty store: only the manifest and config are fetched")
        # --trust-published-index: imagefs uses an index found next to the image only when
        # asked (anyone who can push to the repository could attach one); we published it
        # ourselves just now, so we trust it, and the reads below fetch byte ranges
        registry.mark()  # count from here: what the mount and the reads cost
        run("mount", "--trust-published-index", pushed.ref, str(mnt), root=root)
        run("images", root=root)

        say("cat a file: the layer's index and the one span holding the file are fetched")
        print(f"$ head -3 {mnt}/etc/os-release")
        print("".join((mnt / "etc" / "os-release").read_text().splitlines(keepends=True)[:3]))
        fetched_report(root, pushed.ref, registry)

        say("ls a directory every layer may hold: the lower layers' indexes, no file data")
        print(f"$ ls {mnt}/usr/share/doc | head -5")
        print("\n".join(sorted(os.listdir(mnt / "usr" / "share" / "doc"))[:5]))
        fetched_report(root, pushed.ref, registry)
        run("images", root=root)
        run("mounts", root=root)

        say("unmount and clean up")
        run("umount", str(mnt), root=root)

        say("build on it (root): the base is mounted lazily, each step is an overlay layer")
        ctx = work / "ctx"
        ctx.mkdir()
        (ctx / "hello.txt").write_text("hello from imagefs build\n")
        (ctx / "Dockerfile").write_text(
            f"FROM {pushed.ref}\nCOPY hello.txt /srv/hello.txt\nENV GREETING=hello\n"
            'LABEL demo=build\nCMD ["/usr/bin/bash"]\n'
        )
        built = f"{registry.host}/demo/built:v1"
        registry.mark()
        run("build", "--trust-published-index", "-t", built, str(ctx), root=root)
        fetched_report(root, pushed.ref, registry)
        run("push", built, root=root)

        say("mount the pushed build from an empty store: lazy at once (indexes published)")
        run("mount", "--trust-published-index", built, str(mnt), root=work / "fresh")
        print(f"$ cat {mnt}/srv/hello.txt")
        print((mnt / "srv" / "hello.txt").read_text(), end="")
        run("umount", str(mnt), root=work / "fresh")
    finally:
        force_unmount(mnt)
        registry.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
