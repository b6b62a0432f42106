"""``python3 -m kiln.launch.horovod [HOROVODRUN_ARGS... --] SCRIPT...``: one process per slot through horovodrun.

Runs horovodrun (as ``python -m horovod.runner.launch``, with this interpreter, which a trial's user can run
where the venv's ``horovodrun`` script may not be) with its gloo controller, no MPI needed, on this trial's
slots, each rank under ``kiln.launch.wrap_rank``. horovodrun's own ``[N]<stdout>:`` before each line is removed,
so lines start with ``[rank=N] `` as with the other launchers. ``MASTER_ADDR``/``MASTER_PORT`` and
``DET_CHIEF_IP`` are set so that ``core_context.distributed`` (``DistributedContext.from_horovod(hvd)``) works
beside Horovod. Horovod is optional (``just horovod`` builds it); without it this says so and exits 2. Trials
spanning hosts need horovodrun's ssh, which Kiln's workers do not set up: refused with a message.
"""

from __future__ import annotations

import importlib.util
import os
import re
import sys

from kiln.launch._common import Layout, free_port, missing, run_collecting_errors, split_overrides, wrapped

# What horovodrun puts before each line of rank N: ``[N]<stdout>:``, after a time with --prefix-output-with-timestamp.
HOROVODRUN_PREFIX = re.compile(rb"^[^\[\n]*\[\d+\]<std(?:out|err)>:")


def horovodrun_argv(layout: Layout, overrides: list[str], script: list[str]) -> list[str]:
    """The horovodrun command line for this host."""
    np = layout.slots
    given = [o for i, o in enumerate(overrides) if i and overrides[i - 1] in ("-np", "--num-proc")] + \
        [o.partition("=")[2] for o in overrides if o.startswith("--num-proc=")]
    if given and given[-1].isdigit():
        np = int(given[-1])  # the user's count (e.g. outside a cluster, where the layout is one slot)
    else:
        overrides = ["-np", str(np), *overrides]
    if not any(o in ("-H", "--hosts") or o.startswith("--hosts=") for o in overrides):
        overrides = [*overrides, "-H", f"localhost:{np}"]
    return [sys.executable, "-m", "horovod.runner.launch", "--gloo", *overrides, *wrapped_horovod(script)]


def wrapped_horovod(script: list[str]) -> list[str]:
    """Horovod names the rank HOROVOD_RANK."""
    argv = wrapped(script)
    argv[argv.index("RANK")] = "HOROVOD_RANK"
    return argv


def main(args: list[str]) -> int:
    """Launch the ranks with horovodrun; return its exit code."""
    if importlib.util.find_spec("horovod") is None:
        return missing("Horovod", "Build it into the trial's environment with `just horovod` (0.28.1 builds "
                                  "against torch >= 2.1 with its C++ standard raised to 17), or use "
                                  "kiln.launch.torch_distributed.")
    layout = Layout()
    if layout.nnodes > 1:
        print("[kiln] kiln.launch.horovod runs on one host; this trial spans several (horovodrun would need ssh "
              "between them). Use kiln.launch.torch_distributed, or fewer slots per trial.", file=sys.stderr)
        return 2
    overrides, script = split_overrides(args)
    if not script:
        print("usage: python3 -m kiln.launch.horovod [HOROVODRUN_ARGS... --] SCRIPT...", file=sys.stderr)
        return 2
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), DET_CHIEF_IP=layout.chief_ip)
    return run_collecting_errors(horovodrun_argv(layout, overrides, script), env, strip=HOROVODRUN_PREFIX)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
