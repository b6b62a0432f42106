"""``python3 -m kiln.launch.deepspeed [DEEPSPEED_ARGS... --] SCRIPT...``: one process per slot through DeepSpeed.

Runs DeepSpeed's launcher (``deepspeed.launcher.runner``) on this trial's slots with ``--no_python
--no_local_rank`` (as Determined's launcher does), each rank under ``kiln.launch.wrap_rank``, so
``DistributedContext.from_deepspeed()`` reads the layout it sets. DeepSpeed is optional; without it this says
so and exits 2. Trials spanning hosts need DeepSpeed's pdsh/ssh runner: refused with a message.
"""

from __future__ import annotations

import importlib.util
import os
import sys

from kiln.launch._common import Layout, free_port, missing, run_collecting_errors, split_overrides, wrapped


def deepspeed_argv(layout: Layout, overrides: list[str], script: list[str], port: int) -> list[str]:
    """The DeepSpeed launcher's command line for this host."""
    return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_nodes=1", f"--num_gpus={layout.slots}",
            f"--master_port={port}", "--no_python", "--no_local_rank", *overrides, *wrapped(script)]


def main(args: list[str]) -> int:
    """Launch the ranks with DeepSpeed; return its exit code."""
    if importlib.util.find_spec("deepspeed") is None:
        return missing("DeepSpeed", "Install it in the trial's environment (pip install deepspeed), or use "
                                    "kiln.launch.torch_distributed.")
    layout = Layout()
    if layout.nnodes > 1:
        print("[kiln] kiln.launch.deepspeed runs on one host; this trial spans several (DeepSpeed would need "
              "pdsh/ssh between them). Use kiln.launch.torch_distributed.", file=sys.stderr)
        return 2
    overrides, script = split_overrides(args)
    if not script:
        print("usage: python3 -m kiln.launch.deepspeed [DEEPSPEED_ARGS... --] SCRIPT...", file=sys.stderr)
        return 2
    env = dict(os.environ, DET_CHIEF_IP=layout.chief_ip)
    return run_collecting_errors(deepspeed_argv(layout, overrides, script, free_port()), env)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
