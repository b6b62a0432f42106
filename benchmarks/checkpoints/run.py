"""Checkpoint transfer benchmark: upload and download MB/s of a checkpoint through the real S3 store on the
path a trial uses (presigned URLs its worker grants, multipart for big files, sha256 while streaming, mtimes
restored), next to the raw disk's write and read throughput measured in the same run (the physical limit: the
store writes to the same disk).

Two shapes of the same total size: one big file, and many files (``--files``). Each measurement is repeated
``--runs`` times; the tables give medians with min-max and Kiln's fraction of the raw disk.

Usage: .venv/bin/python benchmarks/checkpoints/run.py [--mib 1024] [--files 256] [--runs 3] [--part-mib 64]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from deploy import parts as p
from deploy.ports import free_port_block
from kiln.core._bus import TrialBus
from kiln.core._checkpoint import CheckpointContext, LinkedS3Storage
from schemas.trial import checkpoint_prefix
from services.worker.link import Identity, MinioStore, TrialLink, socket_path

MiB = 1 << 20
BLOCK = 4 * MiB


def _fill(path: Path, size: int) -> None:
    """``size`` random-looking bytes (incompressible; random once, repeated: generating them is not measured)."""
    block = os.urandom(min(BLOCK, size) or 1)
    with path.open("wb") as fh:
        left = size
        while left > 0:
            n = min(len(block), left)
            fh.write(block[:n])
            left -= n


def make_checkpoint(root: Path, total: int, files: int) -> None:
    """``files`` files (1: one big file) summing to ``total`` bytes under ``root``."""
    root.mkdir(parents=True)
    each = total // files
    for i in range(files):
        _fill(root / f"shard-{i:05d}.bin", each if i < files - 1 else total - each * (files - 1))


def raw_disk(where: Path, total: int) -> tuple[float, float]:
    """Seconds to write ``total`` bytes to one file and fsync it, then to read them back (the same disk)."""
    path = where / "raw.bin"
    block = os.urandom(BLOCK)
    t0 = time.perf_counter()
    with path.open("wb") as fh:
        left = total
        while left > 0:
            left -= fh.write(block[:min(BLOCK, left)])
        fh.flush()
        os.fsync(fh.fileno())
        # Out of the page cache (this file only): the read below comes from the disk.
        os.posix_fadvise(fh.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    write = time.perf_counter() - t0
    t0 = time.perf_counter()
    with path.open("rb") as fh:
        while fh.read(BLOCK):
            pass
    read = time.perf_counter() - t0
    path.unlink()
    return write, read


class Link:
    """A worker's link served on a loop of its own (as the worker serves it), with the worker's store key."""

    def __init__(self, minio: Any, work: Path, experiment_id: int) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        who = Identity(experiment_id=experiment_id, trial_id=1, allocation_id="1.1")

        async def no_stops(who: Identity, on_stop: Any) -> None:
            await asyncio.Event().wait()

        async def append(event: Any) -> int:
            return 1

        self.link = TrialLink(socket_path(work / "1.1"), who, append, no_stops, store=MinioStore(minio, "kiln"))
        asyncio.run_coroutine_threadsafe(self.link.start(), self.loop).result()

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.link.close(), self.loop).result()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join()


def timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def row(name: str, total: int, seconds: list[float], limit: list[float] | None) -> str:
    rates = [total / MiB / s for s in seconds]
    med = statistics.median(rates)
    frac = "" if limit is None else f" {med / statistics.median([total / MiB / s for s in limit]):.2f} |"
    return f"| {name} | {med:.0f} | {min(rates):.0f}-{max(rates):.0f} |{frac or ' 1.00 |'}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mib", type=int, default=1024, help="checkpoint size in MiB")
    parser.add_argument("--files", type=int, default=256, help="files of the many-files shape")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--part-mib", type=int, default=64, help="multipart part size (S3's minimum is 5)")
    args = parser.parse_args()
    total = args.mib * MiB
    state = Path(tempfile.mkdtemp(prefix="kiln-bench-ckpt-"))
    state.chmod(0o755)
    base = free_port_block(8)
    cfg = p.PartsConfig(state_dir=state, host="127.0.0.1", nats_port=base, nats_monitor_port=base + 1,
                        pg_port=base + 2, s3_port=base + 3, s3_ports_base=base + 4, pg_password="unused",
                        s3_access_key="bench-key",
                        s3_secret_key="bench-secret", s3_buckets=["kiln"])
    s3 = p.start_s3(cfg)
    link = None
    try:
        minio = p.s3_client(cfg)
        link = Link(minio, state / "work", experiment_id=1)
        bus = TrialBus(str(link.link.path), 1, 1, "1.1")
        storage = LinkedS3Storage(lambda: bus, "kiln", checkpoint_prefix(1), part_bytes=args.part_mib * MiB)
        ckpt = CheckpointContext(storage, lambda *a: None)
        shapes = {"one big file": 1, f"{args.files} files": args.files}
        results: dict[str, dict[str, list[float]]] = {s: {"up": [], "down": []} for s in shapes}
        raw_w: list[float] = []
        raw_r: list[float] = []
        for run in range(args.runs):
            w, r = raw_disk(state, total)
            raw_w.append(w)
            raw_r.append(r)
            for shape, files in shapes.items():
                src = state / f"src-{run}-{files}"
                make_checkpoint(src, total, files)
                ids: list[str] = []
                results[shape]["up"].append(timed(lambda: ids.append(ckpt.upload(src, {"steps_completed": 1}))))  # noqa: B023
                dst = state / f"dst-{run}-{files}"
                results[shape]["down"].append(timed(lambda: ckpt.download(ids[0], dst)))  # noqa: B023
                shutil.rmtree(src)
                shutil.rmtree(dst)
                for o in minio.list_objects("kiln", prefix=f"{checkpoint_prefix(1)}/{ids[0]}/", recursive=True):
                    minio.remove_object("kiln", o.object_name)
        bus.close()
        print(f"checkpoint {args.mib} MiB, part size {args.part_mib} MiB, {args.runs} runs, through the worker's"
              " presigned URLs to SeaweedFS on loopback")
        print("| what | median MiB/s | min-max | fraction of raw disk |")
        print("|---|---|---|---|")
        print(row("raw disk write (fsync)", total, raw_w, None))
        print(row("raw disk read", total, raw_r, None))
        for shape in shapes:
            print(row(f"upload, {shape}", total, results[shape]["up"], raw_w))
            print(row(f"download, {shape}", total, results[shape]["down"], raw_r))
    finally:
        if link is not None:
            link.close()
        s3.stop()
        shutil.rmtree(state, ignore_errors=True)


if __name__ == "__main__":
    main()
