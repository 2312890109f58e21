"""The model and the training steps that tune, train and evaluate share.

Ray ships these functions to its workers by value (see ``ship_by_value``), so
they work on a cluster's other machines without this file being there.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# MNIST's pixel mean and standard deviation (on a 0..1 scale).
MEAN, STD = 0.1307, 0.3081


class Net(nn.Module):
    """A small CNN: two conv + pool blocks, then two dense layers (about 105k weights)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc1 = nn.Linear(32 * 7 * 7, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


def to_tensors(images: np.ndarray, labels: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images (N x 28 x 28) and labels as normalised float (N x 1 x 28 x 28) and long tensors."""
    # A copy: arrays from Ray's object store are read-only.
    x = torch.from_numpy(np.array(images, dtype=np.float32)).div_(255.0)
    x = x.sub_(MEAN).div_(STD).unsqueeze(1)
    return x, torch.from_numpy(np.array(labels, dtype=np.int64))


def train_epoch(model: nn.Module, loader, optimizer, device) -> tuple[float, int, int]:
    """One pass over ``loader``: (summed loss, correct predictions, examples seen)."""
    model.train()
    loss_sum, correct, seen = 0.0, 0, 0
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        optimizer.zero_grad()
        out = model(x)
        loss = F.cross_entropy(out, y)
        loss.backward()
        optimizer.step()
        loss_sum += loss.item() * len(y)
        correct += (out.argmax(1) == y).sum().item()
        seen += len(y)
    return loss_sum, correct, seen


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, device, batch_size: int = 1024) -> torch.Tensor:
    """Predicted classes for ``x``, computed in batches."""
    model.eval()
    preds = [model(x[i:i + batch_size].to(device)).argmax(1).cpu()
             for i in range(0, len(x), batch_size)]
    return torch.cat(preds) if preds else torch.empty(0, dtype=torch.long)


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, device) -> float:
    return float((predict(model, x, device) == y).float().mean())


def ship_by_value() -> None:
    """Have Ray send this module's code with the functions that use it.

    Ray pickles a function from an importable module by reference, and a
    worker on another machine (or in another working directory) cannot import
    this project's ``src/model.py``. By value, the code travels with the task.
    """
    import sys

    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
