"""Shared fixtures: seeded synthetic curves with known spike steps."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import settings

# Property tests check invariants, not speed: on a loaded 2-core machine Hypothesis's
# default 200 ms deadline fails healthy examples, so no example has a deadline.
settings.register_profile("spikewatch", deadline=None)
settings.load_profile("spikewatch")

REPO = Path(__file__).resolve().parents[1]
#: The labelled real training curves shipped with the repository (see its SOURCES.md).
CURVES = REPO / "bench" / "curves"


def falling_curve(n: int, *, seed: int = 0, start: float = 4.0, noise: float = 0.03) -> list[float]:
    """A healthy-looking loss: exponential-ish decay towards a floor, Gaussian noise."""
    rng = random.Random(seed)
    return [start * (0.6 + 0.4 * 0.995**t) + rng.gauss(0.0, noise) for t in range(n)]


@pytest.fixture
def healthy() -> list[float]:
    return falling_curve(1000)


@pytest.fixture
def repo() -> Path:
    return REPO


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """One torch thread for a module's tests (tiny models: two OpenMP threads on a busy
    2-core host run far slower), the previous count restored after them."""
    import torch  # noqa: PLC0415 (most test modules never need torch)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
