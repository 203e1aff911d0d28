"""A small classification task for the accumulation tests: real training on CPU.

10-way classification of Gaussian inputs whose labels a fixed random teacher samples
(the loss has a floor). The i-th loader batch is data position i (no shuffling); a
poisoned run has its labels shifted for a range of positions late in the run, as a
corrupted shard would.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional
from torch.utils.data import TensorDataset

FEATURES, HIDDEN, CLASSES = 32, 64, 10
PEAK_LR, WARMUP, LR_FLOOR = 3e-2, 20, 0.1


def make_data(
    batches: int, batch_size: int, *, seed: int = 2, poison: range = range(0)
) -> TensorDataset:
    """Seeded samples; labels drawn from a fixed teacher; poison given by batch position."""
    teacher = torch.randn(FEATURES, CLASSES, generator=torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batches * batch_size, FEATURES, generator=g)
    probs = torch.softmax(x @ teacher * (8 / math.sqrt(FEATURES)), dim=1)
    y = torch.multinomial(probs, 1, generator=g).squeeze(1)
    bad = slice(poison.start * batch_size, poison.stop * batch_size)
    y[bad] = (y[bad] + 3) % CLASSES  # the labels no longer match the inputs
    return TensorDataset(x, y)


def make_net() -> nn.Module:
    """The MLP every run starts from (seeded)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(FEATURES, HIDDEN), nn.GELU(), nn.Linear(HIDDEN, CLASSES))


def make_optimizer(
    net: nn.Module, steps: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW with warm-up and cosine decay to a floor, stepped every optimizer step."""
    opt = torch.optim.AdamW(net.parameters(), lr=PEAK_LR, weight_decay=0.01)

    def factor(step: int) -> float:
        cosine = 0.5 * (1.0 + math.cos(math.pi * min(step, steps) / steps))
        return min(1.0, (step + 1) / WARMUP) * (LR_FLOOR + (1.0 - LR_FLOOR) * cosine)

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def held_out_loss(net: nn.Module) -> float:
    """Mean loss on fixed clean data no run trains on."""
    x, y = make_data(32, 256, seed=99).tensors
    with torch.no_grad():
        return functional.cross_entropy(net(x), y).item()
