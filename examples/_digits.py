"""Shared by the example scripts: scikit-learn's bundled digits (1797 8x8 images, no download),
a fixed split, a plain training loop and test accuracy. Not part of surgery."""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def digits(size: int = 8, channels: int = 1, flat: bool = False, seed: int = 0
           ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(x_train, y_train, x_test, y_test): 1437 / 360 images scaled to [0, 1], as (N, channels,
    size, size) (bilinear upsampling past 8) or, with `flat`, (N, 64)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    x, y = load_digits(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.2, random_state=seed, stratify=y)

    def images(a) -> Tensor:
        t = torch.tensor(a, dtype=torch.float32) / 16.0
        if flat:
            return t
        t = t.reshape(-1, 1, 8, 8)
        if size != 8:
            t = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False)
        return t.expand(-1, channels, -1, -1).contiguous()
    return images(x_tr), torch.tensor(y_tr), images(x_te), torch.tensor(y_te)


def fit(model: nn.Module, x: Tensor, y: Tensor, epochs: int, lr: float = 1e-3, batch: int = 64, seed: int = 0,
        extra_loss: Callable[[nn.Module], Tensor] | None = None, after_step: Callable[[], None] | None = None
        ) -> nn.Module:
    """Adam on cross-entropy (plus `extra_loss(model)`), `after_step()` after each optimizer step."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=g).split(batch):
            loss = F.cross_entropy(model(x[idx]), y[idx])
            if extra_loss is not None:
                loss = loss + extra_loss(model)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if after_step is not None:
                after_step()
    return model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    model.eval()
    return float((model(x).argmax(1) == y).float().mean())
