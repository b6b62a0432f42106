"""The seed story's network and image format: a small CNN over 8x8 grey images stored as PGM bytes.

Shared by the trial (``train.py``), the batch-inference job (``score.py``, which ships this file to Spark's
executors) and the tests: one definition of how an image is decoded and how weights are fingerprinted.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping

import numpy as np
import torch
from torch import nn

NUM_CLASSES = 10
IMAGE_SIZE = 8


def encode_pgm(pixels: np.ndarray, maxval: int = 16) -> bytes:
    """An 8-bit binary PGM (``P5``) of a 2-D array of grey levels in ``0..maxval``."""
    rows, cols = pixels.shape
    if pixels.min() < 0 or pixels.max() > maxval:
        raise ValueError(f"grey levels must lie in 0..{maxval}")
    return f"P5\n{cols} {rows}\n{maxval}\n".encode() + pixels.astype(np.uint8).tobytes()


def decode_pgm(data: bytes) -> np.ndarray:
    """A binary PGM's pixels as floats in [0, 1] (shape rows x cols)."""
    fields: list[bytes] = []
    pos = 0
    while len(fields) < 4:  # magic, width, height, maxval: whitespace-separated, then one whitespace byte
        while data[pos:pos + 1].isspace():
            pos += 1
        start = pos
        while pos < len(data) and not data[pos:pos + 1].isspace():
            pos += 1
        fields.append(data[start:pos])
    if fields[0] != b"P5":
        raise ValueError(f"not a binary PGM image (magic {fields[0][:8]!r})")
    cols, rows, maxval = (int(f) for f in fields[1:])
    body = data[pos + 1:pos + 1 + rows * cols]
    if len(body) != rows * cols or maxval > 255:
        raise ValueError(f"a {cols}x{rows} PGM needs {rows * cols} one-byte pixels, found {len(body)}")
    return np.frombuffer(body, dtype=np.uint8).reshape(rows, cols).astype(np.float32) / maxval


def images_tensor(images: Iterable[bytes]) -> torch.Tensor:
    """PGM images as one (N, 1, 8, 8) float tensor."""
    arrays = [decode_pgm(b) for b in images]
    if not arrays:
        return torch.zeros((0, 1, IMAGE_SIZE, IMAGE_SIZE))
    return torch.from_numpy(np.stack(arrays)).unsqueeze(1)


def build_model(width: int) -> nn.Module:
    """Two conv layers (``width`` and ``2 * width`` channels), a pool and a linear head; ``width`` is the
    architecture knob the search tunes."""
    if width < 1:
        raise ValueError(f"width must be a positive number of channels, got {width}")
    return nn.Sequential(
        nn.Conv2d(1, width, kernel_size=3, padding=1), nn.ReLU(),
        nn.Conv2d(width, 2 * width, kernel_size=3, padding=1), nn.ReLU(),
        nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(2 * width * (IMAGE_SIZE // 2) ** 2, NUM_CLASSES),
    )


def weights_digest(state: Mapping[str, torch.Tensor]) -> str:
    """``sha256:`` of a state dict's names and exact tensor bytes: equal digests, equal parameters."""
    h = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        h.update(name.encode() + b"\0" + str(tensor.dtype).encode() + str(tuple(tensor.shape)).encode())
        h.update(tensor.numpy().tobytes())
    return "sha256:" + h.hexdigest()


def class_metric(label: int) -> str:
    """The name of one class's validation accuracy: a metric of its own (one series per class in TensorBoard)."""
    return f"class_{label}_accuracy"


def per_class_accuracy(predicted: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Accuracy of each class present in ``labels``, as metrics named by ``class_metric``."""
    out: dict[str, float] = {}
    for c in range(NUM_CLASSES):
        mask = labels == c
        if int(mask.sum()):
            out[class_metric(c)] = float((predicted[mask] == c).float().mean())
    return out
