"""Code contexts: pack a model directory reproducibly; refuse hostile archives, naming the member."""

from __future__ import annotations

import gzip
import io
import os
import tarfile
import types
from pathlib import Path

import pytest

from schemas import context
from schemas.context import ContextError


def make_model_dir(root: Path) -> Path:
    d = root / "model"
    (d / "pkg" / "sub").mkdir(parents=True)
    (d / "model_def.py").write_text("class Trial: ...\n")
    (d / "const.yaml").write_text("searcher: {name: single}\n")
    (d / "pkg" / "__init__.py").write_text("")
    (d / "pkg" / "sub" / "data.bin").write_bytes(bytes(range(256)) * 10)
    (d / ".git").mkdir()
    (d / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (d / "pkg" / "__pycache__").mkdir()
    (d / "pkg" / "__pycache__" / "x.pyc").write_bytes(b"\0")
    (d / "link_to_file").symlink_to(d / "model_def.py")
    (d / "link_to_dir").symlink_to(d / "pkg", target_is_directory=True)
    outside = root / "secret.txt"
    outside.write_text("do not ship me\n")
    (d / "link_outside").symlink_to(outside)
    return d


def files_under(d: Path) -> dict[str, bytes]:
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


SHIPPED = {"const.yaml", "model_def.py", "pkg/__init__.py", "pkg/sub/data.bin"}


# --- pack / check / extract --------------------------------------------------------------------


def test_pack_check_extract_round_trip(tmp_path: Path) -> None:
    src = make_model_dir(tmp_path)
    data = context.pack(src)
    assert context.check(data) == len(SHIPPED)
    dest = tmp_path / "out"
    context.extract(data, dest)
    got = files_under(dest)
    assert set(got) == SHIPPED  # no links, no .git, no __pycache__
    for name in SHIPPED:
        assert got[name] == (src / name).read_bytes()
    assert not any(p.is_symlink() for p in dest.rglob("*"))


def test_pack_is_byte_identical_for_the_same_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = make_model_dir(tmp_path)
    first = context.pack(src)
    # Packed again later (gzip stamps the current time unless told otherwise) after the files'
    # own mtimes changed: the bytes, hence the digest and object key, must not change.
    monkeypatch.setattr(gzip, "time", types.SimpleNamespace(time=lambda: 2_000_000_000.0))
    os.utime(src / "model_def.py", (1_500_000_000, 1_500_000_000))
    second = context.pack(src)
    assert second == first
    assert context.digest(second) == context.digest(first)


def test_different_contents_give_different_digests(tmp_path: Path) -> None:
    src = make_model_dir(tmp_path)
    before = context.digest(context.pack(src))
    (src / "model_def.py").write_text("class Trial: pass\n")
    assert context.digest(context.pack(src)) != before


def test_digest_and_object_key(tmp_path: Path) -> None:
    d = context.digest(b"abc")
    assert d == "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert context.object_key(d) == f"contexts/sha256/{d.split(':')[1]}.tar.gz"


def test_pack_refuses_a_context_over_the_limit(tmp_path: Path) -> None:
    src = tmp_path / "big"
    src.mkdir()
    (src / "weights.bin").write_bytes(os.urandom(64 * 1024))  # random: does not compress
    with pytest.raises(ContextError, match="limit|exceeds"):
        context.pack(src, max_bytes=16 * 1024)


def test_pack_refuses_a_file(tmp_path: Path) -> None:
    f = tmp_path / "f.py"
    f.write_text("")
    with pytest.raises(ContextError, match="not a directory"):
        context.pack(f)


# --- hostile archives --------------------------------------------------------------------------


def archive(*members: tuple[tarfile.TarInfo, bytes | None], compress: bool = True) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz" if compress else "w") as tar:
        for info, payload in members:
            if payload is not None:
                info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload) if payload is not None else None)
    return buf.getvalue()


def member(name: str, kind: bytes = tarfile.REGTYPE, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    return info


OK_FILE = (member("model_def.py"), b"print('hi')\n")

HOSTILE = {
    "parent": (member("../evil"), b"x"),
    "absolute": (member("/etc/passwd"), b"root::0:0::/:/bin/sh\n"),
    "nested parent": (member("a/../../x"), b"x"),
    "deep parent": (member("pkg/../../../tmp/x"), b"x"),
    "backslash": (member("..\\evil"), b"x"),
    "symlink": (member("innocent", tarfile.SYMTYPE, "/etc/passwd"), None),
    "relative symlink": (member("pkg/up", tarfile.SYMTYPE, "../../.."), None),
    "hardlink": (member("hard", tarfile.LNKTYPE, "model_def.py"), None),
    "char device": (member("dev/null", tarfile.CHRTYPE), None),
    "block device": (member("dev/sda", tarfile.BLKTYPE), None),
    "fifo": (member("pipe", tarfile.FIFOTYPE), None),
}


@pytest.mark.parametrize("case", HOSTILE)
@pytest.mark.parametrize("compress", [True, False])
def test_hostile_member_is_refused_by_name(case: str, compress: bool, tmp_path: Path) -> None:
    bad = HOSTILE[case]
    data = archive(OK_FILE, bad, compress=compress)
    with pytest.raises(ContextError) as exc:
        context.check(data)
    assert repr(bad[0].name) in str(exc.value)
    # extract re-checks and writes nothing.
    dest = tmp_path / "dest"
    with pytest.raises(ContextError):
        context.extract(data, dest)
    assert not dest.exists() or not any(dest.iterdir())
    assert not (tmp_path / "evil").exists() and not (tmp_path / "x").exists()


def test_a_plain_tar_and_directories_are_accepted() -> None:
    data = archive((member("pkg", tarfile.DIRTYPE), None), (member("pkg/a.py"), b"a = 1\n"), compress=False)
    assert context.check(data) == 2


@pytest.mark.parametrize(
    "blob",
    [
        b"",
        b"not a tar at all",
        os.urandom(2048),
        gzip.compress(b"hello, not a tar inside"),
        archive(OK_FILE)[:40],  # truncated
    ],
    ids=["empty", "text", "random", "gzip-of-text", "truncated"],
)
def test_a_blob_that_is_not_a_tar_is_refused(blob: bytes) -> None:
    with pytest.raises(ContextError, match="not a readable tar"):
        context.check(blob)


def test_an_archive_over_the_size_limit_is_refused() -> None:
    data = archive(OK_FILE, (member("weights.bin"), os.urandom(8192)))
    assert context.check(data, max_bytes=len(data)) == 2
    with pytest.raises(ContextError, match=f"{len(data)} bytes, over the {len(data) - 1}-byte limit"):
        context.check(data, max_bytes=len(data) - 1)


def test_many_large_members_that_compress_to_nothing_are_refused() -> None:
    zeros = bytes(256 * 1024)
    data = archive(*[(member(f"z{i}.bin"), zeros) for i in range(8)])  # 2 MiB unpacked
    assert len(data) < 64 * 1024
    assert context.check(data, max_unpacked=2 * 1024 * 1024) == 8
    with pytest.raises(ContextError, match="unpacks to more than"):
        context.check(data, max_unpacked=2 * 1024 * 1024 - 1)


def test_a_member_claiming_a_huge_size_is_refused_before_reading_it() -> None:
    # A header that claims 64 GiB with no data behind it: refused on the claim, not by reading.
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        tar.addfile(member("model_def.py"), io.BytesIO(b""))
        big = member("huge.bin")
        big.size = 64 << 30
        header = big.tobuf(tarfile.GNU_FORMAT, tarfile.ENCODING, "surrogateescape")
        tar.fileobj.write(header)
        tar.offset += len(header)
    with pytest.raises(ContextError, match="unpacks to more than"):
        context.check(buf.getvalue())
