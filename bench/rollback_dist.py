"""Snapshot ring layouts on 2 gloo ranks: DDP split vs full copies, FSDP2 shards.

Run ``python bench/rollback_dist.py [--json] [--quick]``. A `TinyGPT` with AdamW state
populated is snapshotted and restored by the `SnapshotRing` under four layouts:

- ``1 process``: no process group, full copies (the single-process baseline);
- ``DDP full``: 2 ranks, DDP, ``split=False``: every rank a full copy per slot;
- ``DDP split``: 2 ranks, DDP, the default: every rank 1/2 of each slot, and a restore
  gathers the other half (one ``all_gather_into_tensor`` per dtype, over loopback);
- ``FSDP2``: 2 ranks, ``fully_shard``: every rank its own shards, no collective.

Per layout: host bytes per rank per slot, take and restore times (medians, wall ms; a
restore includes the collective), restore bandwidth (bytes written into live tensors per
second) and its ratio to a plain ``copy_`` of the same number of bytes between two
preallocated CPU buffers, measured in the same process right before (1.0 = as fast as a
bare memory copy). One torch thread per rank: the ranks share a 2-core host.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel

from spikewatch_hooks.demo.model import TinyGPT
from spikewatch_hooks.state.snapshots.ring import SnapshotRing

SIZES = {
    "quick": {"vocab": 256, "dim": 64, "layers": 2},
    "10M": {"vocab": 8192, "dim": 256, "layers": 8},
}
CONTEXT = 16


def _median_s(work: Callable[[], object], rounds: int) -> float:
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _copy_seconds(nbytes: int, rounds: int) -> float:
    """A plain ``copy_`` of ``nbytes`` between preallocated CPU buffers: the yardstick."""
    src = torch.ones(nbytes // 4, dtype=torch.float32)
    dst = torch.empty_like(src)
    return _median_s(lambda: dst.copy_(src), rounds)


def _model(layout: str, size: dict[str, int]) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    net = TinyGPT(size["vocab"], context=CONTEXT, dim=size["dim"], layers=size["layers"], heads=4)
    model: torch.nn.Module = net
    if layout.startswith("DDP"):
        model = DistributedDataParallel(net)
    elif layout == "FSDP2":
        for block in net.blocks:
            fully_shard(block)
        fully_shard(net)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    tokens = torch.randint(0, size["vocab"], (2, CONTEXT))
    net.loss(tokens, tokens).backward()  # type: ignore[no-untyped-call]
    opt.step()
    opt.zero_grad(set_to_none=True)
    return model, opt


def measure(layout: str, size: dict[str, int], rounds: int) -> dict[str, Any]:
    """Take and restore times of one layout (every rank runs it together)."""
    model, opt = _model(layout, size)
    ring = SnapshotRing(model, opt, keep=1, split=None if layout == "DDP split" else False)
    ring.take(0, 0)  # allocates the slot
    take = _median_s(lambda: ring.take(0, 0), rounds)
    snap = ring.newest_at_or_before(0)
    written = sum(e.nbytes for e in snap.layout.entries) if snap is not None else 0
    copy = _copy_seconds(written, rounds)
    if dist.is_initialized():
        dist.barrier()
    restore = _median_s(lambda: ring.restore(snap), rounds)
    return {
        "layout": layout,
        "split": ring.split,
        "bytes_per_rank": ring.nbytes,
        "restored_bytes": written,
        "take_ms": take * 1e3,
        "restore_ms": restore * 1e3,
        "restore_gb_per_s": written / restore / 1e9,
        "copy_gb_per_s": written / copy / 1e9,
        "vs_copy": copy / restore,
    }


def _worker(rank: int, out: str, size_name: str, rounds: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{out}/store", rank=rank, world_size=2)
    rows = [
        measure(layout, SIZES[size_name], rounds) for layout in ("DDP full", "DDP split", "FSDP2")
    ]
    Path(out, f"rank{rank}.json").write_text(json.dumps(rows))
    dist.barrier()
    os._exit(0)  # gloo's threads sometimes abort an interpreter teardown


def benchmark(size_name: str, rounds: int) -> dict[str, Any]:
    """The 1-process row here, the 2-rank rows in spawned workers (rank 0's numbers; the
    restore time is the slower rank's)."""
    torch.set_num_threads(1)
    rows = [measure("1 process", SIZES[size_name], rounds)]
    with tempfile.TemporaryDirectory(prefix="spikewatch-ring-") as tmp:
        mp.spawn(_worker, args=(tmp, size_name, rounds), nprocs=2, join=True)  # type: ignore[attr-defined,no-untyped-call]
        ranks = [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in (0, 1)]
    for row0, row1 in zip(*ranks, strict=True):
        row0["restore_ms_slower_rank"] = max(row0["restore_ms"], row1["restore_ms"])
        rows.append(row0)
    base = rows[0]["bytes_per_rank"]
    for row in rows:
        row["bytes_vs_1_process"] = row["bytes_per_rank"] / base
    return {"size": size_name, "torch": torch.__version__, "rounds": rounds, "rows": rows}


def report_text(result: dict[str, Any]) -> str:
    """One row per layout."""
    lines = [
        f"TinyGPT {result['size']}, torch {result['torch']}, 1 thread per rank, medians of "
        f"{result['rounds']}; vs copy_ = restore bandwidth / plain copy_ bandwidth (same bytes)",
        f"{'layout':<11}{'MB/rank':>9}{'x 1 proc':>9}{'take ms':>9}{'restore ms':>11}"
        f"{'GB/s':>7}{'copy_ GB/s':>11}{'vs copy_':>9}",
    ]
    for r in result["rows"]:
        lines.append(
            f"{r['layout']:<11}{r['bytes_per_rank'] / 1e6:>9.2f}{r['bytes_vs_1_process']:>9.2f}"
            f"{r['take_ms']:>9.1f}{r['restore_ms']:>11.1f}{r['restore_gb_per_s']:>7.2f}"
            f"{r['copy_gb_per_s']:>11.2f}{r['vs_copy']:>9.2f}"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the command line, run the benchmark, print a table or JSON."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--quick", action="store_true", help="a tiny model, a few seconds")
    parser.add_argument("--rounds", type=int, default=5, help="repeats per measurement")
    args = parser.parse_args(argv)
    result = benchmark("quick" if args.quick else "10M", args.rounds)
    print(json.dumps(result, indent=2) if args.json else report_text(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
