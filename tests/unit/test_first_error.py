"""The worker finds a failed trial's first traceback in its stderr, even with the ranks' lines interleaved."""

from __future__ import annotations

from services.worker.runner import FirstTraceback


def _feed(lines: list[str]) -> FirstTraceback:
    tracker = FirstTraceback()
    for line in lines:
        tracker.feed(line)
    return tracker


def test_the_first_failing_ranks_traceback_is_kept_not_the_launchers_summary() -> None:
    tracker = _feed([
        "[rank=0] step 1",
        "[rank=1] [rank1]: Traceback (most recent call last):",
        "[rank=0] step 2",
        '[rank=1] [rank1]:   File "train.py", line 8, in <module>',
        "[rank=0] [rank0]: Traceback (most recent call last):",
        '[rank=1] [rank1]:     raise ValueError("rank one is broken")',
        "[rank=1] [rank1]: ValueError: rank one is broken",
        '[rank=0] [rank0]:   File "train.py", line 9, in <module>',
        "[rank=0] [rank0]: RuntimeError: [gloo] Connection closed by peer",
        "Traceback (most recent call last):",
        "torch.distributed.elastic.multiprocessing.errors.ChildFailedError:",
        "  exitcode  : 1 (pid: 4242)",
    ])
    assert tracker.lines == [
        "[rank=1] [rank1]: Traceback (most recent call last):",
        '[rank=1] [rank1]:   File "train.py", line 8, in <module>',
        '[rank=1] [rank1]:     raise ValueError("rank one is broken")',
        "[rank=1] [rank1]: ValueError: rank one is broken",
    ]
    assert tracker.summary() == "ValueError: rank one is broken (rank 1)"


def test_a_single_process_traceback_and_none() -> None:
    tracker = _feed(["Traceback (most recent call last):", '  File "t.py", line 1', "KeyError: 'x'"])
    assert tracker.summary() == "KeyError: 'x'"
    assert _feed(["just a warning", "Killed"]).summary() == ""
