"""Tiny reusable fixture: two MLPs trained on sklearn's bundled digits from different seeds.

Used by the stitching tests. Training a 64-128-128-10 ReLU MLP takes about a second on one core and
is cached per seed for the whole test session.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class DigitsData:
    """Train/test split of sklearn digits, pixels scaled to [0, 1]."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


@dataclass(frozen=True)
class DigitsModel:
    """A trained MLP split into encoder (up to the penultimate ReLU) and linear head."""

    encoder: nn.Module
    head: nn.Linear
    seed: int

    @torch.no_grad()
    def latents(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features."""
        return self.encoder(x)

    @torch.no_grad()
    def accuracy_from_latents(self, z: torch.Tensor, y: torch.Tensor) -> float:
        """Accuracy of this model's head on given latents."""
        return float((self.head(z).argmax(dim=1) == y).float().mean())


@functools.lru_cache(maxsize=1)
def digits_data(seed: int = 0, test_fraction: float = 0.25) -> DigitsData:
    """Load sklearn digits (bundled, no download) and split it with a fixed permutation."""
    from sklearn.datasets import load_digits

    ds = load_digits()
    x = torch.tensor(ds.data, dtype=torch.float32) / 16.0
    y = torch.tensor(ds.target, dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(x.shape[0], generator=g)
    n_test = int(round(test_fraction * x.shape[0]))
    te, tr = perm[:n_test], perm[n_test:]
    return DigitsData(x[tr], y[tr], x[te], y[te])


@functools.lru_cache(maxsize=4)
def train_mlp(seed: int, hidden: int = 128, epochs: int = 30, lr: float = 1e-3, batch: int = 64) -> DigitsModel:
    """Train a 64-hidden-hidden-10 ReLU MLP on the digits training split (Adam, seeded)."""
    data = digits_data()
    # Many tiny steps: one thread avoids oversubscription on a busy machine (it is also faster here).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train(data, seed, hidden, epochs, lr, batch)
    finally:
        torch.set_num_threads(threads)


def _train(data: DigitsData, seed: int, hidden: int, epochs: int, lr: float, batch: int) -> DigitsModel:
    torch.manual_seed(seed)
    encoder = nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU())
    head = nn.Linear(hidden, 10)
    model = nn.Sequential(encoder, head)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    n = data.x_train.shape[0]
    for _ in range(epochs):
        perm = torch.randperm(n, generator=g)
        for i in range(0, n, batch):
            idx = perm[i : i + batch]
            loss = nn.functional.cross_entropy(model(data.x_train[idx]), data.y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    return DigitsModel(encoder, head, seed)


def train_linear_head(z: torch.Tensor, y: torch.Tensor, seed: int = 0, epochs: int = 200, lr: float = 1e-2) -> nn.Linear:
    """Full-batch Adam on a linear classifier over fixed features."""
    torch.manual_seed(seed)
    head = nn.Linear(z.shape[1], int(y.max()) + 1)
    opt = torch.optim.Adam(head.parameters(), lr=lr)
    for _ in range(epochs):
        loss = nn.functional.cross_entropy(head(z), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    head.eval()
    return head
