"""GPU check for a lent machine (not run in CI): the guard adds no host-device sync.

Run ``python bench/gpu_check.py [--steps 200]``. It trains a small `TinyGPT` on CUDA with
a fused AdamW and `SpikeGuard` (default ``snapshot_every=100``, so snapshots happen) under
``torch.cuda.set_sync_debug_mode("error")``, with a NaN loss at one step: the update must
be skipped on the device through the optimizer's ``found_inf`` (weights stay finite and
AdamW's step count is one short), without the host ever waiting. Then it times bare and
guarded steps in alternating blocks (outside the debug mode). Prints one JSON object.

Exit status: 0 when every check passes, 1 when one fails; 0 with a message when there is
no CUDA device (nothing to check).
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from overhead import Batch, Run, Size, bare_step, make_run
from spikewatch_hooks.guard import SpikeGuard

SIZE = Size(name="gpu-small", vocab=256, context=64, dim=256, layers=4, heads=4, batch=32, pairs=0)
BLOCK = 100  # steps per timed block: one snapshot per guarded block


def make_cuda_run() -> Run:
    """`overhead.make_run` on CUDA, with a fused AdamW (the found_inf path)."""
    run = make_run(SIZE, device="cuda")
    run.optimizer = torch.optim.AdamW(run.model.parameters(), lr=1e-4, fused=True)
    run.scheduler = torch.optim.lr_scheduler.LambdaLR(run.optimizer, lambda step: 1.0)
    return run


def guarded_steps(run: Run, guard: SpikeGuard, steps: int, nan_step: int | None) -> None:
    """``steps`` guarded steps; the loss of step ``nan_step`` is made NaN."""
    stream: Iterator[Batch] = guard.batches(itertools.cycle(run.batches))
    for i in range(steps):
        x, y = next(stream)
        loss = run.model.loss(x, y)
        if i == nan_step:
            loss = loss * float("nan")
        loss.backward()  # type: ignore[no-untyped-call]
        grad_norm = torch.nn.utils.clip_grad_norm_(run.model.parameters(), 1.0)
        guard.step(loss=loss, grad_norm=grad_norm)
        run.optimizer.zero_grad(set_to_none=True)


def raises_on_sync(work: Callable[[], object]) -> str | None:
    """Run ``work`` under the sync debug mode: None, or where a sync happened."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        work()
    except RuntimeError as exc:  # the debug mode raises RuntimeError on a sync
        return f"{exc}\n" + "".join(traceback.format_tb(exc.__traceback__)[-4:])
    finally:
        torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()
    return None


def sync_check(steps: int, nan_step: int) -> dict[str, Any]:
    """The bare loop (control), then the guarded loop, under the sync debug mode."""
    run = make_cuda_run()
    stream = itertools.cycle(run.batches)

    def bare() -> None:
        for _ in range(3):
            bare_step(run, next(stream))

    control = raises_on_sync(bare)
    found_inf_seen: list[bool] = []
    run.optimizer.register_step_pre_hook(
        lambda opt, args, kwargs: found_inf_seen.append(getattr(opt, "found_inf", None) is not None)
    )
    guards: list[SpikeGuard] = []

    def guarded() -> None:
        guards.append(SpikeGuard(model=run.model, optimizer=run.optimizer, scheduler=run.scheduler))
        guarded_steps(run, guards[0], steps, nan_step)

    error = raises_on_sync(guarded) if control is None else None
    first = next(iter(run.model.parameters()))
    adam_steps = run.optimizer.state[first].get("step")
    stats = guards[0].stats if guards else {}
    return {
        "bare_loop_sync_error": control,
        "sync_raised": error is not None,
        "sync_error": error,
        "steps": steps,
        "nan_step": nan_step,
        "found_inf_steps": sum(found_inf_seen),
        "optimizer_steps": len(found_inf_seen),
        "weights_finite": all(bool(torch.isfinite(p).all()) for p in run.model.parameters()),
        "adam_step_count": None if adam_steps is None else int(adam_steps.item()) - 3,
        "snapshots": stats.get("snapshots"),
        "guard_stats": {k: stats.get(k) for k in ("rollbacks", "skipped_steps", "incidents")},
    }


def block_ms(work: Any) -> float:
    """Wall ms per step of a block of ``BLOCK`` steps, the device drained at both ends."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    work()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3 / BLOCK


def timing(rounds: int) -> dict[str, Any]:
    """Bare and guarded blocks on one model, alternating order (AB, BA, ...)."""
    run = make_cuda_run()
    guard = SpikeGuard(model=run.model, optimizer=run.optimizer, scheduler=run.scheduler)
    bare_stream = itertools.cycle(run.batches)

    def bare() -> None:
        for _ in range(BLOCK):
            bare_step(run, next(bare_stream))

    def guarded() -> None:
        guarded_steps(run, guard, BLOCK, None)

    bare()  # warm-up: kernels, allocator, pinned snapshot buffers
    guarded()
    times: dict[str, list[float]] = {"bare": [], "guarded": []}
    for r in range(rounds):
        pair = (("bare", bare), ("guarded", guarded))
        for name, work in pair if r % 2 == 0 else pair[::-1]:
            times[name].append(block_ms(work))
    b, g = statistics.median(times["bare"]), statistics.median(times["guarded"])
    return {
        "bare_ms_per_step": b,
        "guarded_ms_per_step": g,
        "overhead_pct": 100.0 * (g - b) / b,
        "block_ms_per_step": times,
    }


def check(steps: int, rounds: int) -> dict[str, Any]:
    """The whole check, as JSON types; ``ok`` says whether every check passed."""
    sync = sync_check(steps, nan_step=steps // 2 + 7)
    result: dict[str, Any] = {
        "cuda": True,
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        **sync,
        "fused_found_inf_used": sync["found_inf_steps"] == sync["optimizer_steps"] > 0,
    }
    result["ok"] = (
        sync["bare_loop_sync_error"] is None
        and not sync["sync_raised"]
        and sync["weights_finite"]
        and result["fused_found_inf_used"]
        # the 3 control steps are not counted; the NaN step must not count either
        and sync["adam_step_count"] == sync["optimizer_steps"] - 1
    )
    result |= timing(rounds)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    """Run the check on CUDA, or say why there is nothing to run."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--steps", type=int, default=200, help="guarded steps under the check")
    parser.add_argument("--rounds", type=int, default=4, help="timed blocks of each loop")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        message = "no CUDA device: nothing to check here; run this on a GPU machine"
        print(json.dumps({"cuda": False, "ok": None, "message": message}))
        return 0
    result = check(args.steps, args.rounds)
    print(json.dumps(result, indent=2))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
