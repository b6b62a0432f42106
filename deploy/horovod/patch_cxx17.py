"""Raise Horovod 0.28.1's C++ standard to 17 so it builds against torch >= 2.1 (whose headers need C++17).

Horovod 0.28.1 hard-codes C++14 in its root and PyTorch CMake files and C++11 in its bundled gloo; each
replacement below must match exactly once, so a different Horovod source fails here, loudly, rather than
building with the old standard. Usage: ``python patch_cxx17.py HOROVOD_SOURCE_DIR``.
"""

from __future__ import annotations

import sys
from pathlib import Path

# (file, text in 0.28.1, replacement)
PATCHES = (
    ("CMakeLists.txt", "set(CMAKE_CXX_STANDARD 14)", "set(CMAKE_CXX_STANDARD 17)"),
    ("horovod/torch/CMakeLists.txt", "set(CMAKE_CXX_STANDARD 14)", "set(CMAKE_CXX_STANDARD 17)"),
    ("third_party/gloo/CMakeLists.txt", '"${CMAKE_CXX_FLAGS} -std=c++11 -fPIC"',
     '"${CMAKE_CXX_FLAGS} -std=c++17 -fPIC"'),
)


def patch(source: Path) -> list[str]:
    """Apply every replacement under ``source``; return the files changed. Raises if one does not match."""
    changed = []
    for name, old, new in PATCHES:
        path = source / name
        text = path.read_text()
        if old not in text and new in text:
            continue  # already patched
        if text.count(old) != 1:
            raise SystemExit(f"{path}: expected {old!r} exactly once, found it {text.count(old)} times; "
                             "is this Horovod 0.28.1's source?")
        path.write_text(text.replace(old, new))
        changed.append(name)
    return changed


if __name__ == "__main__":
    if len(sys.argv) != 2 or not (Path(sys.argv[1]) / "setup.py").is_file():
        raise SystemExit("usage: python patch_cxx17.py HOROVOD_SOURCE_DIR (the unpacked sdist, with setup.py)")
    for name in patch(Path(sys.argv[1])):
        print(f"patched {name}: C++17")
