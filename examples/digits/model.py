"""The digits network: a two-layer CNN for 8x8 grey images, 10 classes.

Kept apart from train.py so anything holding a downloaded ``model.pt`` can rebuild the network:
``model = build_model(width); model.load_state_dict(torch.load("model.pt", weights_only=True))``.
"""

from __future__ import annotations

from torch import nn

NUM_CLASSES = 10
IMAGE_SIZE = 8


def build_model(width: int) -> nn.Module:
    """A small CNN whose conv layers have ``width`` and ``2 * width`` channels."""
    if width < 1:
        raise ValueError(f"width must be a positive number of channels, got {width}")
    return nn.Sequential(
        nn.Conv2d(1, width, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.Conv2d(width, 2 * width, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),  # 8x8 -> 4x4
        nn.Flatten(),
        nn.Linear(2 * width * (IMAGE_SIZE // 2) ** 2, NUM_CLASSES),
    )


# Short alias for loaders that call ``model.build(width)``.
build = build_model
