"""``python -m kiln.exec module:function``: run a Determined-style ``module:function`` entrypoint."""

from __future__ import annotations

import importlib
import sys
from typing import Any


def main(argv: list[str]) -> int:
    """Import the module from the working directory and call the function (or class) it names; a
    PyTorchTrial subclass is trained by ``kiln.pytorch.Trainer`` instead."""
    if len(argv) != 1 or ":" not in argv[0]:
        print("usage: python -m kiln.exec module:function", file=sys.stderr)
        return 2
    module_name, _, attr = argv[0].partition(":")
    sys.path.insert(0, ".")
    target: Any = importlib.import_module(module_name)
    for part in attr.split("."):
        target = getattr(target, part)
    trial_api = sys.modules.get("kiln.pytorch")  # loaded only if the user's module imported it
    if trial_api is not None and isinstance(target, type) and issubclass(target, trial_api.PyTorchTrial):
        # Determined's ``entrypoint: model_def:MyTrial``: the Trainer runs the trial class.
        return int(trial_api._trainer._train_trial_class(target))
    result = target()
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
