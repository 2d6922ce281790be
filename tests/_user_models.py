"""Modules a user writes in their own package (not merge.zoo), for engines that must honour `architecture:`."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class TinyNet(nn.Module):
    """A three-layer ReLU classifier with its own layer names: `encoder`, `hidden`, `classifier`."""

    def __init__(self, inputs: int = 64, hidden: int = 48, classes: int = 10) -> None:
        super().__init__()
        self.encoder = nn.Linear(inputs, hidden)
        self.hidden = nn.Linear(hidden, hidden)
        self.classifier = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.encoder(x.flatten(1)))
        return self.classifier(F.relu(self.hidden(x)))


def tiny_net(hidden: int = 48, classes: int = 10) -> TinyNet:
    """The factory a recipe names as `tests._user_models:tiny_net`."""
    return TinyNet(hidden=hidden, classes=classes)


class SmallCNN(nn.Module):
    """A CNN on 3-channel images whose alphabetically first weight (`a_head`) is its last layer."""

    def __init__(self, width: int = 8, classes: int = 10) -> None:
        super().__init__()
        self.z_stem = nn.Conv2d(3, width, 3, padding=1)
        self.norm = nn.BatchNorm2d(width)
        self.mid = nn.Conv2d(width, 2 * width, 3, padding=1, stride=2)
        self.a_head = nn.Linear(2 * width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.norm(self.z_stem(x)))
        x = F.relu(self.mid(x))
        return self.a_head(F.adaptive_avg_pool2d(x, 1).flatten(1))


def small_cnn(width: int = 8, classes: int = 10) -> SmallCNN:
    """The factory `tests._user_models:small_cnn`."""
    return SmallCNN(width=width, classes=classes)
