"""Write examples/curves/synthetic_run.csv: a seeded training curve with known incidents.

A 124M-style loss curve (warm-up, cosine LR, heavy-tailed batch noise) with:
one-step bad-batch spikes (watch), a NaN step (skip), an exploding grad norm (skip),
and a jump at step 2400 that never heals (roll back). Run: python examples/make_synthetic_curve.py
"""

from __future__ import annotations

import csv
import math
import random
from pathlib import Path

STEPS = 3000
ONE_STEP_SPIKES = {700: 1.2, 1100: 0.9, 1900: 1.6}
NAN_STEP = 1500
GRAD_EXPLOSION_STEP = 2100
JUMP_STEP = 2400


def lr_at(step: int, peak: float = 6e-4, warmup: int = 200) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / (STEPS - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def row(step: int, rng: random.Random) -> tuple[int, float, float, float]:
    """One logged step: (step, loss, grad_norm, lr)."""
    trend = 3.2 + 7.8 * math.exp(-step / 180) + 0.6 * math.exp(-step / 1500)
    noise = 0.04 * rng.gauss(0, 1) / math.sqrt(rng.gammavariate(2.0, 0.5))  # Student-t(4)
    loss = trend + noise + ONE_STEP_SPIKES.get(step, 0.0)
    grad = 0.35 + 4.0 * math.exp(-step / 60) + 0.05 * abs(rng.gauss(0, 1))
    if step == NAN_STEP:
        loss = math.nan
    if step == GRAD_EXPLOSION_STEP:
        grad *= 40.0
    if step >= JUMP_STEP:
        loss += 1.1 + 0.2 * math.exp(-(step - JUMP_STEP) / 50)
        grad *= 2.5
    return step, round(loss, 5), round(grad, 5), lr_at(step)


def main() -> None:
    rng = random.Random(2024)
    out = Path(__file__).with_name("curves") / "synthetic_run.csv"
    out.parent.mkdir(exist_ok=True)
    with out.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["step", "loss", "grad_norm", "lr"])
        for step in range(STEPS):
            writer.writerow(row(step, rng))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
