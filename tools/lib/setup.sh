# Shared set-up for tools/test, tools/demo and tools/bench (sourced, not run).
# Everything here is idempotent: a second run on a set-up machine costs well under a second.

# Debian packages imagefs needs at run time and in its tests.
IMAGEFS_DEBIAN_PACKAGES=(
    fuse3 libfuse3-dev pkg-config gcc python3-dev python3-venv   # pyfuse3 builds against libfuse3
    docker-registry   # the CNCF distribution registry the tests and the demo run on loopback
    skopeo umoci      # independent image producers and the reference extractor
    runc buildah busybox-static attr   # `build`: RUN runtime; reference builder; test base
    containerd stargz-snapshotter   # ctr-remote: eStargz images made by the reference converter
    tar gzip zstd     # GNU tar writes test layers; zstd for hand-made layers
)

_missing_packages() {
    local p missing=()
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" \
            || missing+=("$p")
    done
    echo "${missing[@]:-}"
}

ensure_debian_packages() {
    local missing
    missing="$(_missing_packages "${IMAGEFS_DEBIAN_PACKAGES[@]}" "$@")"
    [ -z "$missing" ] && return 0
    echo "== installing Debian packages: $missing"
    local sudo=""
    [ "$(id -u)" -ne 0 ] && sudo="sudo"
    export DEBIAN_FRONTEND=noninteractive
    $sudo apt-get update -qq
    # shellcheck disable=SC2086
    $sudo apt-get install -y -qq --no-install-recommends $missing >/dev/null
}

# ensure_venv [extra]: a .venv with imagefs installed editable (with the named extra).
# Re-installs only when pyproject.toml changed since the last install; an install with the
# test extra also serves callers that want none.
ensure_venv() {
    local extra="${1:-}"
    local spec="."
    [ -n "$extra" ] && spec=".[$extra]"
    if [ ! -x .venv/bin/python ]; then
        echo "== creating .venv"
        python3 -m venv .venv
    fi
    local stamp
    for stamp in ".venv/.imagefs-installed-$extra" .venv/.imagefs-installed-test; do
        if [ -f "$stamp" ] && [ ! pyproject.toml -nt "$stamp" ]; then
            return 0
        fi
        [ -n "$extra" ] && break
    done
    echo "== installing imagefs $spec into .venv (log: .venv/install.log)"
    if ! { .venv/bin/python -m pip install -q --upgrade pip &&
           .venv/bin/python -m pip install -q -e "$spec"; } >.venv/install.log 2>&1; then
        cat .venv/install.log >&2
        return 1
    fi
    touch ".venv/.imagefs-installed-$extra"
}
