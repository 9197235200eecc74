"""Training the embedded base model with Gaussian noise augmentation (Cohen et al., 2019).

Each training image gets fresh noise ``N(0, sigma^2 I)`` at every step, the noise the smoothed classifier will see.
Training is deterministic for a seed on a given machine: the shuffling, the noise and the initial weights all come
from seeded generators.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from approxtune.data import Inputs
from approxtune.models import build_model

__all__ = ["train_model"]


def train_model(
    arch: str,
    train: Inputs,
    *,
    sigma: float,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
    progress: Callable[[int, float], None] | None = None,
) -> nn.Module:
    """Train a fresh ``arch`` on ``train`` with Gaussian augmentation at ``sigma`` (Adam, cosine learning rate).

    ``progress(epoch, mean loss)`` is called after every epoch.  Returns the model in eval mode.
    """
    torch.manual_seed(seed)
    model = build_model(arch)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    loss_fn = nn.CrossEntropyLoss()
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(train), generator=gen)
        total = 0.0
        for lo in range(0, len(train), batch_size):
            idx = order[lo : lo + batch_size]
            x = train.x[idx]
            x = x + sigma * torch.randn(x.shape, generator=gen)
            loss = loss_fn(model(x), train.y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        sched.step()
        if progress is not None:
            progress(epoch + 1, total / len(train))
    return model.eval()
