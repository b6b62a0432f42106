"""``python3 -m kiln.launch.torch_distributed [TORCHRUN_ARGS... --] (--trial TRIAL | SCRIPT...)``.

Starts SCRIPT once per slot of this trial with torchrun, as Determined's launcher of the same name does: one
host runs a standalone rendezvous; a trial spanning hosts joins node 0's (``container_addrs[0]`` at the port
the scheduler gave). Each rank runs under ``kiln.launch.wrap_rank``, so its lines carry its rank, and when the
run fails the first failing rank's traceback is printed after torchrun's summary. ``--trial module:Class``
runs a Trial class through ``kiln.exec``. Outside a cluster it runs one process (or what
``--nproc_per_node`` in TORCHRUN_ARGS says).
"""

from __future__ import annotations

import sys

from kiln.launch._common import Layout, run_collecting_errors, split_overrides, wrapped


def torchrun_argv(layout: Layout, overrides: list[str], script: list[str]) -> list[str]:
    """The torchrun command line for this host."""
    argv = [sys.executable, "-m", "torch.distributed.run", "--max_restarts=0"]
    if layout.nnodes > 1:
        argv += [f"--nnodes={layout.nnodes}", f"--node_rank={layout.node_rank}",
                 f"--master_addr={layout.chief_ip}", f"--master_port={layout.master_port or 29400}"]
    else:
        argv.append("--standalone")
    if not any(o.startswith("--nproc_per_node") or o.startswith("--nproc-per-node") for o in overrides):
        argv.append(f"--nproc_per_node={layout.slots}")
    # --no-python: torchrun runs the command as given (wrap_rank, then the user's SCRIPT, any program).
    return [*argv, *overrides, "--no-python", *wrapped(script)]


def parse(args: list[str]) -> tuple[list[str], list[str]]:
    """``(torchrun overrides, script argv)`` from the launcher's arguments."""
    overrides, rest = split_overrides(args)
    if rest[:1] == ["--trial"] or any(a.startswith("--trial=") for a in rest[:1]):
        trial = rest[1] if rest[0] == "--trial" and len(rest) > 1 else rest[0].partition("=")[2]
        if not trial:
            raise SystemExit("--trial needs a module:Class")
        rest = ["python3", "-m", "kiln.exec", trial, *rest[2 if rest[0] == "--trial" else 1:]]
    if "--trial" in overrides:  # Determined also accepts --trial before the overrides' end
        i = overrides.index("--trial")
        rest = ["python3", "-m", "kiln.exec", overrides[i + 1]]
        overrides = overrides[:i] + overrides[i + 2:]
    if not rest:
        raise SystemExit("usage: python3 -m kiln.launch.torch_distributed [TORCHRUN_ARGS... --] "
                         "(--trial TRIAL | SCRIPT...)")
    return overrides, rest


def main(args: list[str]) -> int:
    """Launch the ranks; return the launcher's exit code."""
    overrides, script = parse(args)
    return run_collecting_errors(torchrun_argv(Layout(), overrides, script))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
