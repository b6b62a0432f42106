"""Launchers for training code, in the shape of Determined's ``determined.launch``: run as modules.

``python3 -m kiln.launch.torch_distributed [TORCHRUN_ARGS... --] SCRIPT...`` starts one process per slot
(torchrun) on the slots and hosts the trial was given; ``kiln.launch.horovod`` does the same with horovodrun
(gloo), ``kiln.launch.deepspeed`` with DeepSpeed's launcher, and ``kiln.launch.wrap_rank RANK -- SCRIPT...``
prefixes every line a rank prints with its rank. Nothing here is imported by ``import kiln``; the worker
leaves an entrypoint that names one of these (or Determined's) to it rather than wrapping it in torchrun.
"""
