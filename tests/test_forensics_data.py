"""The batches forensics needs: the cache, the DataLoader's indices, the quarantine."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from spikewatch.forensics.quarantine import QuarantineEntry, append, read
from spikewatch_hooks.forensics.cache import BatchCache
from spikewatch_hooks.forensics.indices import recording
from spikewatch_hooks.guard import SpikeGuard

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class Numbered(torch.utils.data.Dataset[dict[str, torch.Tensor]]):
    def __len__(self) -> int:
        return 40

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": torch.full((3,), float(i)), "id": torch.tensor(i)}


def guard_for(**kw: object) -> SpikeGuard:
    model = nn.Linear(3, 1)
    return SpikeGuard(model, torch.optim.SGD(model.parameters(), lr=0.0),
                      probe_loss=lambda m, b: m(b["x"]).squeeze(-1), **kw)  # type: ignore[arg-type]  # fmt: skip


def train_ids(guard: SpikeGuard, loader: DataLoader[dict[str, torch.Tensor]]) -> list[list[int]]:
    out = []
    for batch in guard.batches(loader):
        out.append(batch["id"].tolist())
        guard.step(loss=torch.tensor(1.0))
    return out


@pytest.mark.parametrize("workers", [0, 2])
def test_recorded_indices_match_the_batches_and_the_order_is_unchanged(workers: int) -> None:
    def loader() -> DataLoader[dict[str, torch.Tensor]]:
        return DataLoader(Numbered(), batch_size=4, shuffle=True, num_workers=workers,
                          generator=torch.Generator().manual_seed(9))  # fmt: skip

    plain = [b["id"].tolist() for b in loader()]
    recorded = loader()
    with recording(recorded) as seen:
        assert seen is not None
        got = [(b["id"].tolist(), list(seen.next_batch() or ())) for b in recorded]
    assert [b for b, _ in got] == plain  # the same random order as without recording
    assert all(b == i for b, i in got)
    assert type(recorded.batch_sampler).__name__ == "BatchSampler"  # put back


def test_quarantined_samples_are_dropped_in_every_epoch_and_after_a_restart(
    tmp_path: Path,
) -> None:
    file = tmp_path / "q.jsonl"
    entry = QuarantineEntry(run="r", step=3, position=1, index=5, loss=9.0,
                            reference_loss=2.0, reason="test", time=0.0)  # fmt: skip
    append(file, [entry, QuarantineEntry(**{**entry.__dict__, "index": 8})])
    guard = guard_for(quarantine_file=file)  # a resumed run reads the file
    loader = DataLoader(Numbered(), batch_size=4)
    first, second = train_ids(guard, loader), train_ids(guard, loader)
    for epoch in (first, second):
        flat = [i for b in epoch for i in b]
        assert 5 not in flat and 8 not in flat and len(flat) == 38
        assert epoch[1] == [4, 6, 7]  # the rows of the other samples are kept
    assert guard.stats["quarantined_samples_skipped"] == 4
    # Positions continue across epochs: the second epoch's batches are 10..19.
    assert guard.engine.position == 19


def test_a_batch_without_per_sample_rows_is_skipped_whole(tmp_path: Path) -> None:
    file = tmp_path / "q.jsonl"
    append(file, [QuarantineEntry(run="r", step=0, position=0, index=2, loss=9.0,
                                  reference_loss=1.0, reason="", time=0.0)])  # fmt: skip
    guard = guard_for(quarantine_file=file)
    loader = DataLoader(Numbered(), batch_size=4, collate_fn=lambda rows: "opaque")
    assert len(list(guard.batches(loader))) == 9
    assert guard.stats["quarantined_batches_skipped"] == 1


def test_the_ledger_does_not_fall_on_the_next_epoch() -> None:
    guard = guard_for()
    guard.ledger.add(2, 4, reason="bad data")
    loader = DataLoader(Numbered(), batch_size=4)
    first, second = train_ids(guard, loader), train_ids(guard, loader)
    assert len(first) == 8 and len(second) == 10


def test_the_cache_keeps_what_its_caps_allow() -> None:
    cache = BatchCache(max_batches=10, max_bytes=100)
    for p in range(5):
        cache.remember(p, step=p, batch=torch.zeros(10))  # 40 bytes each
    assert [e.position for e in cache.entries()] == [3, 4] and cache.nbytes == 80
    cache.remember(9, step=9, batch=torch.zeros(100))
    assert cache.too_big == 1 and len(cache) == 2
    cache.remember(4, step=7, batch=torch.zeros(5))  # a position again (after a rollback)
    assert [(e.position, e.step) for e in cache.entries()] == [(3, 3), (4, 7)]


def test_a_quarantine_file_cut_short_keeps_its_whole_lines(tmp_path: Path) -> None:
    file = tmp_path / "q.jsonl"
    append(file, [QuarantineEntry(run="r", step=1, position=0, index=3, loss=5.0,
                                  reference_loss=None, reason="", time=0.0)])  # fmt: skip
    with file.open("a") as out:
        out.write('{"run": "r", "step": 2, "posi')  # a crash mid-line
    assert [e.index for e in read(file)] == [3]
    assert read(tmp_path / "missing.jsonl") == []
