#!/usr/bin/env bash
# Build Horovod 0.28.1 (PyTorch + gloo, CPU; no TensorFlow, MXNet or MPI) for .venv's torch and install it.
#
# Horovod 0.28.1, its last release, hard-codes C++14 (C++11 in its gloo); torch >= 2.1's headers need C++17,
# so the sdist as released does not build here. This downloads the sdist from PyPI, raises the standard to 17
# in the three CMake files (patch_cxx17.py), builds a wheel and installs it. The wheel is cached under
# deploy/horovod/build/torch-<version>/ (gitignored, like every build/): a second run, or one after `deploy/setup.sh` rebuilt
# .venv with the same torch, installs it in seconds. Horovod's C++ part is built against one torch version
# exactly, so a different torch gets its own build.
#
# Settings: HOROVOD_BUILD_JOBS (parallel compile jobs; default: the CPU count), KILN_HOROVOD_REBUILD=1 (ignore
# the cache), KILN_HOROVOD_CACHE (where wheels are cached; default deploy/horovod/build, e.g. a directory
# outside the checkout so that fresh clones on one machine share one build). Used by `just horovod`.
set -euo pipefail
cd "$(dirname "$0")/../.."

VERSION=0.28.1
PY=.venv/bin/python
if [ ! -x "$PY" ]; then
    echo "no .venv: run 'bash deploy/setup.sh' first" >&2
    exit 1
fi

installed_ok() {
    "$PY" - "$VERSION" <<'PY' 2>/dev/null
import sys
import horovod
import horovod.torch as hvd  # fails when the native part was built against another torch
sys.exit(0 if horovod.__version__.split("+")[0] == sys.argv[1] and hvd.gloo_built() else 1)
PY
}

if [ "${KILN_HOROVOD_REBUILD:-0}" != 1 ] && installed_ok; then
    echo "horovod $VERSION (PyTorch, gloo) is already installed in .venv"
    exit 0
fi

# Horovod's runtime dependencies, pinned in pyproject.toml's `horovod` extra (one list, read from there).
mapfile -t deps < <("$PY" -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["horovod"]))')
"$PY" -m pip install --quiet "${deps[@]}"

torch_version=$("$PY" -c 'import torch; print(torch.__version__)')
py_tag=$("$PY" -c 'import sys; print(f"cp{sys.version_info.major}{sys.version_info.minor}")')
cache="${KILN_HOROVOD_CACHE:-deploy/horovod/build}/torch-${torch_version}"
wheel=$(ls "$cache"/horovod-"$VERSION"-"$py_tag"-*.whl 2>/dev/null | head -n 1 || true)
if [ "${KILN_HOROVOD_REBUILD:-0}" = 1 ] || [ -z "$wheel" ]; then
    work=$(mktemp -d "${TMPDIR:-/tmp}/kiln-horovod-XXXXXX")
    trap 'rm -rf "$work"' EXIT
    echo "downloading horovod $VERSION's source from PyPI"
    "$PY" -m pip download --quiet --no-deps --no-binary :all: "horovod==$VERSION" -d "$work"
    tar -xzf "$work/horovod-$VERSION.tar.gz" -C "$work"
    "$PY" deploy/horovod/patch_cxx17.py "$work/horovod-$VERSION"
    jobs="${HOROVOD_BUILD_JOBS:-$(nproc)}"
    mkdir -p "$cache"
    log="$cache/build.log"
    echo "building horovod $VERSION against torch $torch_version with $jobs jobs (several minutes; log: $log)"
    start=$SECONDS
    # --no-build-isolation: Horovod's build imports the venv's torch to find its headers and ABI.
    if ! env HOROVOD_WITH_PYTORCH=1 HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1 HOROVOD_WITH_GLOO=1 \
            HOROVOD_WITHOUT_MPI=1 HOROVOD_CPU_OPERATIONS=gloo MAKEFLAGS="-j$jobs" \
            "$PY" -m pip wheel --verbose --no-deps --no-build-isolation -w "$work/dist" "$work/horovod-$VERSION" \
            >"$log" 2>&1; then
        tail -n 40 "$log" >&2
        echo "horovod $VERSION failed to build (full log: $log)" >&2
        exit 1
    fi
    echo "built in $((SECONDS - start)) s"
    rm -f "$cache"/horovod-"$VERSION"-"$py_tag"-*.whl
    mv "$work"/dist/horovod-*.whl "$cache/"
    wheel=$(ls "$cache"/horovod-"$VERSION"-"$py_tag"-*.whl | head -n 1)
fi
"$PY" -m pip install --quiet --no-deps --force-reinstall "$wheel"
if ! installed_ok; then
    echo "horovod installed from $wheel but horovod.torch does not load with gloo; rebuild with KILN_HOROVOD_REBUILD=1" >&2
    exit 1
fi
echo "horovod $VERSION (PyTorch, gloo) installed in .venv: horovodrun is .venv/bin/horovodrun"
