"""DCP checkpoints are verified before anything is loaded: a flipped byte or a missing file
in any file of the folder is a `CheckpointError` naming it, on every rank, and the live
model, optimizer, scheduler, RNG and guard are exactly as they were."""

from __future__ import annotations

import datetime
import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.nn.parallel import DistributedDataParallel

from spikewatch_hooks.distributed import checkpoint as dcp_checkpoint
from spikewatch_hooks.distributed import restore
from spikewatch_hooks.distributed.checkpoint import load_distributed, save_distributed
from spikewatch_hooks.distributed.files import canonical
from spikewatch_hooks.distributed.manifest import share
from spikewatch_hooks.guard import SpikeGuard
from spikewatch_hooks.state.checkpoint import CheckpointError, sha256
from test_dist_checkpoint import _flat, _guard, _loader, _model, _train

STEPS = 6
FILES = [
    ".metadata",
    "__0_0.distcp",
    "__1_0.distcp",
    "rng-rank0.pt",
    "rng-rank1.pt",
    "scheduler.pt",
]
# A folder per damage, resumed in turn by the same two ranks; "good" last: the ranks are
# still in step after every refusal.
TWO_RANK_CASES = ["flip-__1_0.distcp", "flip-rng-rank1.pt", "missing-.metadata", "good"]


def _init(rank: int, store: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{store}",
        rank=rank,
        world_size=2,
        timeout=datetime.timedelta(seconds=60),  # a hang fails the test, not the suite
    )


def _save_worker(rank: int, out: str) -> None:
    _init(rank, f"{out}/store-save")
    torch.manual_seed(0)
    model = DistributedDataParallel(_model())
    torch.manual_seed(100 + rank)
    guard = _guard(model)
    _train(guard, guard.batches(_loader(rank)), STEPS)
    guard.save_checkpoint(f"{out}/ckpt")
    torch.save(_flat(model), f"{out}/saved-{rank}.pt")
    dist.barrier()
    os._exit(0)


def _resume_worker(rank: int, out: str) -> None:
    _init(rank, f"{out}/store-resume")
    torch.manual_seed(1)  # weights unlike the checkpoint's
    guard = _guard(DistributedDataParallel(_model()))
    untouched = _flat(guard.engine.model)
    outcomes: dict[str, Any] = {}
    for case in TWO_RANK_CASES:
        try:
            guard.resume(f"{out}/{case}")
            outcomes[case] = {"error": None}
        except Exception as exc:  # recorded: the test asserts which
            outcomes[case] = {"error": type(exc).__name__, "message": str(exc)}
        outcomes[case]["unchanged"] = torch.equal(_flat(guard.engine.model), untouched)
        outcomes[case]["params"] = _flat(guard.engine.model)
        outcomes[case]["step"] = guard.step_count
    torch.save(outcomes, f"{out}/outcomes-{rank}.pt")
    dist.barrier()
    os._exit(0)


def _spawn(worker: Any, out: Path, *, within: float = 240) -> None:
    """Run ``worker`` on two ranks; fail (not hang) if they do not finish ``within`` s."""
    ctx = mp.start_processes(  # type: ignore[attr-defined,no-untyped-call]
        worker, args=(str(out),), nprocs=2, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + within
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for process in ctx.processes:
                process.kill()
            pytest.fail(f"{worker.__name__} hung: a rank waits in a collective")


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ckpt/: two DDP ranks, STEPS steps, AdamW, StepLR (every kind of file)."""
    out = tmp_path_factory.mktemp("dcp-verify")
    _spawn(_save_worker, out)
    assert sorted(p.name for p in (out / "ckpt").iterdir()) == sorted([*FILES, "guard.json"])
    return out


def _flip(path: Path, where: float) -> None:
    data = bytearray(path.read_bytes())
    data[min(int(len(data) * where), len(data) - 1)] ^= 0x04
    path.write_bytes(bytes(data))


def _live(guard: SpikeGuard) -> dict[str, Any]:
    """Everything a resume may change, copied."""
    engine = guard.engine
    return {
        "model": _flat(engine.model),
        "optimizer": repr(engine.optimizer.state_dict()),
        "scheduler": repr(engine.scheduler.state_dict()),
        "rng": torch.get_rng_state(),
        "step": guard.step_count,
        "ledger": guard.ledger.ranges(),
    }


def _same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return all(torch.equal(a[k], b[k]) if torch.is_tensor(a[k]) else a[k] == b[k] for k in a)


@pytest.fixture
def trained() -> SpikeGuard:
    """A guard mid-run (its own weights, Adam state, ledger): what a failed resume hits."""
    torch.manual_seed(5)
    guard = _guard(_model())
    _train(guard, guard.batches(_loader(0)), 3)
    guard.ledger.add(40, 45, reason="the live run's own")
    return guard


def _damaged(saved: Path, tmp_path: Path, damage: Callable[[Path], None], name: str) -> Path:
    ckpt = Path(shutil.copytree(saved / "ckpt", tmp_path / "ckpt"))
    damage(ckpt / name)
    return ckpt


@pytest.mark.parametrize("where", [0.0, 0.5, 0.999], ids=["first", "middle", "last"])
@pytest.mark.parametrize("name", FILES)
def test_a_flipped_byte_in_any_file_is_refused_before_anything_is_loaded(
    saved: Path, tmp_path: Path, trained: SpikeGuard, name: str, where: float
) -> None:
    ckpt = _damaged(saved, tmp_path, lambda p: _flip(p, where), name)
    before = _live(trained)
    with pytest.raises(CheckpointError) as caught:
        trained.resume(ckpt)
    assert f"{ckpt / name}: checksum mismatch" in str(caught.value)
    assert "resume from an older checkpoint" in str(caught.value)
    assert _same(_live(trained), before)


@pytest.mark.parametrize("damage", ["missing", "truncated"])
@pytest.mark.parametrize("name", FILES)
def test_a_missing_or_truncated_file_is_refused(
    saved: Path, tmp_path: Path, trained: SpikeGuard, name: str, damage: str
) -> None:
    def harm(path: Path) -> None:
        if damage == "missing":
            path.unlink()
        else:
            path.write_bytes(path.read_bytes()[:-1])

    ckpt = _damaged(saved, tmp_path, harm, name)
    before = _live(trained)
    expected = "is missing" if damage == "missing" else "bytes, not"
    with pytest.raises(CheckpointError, match=expected) as caught:
        trained.resume(ckpt)
    assert str(ckpt / name) in str(caught.value)
    assert "resume from an older checkpoint" in str(caught.value)
    assert _same(_live(trained), before)


def test_the_manifest_lists_every_file_with_its_digest(saved: Path) -> None:
    files = json.loads((saved / "ckpt" / "guard.json").read_text())["checkpoint"]["files"]
    assert sorted(files) == sorted(FILES)
    for name, entry in files.items():
        assert entry["bytes"] == (saved / "ckpt" / name).stat().st_size
        assert len(entry["sha256"]) == 64


def test_a_read_failing_half_way_leaves_the_live_objects_untouched(
    saved: Path, trained: SpikeGuard, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Verified files, then DCP fails after copying some tensors (an I/O error mid-read):
    # it copied them into staging tensors, never into the live model.
    real, copied = DefaultLoadPlanner.commit_tensor, []

    def commit_then_fail(self: DefaultLoadPlanner, read_item: Any, tensor: Any) -> None:
        real(self, read_item, tensor)
        copied.append(read_item)
        if len(copied) == 3:
            raise OSError("Input/output error")

    monkeypatch.setattr(DefaultLoadPlanner, "commit_tensor", commit_then_fail)
    before = _live(trained)
    with pytest.raises(CheckpointError, match=r"torch\.distributed\.checkpoint failed"):
        trained.resume(saved / "ckpt")
    assert len(copied) == 3
    assert _same(_live(trained), before)


def test_a_fresh_optimizer_stays_fresh_after_a_failed_resume(
    saved: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    guard = _guard(_model())

    def fail(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("read failed")

    monkeypatch.setattr(restore, "dcp_load", fail)
    with pytest.raises(CheckpointError):
        guard.resume(saved / "ckpt")
    assert not guard.engine.optimizer.state  # no zero-filled Adam state left behind


def test_a_failed_save_leaves_no_staging_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    guard = _guard(_model())
    save_distributed(guard.engine, tmp_path / "ckpt").result()

    def full(state: Any, *, checkpoint_id: Path, process_group: Any) -> None:
        (checkpoint_id / "__0_0.distcp").write_bytes(b"x" * 1000)  # written in part
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(dcp_checkpoint, "dcp_save", full)
    with pytest.raises(CheckpointError, match="No space left on device"):
        save_distributed(guard.engine, tmp_path / "ckpt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    monkeypatch.undo()
    load_distributed(guard.engine, tmp_path / "ckpt")  # the previous checkpoint holds


def test_two_ranks_both_refuse_a_damaged_file_and_stay_in_step(saved: Path) -> None:
    for case in TWO_RANK_CASES:
        shutil.copytree(saved / "ckpt", saved / case)
    _flip(saved / "flip-__1_0.distcp" / "__1_0.distcp", 0.5)
    _flip(saved / "flip-rng-rank1.pt" / "rng-rank1.pt", 0.5)
    (saved / "missing-.metadata" / ".metadata").unlink()
    _spawn(_resume_worker, saved)
    for rank in (0, 1):
        outcomes = torch.load(saved / f"outcomes-{rank}.pt", weights_only=True)
        for case in TWO_RANK_CASES[:-1]:
            bad = case.split("-", 1)[1]
            assert outcomes[case]["error"] == "CheckpointError", (rank, outcomes[case])
            assert bad in outcomes[case]["message"], (rank, outcomes[case])
            assert outcomes[case]["unchanged"] and outcomes[case]["step"] == 0
        good = outcomes["good"]
        assert good["error"] is None and good["step"] == STEPS
        assert torch.equal(good["params"], torch.load(saved / f"saved-{rank}.pt"))


@pytest.mark.parametrize("world", [1, 2, 3, 8])
def test_the_ranks_split_the_files_to_verify_by_size(saved: Path, world: int) -> None:
    files = json.loads((saved / "ckpt" / "guard.json").read_text())["checkpoint"]["files"]
    shares = [share(files, rank, world) for rank in range(world)]
    assert sorted(name for part in shares for name in part) == sorted(files)  # each once
    loads = [sum(files[name]["bytes"] for name in part) for part in shares]
    assert max(loads) - min(loads) <= max(entry["bytes"] for entry in files.values())


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # async: on DCP's thread
@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_a_full_disk_at_commit_is_a_checkpoint_error_and_leaves_no_staging(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, async_save: bool
) -> None:
    guard = _guard(_model())
    _train(guard, guard.batches(_loader(0)), 2)
    save_distributed(guard.engine, tmp_path / "ckpt").result()
    _train(guard, guard.batches(_loader(0)), 4)

    def full(staging: Path, body: dict[str, Any]) -> None:
        (staging / "guard.json").write_bytes(b"{")  # the start of it, then no space
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(dcp_checkpoint, "write_header", full)
    with pytest.raises(CheckpointError, match=r"No space left on device.*free space"):
        save_distributed(guard.engine, tmp_path / "ckpt", async_save=async_save).result()
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    assert load_distributed(_guard(_model()).engine, tmp_path / "ckpt")["step"] == 2


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda files: files.pop(".metadata"), "manifest is incomplete"),
        (lambda files: files["scheduler.pt"].pop("sha256"), "manifest is malformed"),
        (lambda files: files.update({"../escape": files["scheduler.pt"]}), "not a file"),
    ],
    ids=["incomplete", "malformed", "outside"],
)
def test_a_bad_manifest_is_refused_even_with_a_valid_checksum(
    saved: Path, tmp_path: Path, trained: SpikeGuard, edit: Any, message: str
) -> None:
    # guard.json re-checksummed after the edit: what a buggy writer would produce.
    ckpt = Path(shutil.copytree(saved / "ckpt", tmp_path / "ckpt"))
    wrapper = json.loads((ckpt / "guard.json").read_text())
    edit(wrapper["checkpoint"]["files"])
    wrapper["sha256"] = sha256(canonical(wrapper["checkpoint"]))
    (ckpt / "guard.json").write_text(json.dumps(wrapper))
    before = _live(trained)
    with pytest.raises(CheckpointError, match=message):
        trained.resume(ckpt)
    assert _same(_live(trained), before)
