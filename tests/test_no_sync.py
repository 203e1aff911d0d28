"""The guard never reads a step's loss or grad norm on the host (no host-device sync).

On a GPU, ``.item()``, ``float()``, ``.cpu()``, ``.tolist()``, ``.numpy()`` (and ``bool()``,
formatting, ``.to("cpu")``) on a CUDA tensor wait for the whole stream to drain. The step's
tensors are wrapped in a recording `torch.Tensor` subclass, which every tensor derived from
them inherits, so such a read anywhere in the guard is seen even on the CPU. Copying them
into the guard's own buffer (``torch.stack``, ``copy_``) is allowed: that buffer is read
only once the copy has landed.

Also: the overhead, rollback and GPU benchmarks run in their quick/no-CUDA forms.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from spikewatch_hooks.demo.model import TinyGPT
from spikewatch_hooks.guard import SpikeGuard

BENCH = Path(__file__).resolve().parents[1] / "bench"
HOST_READS = frozenset(
    {"item", "cpu", "tolist", "numpy", "__float__", "__int__", "__bool__", "__index__"}
    | {"__format__", "__repr__"}
)


def _moves_to_a_device(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """``Tensor.to`` with a device (or a tensor whose device to take), not a dtype alone."""
    targets = [*args, kwargs.get("device"), kwargs.get("other")]
    return any(isinstance(t, str | torch.device | torch.Tensor) for t in targets)


def recording_class() -> tuple[type[torch.Tensor], list[str], list[str]]:
    """A fresh recording Tensor subclass, its host reads and all its torch calls."""
    reads: list[str] = []
    calls: list[str] = []

    class StepTensor(torch.Tensor):
        @classmethod
        def __torch_function__(
            cls, func: Any, types: Any, args: Any = (), kwargs: Any = None
        ) -> Any:
            kwargs = kwargs or {}
            name = getattr(func, "__name__", repr(func))
            calls.append(name)
            if name in HOST_READS or (name == "to" and _moves_to_a_device(args[1:], kwargs)):
                reads.append(name)
            return super().__torch_function__(func, types, args, kwargs)  # type: ignore[no-untyped-call]

    return StepTensor, reads, calls


@pytest.fixture
def one_thread() -> Any:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # two OpenMP threads on a busy 2-core host run far slower
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize(
    "read",
    [
        float,
        lambda t: t.item(),
        lambda t: t.tolist(),
        lambda t: t.cpu(),
        lambda t: t.numpy(),
        lambda t: t.to("cpu"),
        lambda t: bool(t > 0),
        lambda t: f"{t}",
        lambda t: t.detach().reshape(()).item(),  # derived tensors are recorded too
    ],
    ids=["float", "item", "tolist", "cpu", "numpy", "to-cpu", "bool", "format", "derived"],
)
def test_recorder_sees_every_host_read(read: Callable[[torch.Tensor], object]) -> None:
    cls, reads, _ = recording_class()
    read(torch.tensor(2.5).as_subclass(cls))
    assert reads


def test_recorder_allows_copies_into_a_buffer() -> None:
    cls, reads, calls = recording_class()
    t = torch.tensor(2.5, requires_grad=True).as_subclass(cls)
    buffer = torch.empty(2)
    buffer.copy_(torch.stack([t.detach().reshape(()).to(torch.float32)] * 2))
    assert reads == []
    assert {"detach", "reshape", "to", "stack", "copy_"} <= set(calls)
    assert buffer.tolist() == [2.5, 2.5]  # the buffer is not a step tensor


def test_guard_never_reads_step_tensors_on_the_host(one_thread: None) -> None:
    cls, reads, calls = recording_class()
    torch.manual_seed(0)
    model = TinyGPT(16, context=8, dim=16, layers=1, heads=2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    guard = SpikeGuard(model=model, optimizer=opt, scheduler=sched, snapshot_every=10)
    g = torch.Generator().manual_seed(1)
    data = [torch.randint(0, 16, (4, 8), generator=g) for _ in range(50)]
    decisions = []
    for x in guard.batches(data):
        loss = model.loss(x, x).as_subclass(cls)
        if guard.step_count == 30:
            loss = loss * float("nan")  # a poisoned batch: the guard must still see it
        loss.backward()  # type: ignore[no-untyped-call]
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0).as_subclass(cls)
        decision = guard.step(loss=loss, grad_norm=grad_norm)
        opt.zero_grad(set_to_none=True)
        if decision is not None:
            decisions.append((decision.step, decision.action))
    assert reads == [], f"host reads of the step's tensors: {sorted(set(reads))}"
    assert calls.count("stack") >= 50  # the recorder did watch the guard's handling
    assert (30, "skip_step") in decisions
    assert guard.stats["skipped_steps"] == 1
    assert guard.stats["snapshots"] == [20, 30, 40, 50]
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())


def _run_bench(script: str, *args: str) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, str(BENCH / script), *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def test_overhead_bench_quick_json() -> None:
    result = _run_bench("overhead.py", "--json", "--quick")
    assert math.isfinite(result["overhead_pct"])
    assert set(result["sizes"]) == {"tiny", "tiny-accounted", "tiny (service)"}
    for row in result["sizes"].values():
        for key in ("params", "bare_step_ms", "guarded_step_ms", "added_us", "overhead_pct"):
            assert math.isfinite(row[key]), key
        assert row["bare_step_ms"] > 0
    assert result["sizes"]["tiny"]["basis"] == "measured"
    assert result["sizes"]["tiny"]["in_loop"]["snapshot_pairs"] == 2
    assert result["sizes"]["tiny-accounted"]["basis"] == "accounted"
    embedded = [r for r in result["sizes"].values() if r["mode"] == "embedded"]
    assert result["overhead_pct"] == max(r["overhead_pct"] for r in embedded)
    service = result["sizes"]["tiny (service)"]
    assert service["mode"] == "service" and service["basis"] == "measured"
    gap = service["overhead_pct"] - result["sizes"]["tiny"]["overhead_pct"]
    assert result["service_added_pct"] == gap
    assert set(result["microbench"]["pieces_median_us"]) == {"push", "ready", "monitor", "rest"}


def test_rollback_bench_quick_json() -> None:
    result = _run_bench("rollback.py", "--json", "--quick")
    assert set(result["sizes"]) == {"tiny", "small"}
    assert result["speedup_vs_torch_load"] == result["sizes"]["small"]["speedup_vs_torch_load"]
    assert result["threads"] == 1
    for row in result["sizes"].values():
        assert row["ring_restore_ms"] > 0
        assert row["torch_load_ms"] > 0


def test_gpu_check_exits_cleanly_without_cuda() -> None:
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: run bench/gpu_check.py by hand")
    result = _run_bench("gpu_check.py")
    assert result["cuda"] is False
    assert "no CUDA device" in result["message"]
