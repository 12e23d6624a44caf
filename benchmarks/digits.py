"""Shared digits helpers for benchmarks and tests: scikit-learn's bundled ``load_digits``
(1797 8x8 images, no download), a fixed split, two small models and a training loop that adds
``surgery.penalty`` and calls ``surgery.step``.

Example::

    >>> from benchmarks.digits import load_digits_split, make_mlp, train, accuracy
    >>> data = load_digits_split(0)
    >>> model = train(make_mlp(), data.x_train, data.y_train, epochs=1)
    >>> 0.0 <= accuracy(model, data.x_test, data.y_test) <= 1.0
    True
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from surgery.verify import eval_mode

__all__ = ["Digits", "load_digits_split", "make_mlp", "make_cnn", "train", "accuracy",
           "balanced_accuracy"]


@dataclass
class Digits:
    """Flat features (N, 64) scaled to [0, 1], labels (N,), and the image view (N, 1, 8, 8)."""

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor

    @property
    def img_train(self) -> Tensor:
        return self.x_train.reshape(-1, 1, 8, 8)

    @property
    def img_test(self) -> Tensor:
        return self.x_test.reshape(-1, 1, 8, 8)


def load_digits_split(seed: int = 0, test_size: float = 0.2) -> Digits:
    """The digits data with a fixed stratified train/test split (80/20 by default)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=test_size, random_state=seed, stratify=y)
    f = lambda a: torch.tensor(a, dtype=torch.float32) / 16.0  # noqa: E731 - pixel values are 0..16
    return Digits(f(x_tr), torch.tensor(y_tr), f(x_te), torch.tensor(y_te))


def make_mlp(hidden: int = 128, classes: int = 10, seed: int = 0) -> nn.Sequential:
    """The 64-128-128-10 MLP (flat input). Layers: 0 Linear, 1 ReLU, 2 Linear, 3 ReLU, 4 head."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, classes))


class DigitsCNN(nn.Module):
    """A small CNN for 1x8x8 digits: three conv-BN-ReLU blocks (32, 64, 64), pool, linear head."""

    def __init__(self, width: int = 32, classes: int = 10):
        super().__init__()
        w = width
        self.conv1, self.bn1 = nn.Conv2d(1, w, 3, padding=1), nn.BatchNorm2d(w)
        self.conv2, self.bn2 = nn.Conv2d(w, 2 * w, 3, padding=1), nn.BatchNorm2d(2 * w)
        self.conv3, self.bn3 = nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.BatchNorm2d(2 * w)
        self.head = nn.Linear(2 * w, classes)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.max_pool2d(F.relu(self.bn2(self.conv2(x))), 2)
        x = F.relu(self.bn3(self.conv3(x)))
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def make_cnn(width: int = 32, classes: int = 10, seed: int = 0) -> DigitsCNN:
    """The digits CNN (input N x 1 x 8 x 8); convs conv1..conv3, head `head`."""
    torch.manual_seed(seed)
    return DigitsCNN(width, classes)


class DigitsBlock(nn.Module):
    """A pre-norm transformer block: multi-head self-attention (separate q/k/v/o projections,
    ``F.scaled_dot_product_attention``), then a GELU MLP, each added to the residual stream."""

    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x: Tensor) -> Tensor:
        b, n, _ = x.shape
        h = self.norm1(x)
        q, k, v = (p(h).view(b, n, self.heads, -1).transpose(1, 2) for p in (self.q, self.k, self.v))
        x = x + self.o(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, -1))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class DigitsTransformer(nn.Module):
    """Digits read as 8 tokens of 8 pixels (one row each): a linear embedding plus learned
    positions, pre-norm blocks, a final LayerNorm, mean over tokens, a linear head."""

    def __init__(self, d: int = 32, heads: int = 4, layers: int = 2, classes: int = 10):
        super().__init__()
        self.embed, self.pos = nn.Linear(8, d), nn.Parameter(torch.randn(8, d) * 0.02)
        self.blocks = nn.Sequential(*(DigitsBlock(d, heads) for _ in range(layers)))
        self.norm, self.head = nn.LayerNorm(d), nn.Linear(d, classes)

    def forward(self, x: Tensor) -> Tensor:
        h = self.blocks(self.embed(x.reshape(-1, 8, 8)) + self.pos)
        return self.head(self.norm(h).mean(1))


def make_transformer(d: int = 32, seed: int = 0) -> DigitsTransformer:
    """The digits transformer (flat 64-pixel input, like the MLP); stream width `d`."""
    torch.manual_seed(seed)
    return DigitsTransformer(d)


def train(model: nn.Module, x: Tensor, y: Tensor, *, epochs: int = 60, lr: float = 1e-2,
          batch_size: int = 64, seed: int = 0, penalty: bool = True,
          params: Optional[list] = None, loss_fn: Callable = F.cross_entropy,
          cosine: bool = False, progress: bool = False) -> nn.Module:
    """Train in place with Adam on (x, y) for `epochs` shuffled epochs (fixed `seed`). With
    `penalty`, ``surgery.penalty(model)`` joins the loss and ``surgery.step(model)`` follows
    every optimizer step. Trains only parameters with requires_grad (or `params`). `cosine`
    decays the learning rate to 0 over the run (per step)."""
    import surgery

    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # stochastic masks draw from the global generator
    opt = torch.optim.Adam(params if params is not None else [p for p in model.parameters() if p.requires_grad],
                           lr=lr)
    steps = epochs * ((len(x) + batch_size - 1) // batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(steps, 1)) if cosine else None
    model.train()
    epochs_iter = range(epochs)
    if progress:
        from tqdm import tqdm
        epochs_iter = tqdm(epochs_iter, desc="train", leave=False)
    for _ in epochs_iter:
        order = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), batch_size):
            idx = order[i:i + batch_size]
            loss = loss_fn(model(x[idx]), y[idx])
            if penalty:
                loss = loss + surgery.penalty(model)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if sched is not None:
                sched.step()
            if penalty:
                surgery.step(model)
    model.eval()
    return model


@torch.no_grad()
def accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    """Top-1 accuracy in eval mode (training flags restored)."""
    with eval_mode(model):
        return float((model(x).argmax(-1) == y).float().mean())


@torch.no_grad()
def balanced_accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    """Mean per-class recall in eval mode (for imbalanced tasks such as 'is it a 0')."""
    with eval_mode(model):
        pred = model(x).argmax(-1)
    recalls = [float((pred[y == c] == c).float().mean()) for c in torch.unique(y)]
    return sum(recalls) / len(recalls)
