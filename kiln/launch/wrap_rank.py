"""``python3 -m kiln.launch.wrap_rank RANK [--] SCRIPT...``: run SCRIPT with ``[rank=N] `` before each line.

RANK is a number or the name of an environment variable holding it (``RANK``, as torchrun sets). The exit
code is SCRIPT's. When SCRIPT fails, its first traceback is left for the launcher that started this rank
(``kiln.launch._common``), which prints the first failing rank's error last.
"""

from __future__ import annotations

import collections
import os
import signal
import subprocess
import sys
import threading
import time
from typing import IO, Any

from kiln.launch._common import TAIL_LINES, python_argv, record_failure


def _rank(arg: str) -> int:
    if arg.isdigit():
        return int(arg)
    value = os.environ.get(arg)
    if value is None or not value.isdigit():
        raise SystemExit(f"wrap_rank: RANK must be a number or the name of a variable holding one, got {arg!r}")
    return int(value)


def _pump(src: IO[bytes], dst: Any, prefix: bytes, tail: collections.deque[str] | None) -> None:
    for raw in iter(src.readline, b""):
        dst.write(prefix + raw if raw.endswith(b"\n") else prefix + raw + b"\n")
        dst.flush()
        if tail is not None:
            tail.append(raw.decode("utf-8", errors="replace").rstrip("\n"))


def main(argv: list[str]) -> int:
    """Run the script, prefixing its output with the rank; return its exit code."""
    if len(argv) < 2:
        print("usage: python3 -m kiln.launch.wrap_rank RANK [--] SCRIPT...", file=sys.stderr)
        return 2
    rank = _rank(argv[0])
    script = argv[2:] if argv[1] == "--" else argv[1:]
    if not script:
        print("wrap_rank: no SCRIPT given", file=sys.stderr)
        return 2
    prefix = f"[rank={rank}] ".encode()
    proc = subprocess.Popen(python_argv(script), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: proc.send_signal(signum))
    # Enough of stderr to hold the first traceback even when the script logged a lot before it.
    tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES * 10)
    pumps = [threading.Thread(target=_pump, args=(proc.stdout, sys.stdout.buffer, prefix, None), daemon=True),
             threading.Thread(target=_pump, args=(proc.stderr, sys.stderr.buffer, prefix, tail), daemon=True)]
    for t in pumps:
        t.start()
    code = proc.wait()
    failed_at = time.time()
    for t in pumps:
        t.join()
    if code != 0:
        record_failure(rank, code, list(tail), failed_at)
    return code if code >= 0 else 128 - code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
