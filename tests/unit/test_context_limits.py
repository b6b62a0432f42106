"""Hostile code contexts are refused while streaming, before anything big is held or written: a
decompression bomb, too many files, a header that declares gigabytes. Same limits at upload (``check``)
and at the worker (``extract``)."""

from __future__ import annotations

import gzip
import io
import tarfile
import tracemalloc
from pathlib import Path

import pytest

from schemas import context
from schemas.context import ContextError

MiB = 1024 * 1024


class _Zeros(io.RawIOBase):
    """``size`` zero bytes, produced as they are read (the bomb is never held whole)."""

    def __init__(self, size: int) -> None:
        self.left = size

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        n = min(len(buffer), self.left)
        buffer[:n] = bytes(n)
        self.left -= n
        return n


def zip_bomb(unpacked: int, files: int = 1) -> bytes:
    """A tar.gz of ``files`` all-zero files totalling ``unpacked`` bytes (500 MiB packs to ~0.5 MB)."""
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", compresslevel=9, mtime=0) as gz, \
            tarfile.open(fileobj=gz, mode="w") as tar:
        for i in range(files):
            info = tarfile.TarInfo(f"zeros-{i}.bin")
            info.size = unpacked // files
            tar.addfile(info, io.BufferedReader(_Zeros(info.size), 1 << 20))
    return buf.getvalue()


def many_files(n: int) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for i in range(n):
            info = tarfile.TarInfo(f"f/{i}.py")
            info.size = 1
            tar.addfile(info, io.BytesIO(b"x"))
    return buf.getvalue()


@pytest.fixture(scope="module")
def bomb() -> bytes:
    data = zip_bomb(500 * MiB)
    assert len(data) < 600 * 1024  # the 498 KB upload of the finding
    return data


def test_a_zip_bomb_is_refused_at_upload_quickly_and_with_little_memory(bomb: bytes) -> None:
    tracemalloc.start()
    try:
        with pytest.raises(ContextError, match="context unpacks to more than 256 MiB"):
            context.check(bomb)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 * MiB


def test_a_zip_bomb_is_refused_at_the_worker_before_anything_is_written(bomb: bytes, tmp_path: Path) -> None:
    target = tmp_path / "ctx"
    with pytest.raises(ContextError, match="context unpacks to more than 256 MiB"):
        context.extract(bomb, target)
    assert not target.exists() or not any(target.iterdir())


def test_many_small_files_adding_up_are_refused_too(tmp_path: Path) -> None:
    data = zip_bomb(40 * MiB, files=8)
    with pytest.raises(ContextError, match=r"context unpacks to more than 32 MiB \(at member 'zeros-6.bin'\)"):
        context.check(data, max_unpacked=32 * MiB)
    with pytest.raises(ContextError, match="more than 32 MiB"):
        context.extract(data, tmp_path / "ctx", max_unpacked=32 * MiB)
    assert context.check(data, max_unpacked=40 * MiB) == 8


def test_thirty_thousand_files_are_refused_at_upload_and_at_the_worker(tmp_path: Path) -> None:
    data = many_files(30_000)
    with pytest.raises(ContextError, match="context has more than 10000 files"):
        context.check(data)
    with pytest.raises(ContextError, match="context has more than 10000 files"):
        context.extract(data, tmp_path / "ctx")
    assert not (tmp_path / "ctx").exists() or not any((tmp_path / "ctx").iterdir())
    assert context.check(data, max_files=30_000) == 30_000  # a setting, not a hard rule


def test_a_header_declaring_a_huge_record_is_not_read_into_memory() -> None:
    """A pax record is read whole by tarfile: a compressed 200 MiB one must be refused, not loaded."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("a.py")
        info.pax_headers = {"comment": "x" * (4 * MiB)}
        tar.addfile(info, io.BytesIO(b""))
    data = gzip.compress(buf.getvalue())
    with pytest.raises(ContextError, match="header or record over 1 MiB"):
        context.check(data)


def test_corrupt_compressed_data_is_a_context_error_not_a_crash() -> None:
    good = many_files(3)
    corrupt = good[:20] + bytes(b ^ 0xFF for b in good[20:60]) + good[60:]
    with pytest.raises(ContextError, match="not a readable tar.gz"):
        context.check(corrupt)
    with pytest.raises(ContextError, match="not a readable tar.gz"):
        context.check(b"\x1f\x8b" + b"garbage" * 10)


def test_plain_and_other_compressions_still_pass_within_limits(tmp_path: Path) -> None:
    for mode in ("w", "w:bz2", "w:xz"):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode=mode) as tar:  # type: ignore[call-overload]
            info = tarfile.TarInfo("train.py")
            info.size = 5
            tar.addfile(info, io.BytesIO(b"hello"))
        assert context.check(buf.getvalue()) == 1
        context.extract(buf.getvalue(), tmp_path / mode.replace(":", "_"))
        assert (tmp_path / mode.replace(":", "_") / "train.py").read_bytes() == b"hello"
