"""DCP checkpoints: 2 ranks (gloo, spawn, file store) save; 2 ranks or 1 process resume."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from spikewatch_hooks.distributed.checkpoint import (
    load_distributed,
    save_distributed,
    wait_for_save,
)
from spikewatch_hooks.guard import SpikeGuard
from spikewatch_hooks.state.checkpoint import CheckpointError

SAVE_AT = 20  # optimizer steps before the checkpoint
MORE = 10  # steps trained after it, by the saving run and by the resumed one
LEDGER = (23, 29)  # data positions marked bad after the save point, before it is written

Batch = tuple[int, torch.Tensor, torch.Tensor]


def _model() -> torch.nn.Module:
    # Dropout: the continuation is bit-identical only if every rank's RNG is restored.
    return torch.nn.Sequential(
        torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Dropout(0.2), torch.nn.Linear(16, 1)
    )


def _loader(rank: int) -> Iterator[Batch]:
    for position in range(10_000):
        g = torch.Generator().manual_seed(1000 * position + rank)
        x = torch.randn(16, 8, generator=g)
        yield position, x, x.sum(dim=1, keepdim=True)


def _guard(model: torch.nn.Module, **checkpoints: Any) -> SpikeGuard:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=7, gamma=0.5)
    return SpikeGuard(model=model, optimizer=opt, scheduler=sched, snapshot_every=5, **checkpoints)


def _train(guard: SpikeGuard, batches: Iterator[Batch], until: int) -> list[int]:
    """Train until ``until`` optimizer steps; return the data positions trained on."""
    model, opt = guard.engine.model, guard.engine.optimizer
    positions = []
    while guard.step_count < until:
        position, x, y = next(batches)
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()  # type: ignore[no-untyped-call]
        guard.step(loss=loss)
        opt.zero_grad(set_to_none=True)
        positions.append(position)
    return positions


def _flat(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).clone()


def _init(rank: int, store: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)


def _save_worker(rank: int, out: str) -> None:
    _init(rank, f"{out}/store-save")
    torch.manual_seed(0)
    model = DistributedDataParallel(_model())
    torch.manual_seed(100 + rank)  # each rank its own dropout stream
    guard = _guard(model, checkpoint_dir=out, checkpoint_every=10)  # async, in lockstep
    batches = guard.batches(_loader(rank))
    _train(guard, batches, SAVE_AT)
    guard.ledger.add(*LEDGER, reason="marked bad by the test")
    saved = _flat(model)
    guard.save_checkpoint(f"{out}/sync")
    first = save_distributed(guard.engine, f"{out}/async", async_save=True)
    second = save_distributed(guard.engine, f"{out}/async2", async_save=True)
    first_done = first.done()  # the second save waited for the first
    second.result()
    committed = Path(out, "async2", "guard.json").exists()  # on every rank, not only rank 0
    third = save_distributed(guard.engine, f"{out}/async3", async_save=True)
    positions = _train(guard, batches, SAVE_AT + MORE)  # while async3 is being written
    third.result()
    wait_for_save(guard.engine)  # the automatic save at the last step
    failures = guard.stats.get("checkpoint_failures", 0)
    result = {"positions": positions, "first_done": first_done, "failures": failures}
    result["committed"] = committed
    torch.save({"saved": saved, "continued": _flat(model), **result}, f"{out}/save-{rank}.pt")
    _leave()


def _resume_worker(rank: int, out: str) -> None:
    _init(rank, f"{out}/store-resume")
    torch.manual_seed(1)  # other initial weights: the checkpoint must overwrite them
    model = DistributedDataParallel(_model())
    guard = _guard(model)
    guard.resume(f"{out}/async")
    from_async = _flat(model)
    guard.resume(f"{out}/sync")
    loaded, step, ledger = _flat(model), guard.step_count, guard.ledger.ranges()
    positions = _train(guard, guard.batches(_loader(rank)), SAVE_AT + MORE)
    result = {"step": step, "ledger": ledger, "positions": positions, "from_async": from_async}
    continued = _flat(model)
    guard.resume(f"{out}/single")  # saved by one process: rank 1 has no RNG file of its own
    single = {"single": _flat(model), "single_step": guard.step_count, "rng": torch.get_rng_state()}
    torch.save(
        {"loaded": loaded, "continued": continued, **result, **single}, f"{out}/resume-{rank}.pt"
    )
    _leave()


def _leave() -> None:
    """Exit a worker without interpreter teardown: gloo's threads sometimes abort the
    process ("terminate called without an active exception") when Python shuts down
    around them."""
    dist.barrier()
    os._exit(0)


def _spawn(worker: Any, out: Path) -> None:
    mp.spawn(worker, args=(str(out),), nprocs=2, join=True)  # type: ignore[attr-defined,no-untyped-call]


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """single/: one process, 5 steps. sync/, async*/: two ranks, SAVE_AT steps and
    LEDGER marked; spikewatch-latest/: their automatic checkpoint at SAVE_AT + MORE."""
    out = tmp_path_factory.mktemp("dcp")
    torch.manual_seed(2)
    guard = _guard(_model())
    _train(guard, guard.batches(_loader(0)), 5)
    save_distributed(guard.engine, out / "single").result()
    torch.save(
        {"params": _flat(guard.engine.model), "rng": torch.get_rng_state()}, out / "single.pt"
    )
    _spawn(_save_worker, out)
    return out


def _result(path: Path) -> dict[str, Any]:
    loaded: dict[str, Any] = torch.load(path, weights_only=True)
    return loaded


def test_two_ranks_resume_bit_identical_and_honour_the_ledger(saved: Path) -> None:
    _spawn(_resume_worker, saved)
    for rank in (0, 1):
        before, after = _result(saved / f"save-{rank}.pt"), _result(saved / f"resume-{rank}.pt")
        assert after["step"] == SAVE_AT
        assert after["ledger"] == [LEDGER]
        assert torch.equal(after["loaded"], before["saved"])
        assert torch.equal(after["from_async"], before["saved"])  # (d) async is loadable
        assert before["first_done"] and before["committed"]
        # The resumed run trains on exactly the batches the saving run went on with:
        # after the save point, never a ledger position; and it ends bit-identical
        # (optimizer, scheduler and each rank's RNG restored).
        assert after["positions"] == before["positions"]
        assert after["positions"][0] == SAVE_AT
        assert not set(after["positions"]) & set(range(*LEDGER))
        assert torch.equal(after["continued"], before["continued"])


def test_two_ranks_resume_a_one_process_checkpoint(saved: Path) -> None:
    single = _result(saved / "single.pt")
    rank0, rank1 = _result(saved / "resume-0.pt"), _result(saved / "resume-1.pt")
    assert rank0["single_step"] == rank1["single_step"] == 5
    assert torch.equal(rank0["single"], single["params"])
    assert torch.equal(rank1["single"], single["params"])
    assert torch.equal(rank0["rng"], single["rng"])  # rank 0: its own RNG state
    assert not torch.equal(rank1["rng"], single["rng"])  # rank 1: derived, not a copy


def test_one_process_resumes_a_two_rank_checkpoint(saved: Path) -> None:
    guard = _guard(_model())  # no process group: no lockstep, DCP loads without one
    guard.resume(saved / "async3")  # written while training went on
    before = _result(saved / "save-0.pt")
    assert guard.step_count == SAVE_AT
    assert guard.ledger.ranges() == [LEDGER]
    assert torch.equal(_flat(guard.engine.model), before["saved"])
    assert guard.engine.optimizer.state_dict()["state"][0]["step"] == SAVE_AT
    assert guard.engine.scheduler.last_epoch == SAVE_AT
    positions = _train(guard, guard.batches(_loader(0)), SAVE_AT + MORE)
    assert positions == before["positions"]  # the same positions, the ledger skipped


def test_automatic_checkpoints_of_two_ranks_are_written_in_the_background(saved: Path) -> None:
    before = _result(saved / "save-0.pt")
    assert before["failures"] == 0
    guard = _guard(_model())
    guard.resume(saved / "spikewatch-latest")
    assert guard.step_count == SAVE_AT + MORE
    assert guard.ledger.ranges() == [LEDGER]
    assert torch.equal(_flat(guard.engine.model), before["continued"])


def _edit_step(path: Path) -> None:
    data = json.loads(path.read_text())
    data["checkpoint"]["guard"]["step"] += 1
    path.write_text(json.dumps(data))


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (_edit_step, "guard.json: checksum mismatch"),
        (lambda p: p.write_text(p.read_text()[:100]), "guard.json: unreadable"),
        (lambda p: p.unlink(), "guard.json is missing: the save did not finish"),
    ],
    ids=["edited", "truncated", "missing"],
)
def test_a_damaged_guard_json_is_refused(
    saved: Path, tmp_path: Path, damage: Any, message: str
) -> None:
    ckpt = shutil.copytree(saved / "sync", tmp_path / "ckpt")
    damage(ckpt / "guard.json")
    guard = _guard(_model())
    untouched = _flat(guard.engine.model)
    with pytest.raises(CheckpointError, match=message) as caught:
        guard.resume(ckpt)
    assert "older checkpoint" in str(caught.value)
    assert torch.equal(_flat(guard.engine.model), untouched)


def test_an_interrupted_swap_names_the_previous_checkpoint(saved: Path, tmp_path: Path) -> None:
    shutil.copytree(saved / "sync", tmp_path / ".ckpt.old")
    (tmp_path / "ckpt").mkdir()
    with pytest.raises(CheckpointError, match=r"rename it to .*ckpt"):
        load_distributed(_guard(_model()).engine, tmp_path / "ckpt")


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # async: on DCP's thread
def test_one_process_round_trip_keeps_a_fresh_optimizer_fresh(tmp_path: Path) -> None:
    guard = _guard(_model())
    save_distributed(guard.engine, tmp_path / "ckpt").result()
    assert not guard.engine.optimizer.state  # no zero-filled Adam state left behind
    save_distributed(guard.engine, tmp_path / "ckpt", async_save=True).result()  # replaces it
    assert load_distributed(guard.engine, tmp_path / "ckpt")["next_position"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no staging left


def test_a_folder_that_is_not_a_checkpoint_is_never_replaced(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    guard = _guard(_model())
    with pytest.raises(CheckpointError, match="not a spikewatch checkpoint"):
        guard.save_checkpoint(tmp_path)  # an existing folder: the DCP path
    assert (tmp_path / "notes.txt").read_text() == "mine"
