"""``from determined.pytorch import PyTorchTrial, ...`` and ``import determined.pytorch``: Kiln's ``kiln.pytorch``.

Determined's PyTorchTrial examples import its PyTorch API as a submodule, which ``determined/__init__.py``'s
attribute lookup cannot answer. This module hands over ``kiln.pytorch`` itself (one module object, so there is
one ``PyTorchTrial`` class for ``isinstance`` and for ``kiln.exec``'s ``--trial module:Class``).
"""

import sys

import kiln.pytorch

sys.modules[__name__] = kiln.pytorch
