"""Service mode: the trainer's own monitor decides on every step; a real `spikewatch serve`
stores the records and decisions and sends operators' commands back."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

from service_process import TOKEN, ServiceProcess
from spikewatch_hooks.guard import SpikeGuard


def _wait(condition: Callable[[], bool], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError("condition not met in time")


def _data(n: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(8, 1, generator=g)
    out = []
    for _ in range(n):
        x = torch.randn(32, 8, generator=g)
        out.append((x, x @ w + 0.05 * torch.randn(32, 1, generator=g)))
    return out


def _train(
    guard: SpikeGuard,
    model: nn.Module,
    opt: torch.optim.Optimizer,
    data: list[tuple[torch.Tensor, torch.Tensor]],
    *,
    poison: Callable[[int, torch.Tensor], torch.Tensor] = lambda step, loss: loss,
    between: Callable[[int], None] = lambda step: None,
) -> list[str]:
    actions = []
    for x, y in guard.batches(data):
        loss = poison(guard.engine.position, (model(x) - y).pow(2).mean())  # by data position
        loss.backward()  # type: ignore[no-untyped-call]
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        decision = guard.step(loss=loss, grad_norm=grad_norm)
        opt.zero_grad(set_to_none=True)
        if decision is not None and decision.action != "watch":
            actions.append(f"{decision.step}:{decision.action}")
        between(guard.step_count)
    return actions


def _mlp() -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 1))
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


@pytest.mark.parametrize("bad", ["nan_loss", "huge_grad"])
def test_a_bad_step_is_skipped_on_the_step_itself_in_service_mode(tmp_path: Path, bad: str) -> None:
    model, opt = _mlp()

    def poison(position: int, loss: torch.Tensor) -> torch.Tensor:
        if position != 200:
            return loss
        return loss * math.nan if bad == "nan_loss" else loss * 1e5

    with ServiceProcess(tmp_path) as svc:
        guard = SpikeGuard(model, opt, run_id="mlp", monitor_url=svc.url, token=TOKEN)
        actions = _train(guard, model, opt, _data(400), poison=poison)
        guard.close(timeout=60)  # a loaded CI host can be slow to take the last batch
        _, run = svc.get("/v1/runs/mlp")
        _, incidents = svc.get("/v1/runs/mlp/incidents")
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
    assert actions == ["200:skip_step"], actions  # exactly the bad step, no halt
    assert guard.stats["skipped_steps"] == 1 and not guard.halted
    assert (run["decides"], run["records"], run["skipped_steps"]) == ("trainer", 400, 1)
    assert run["state"] == "finished" and run["rollbacks"] == 0
    # One incident per metric that saw it (a NaN loss makes the grad norm NaN too).
    assert {i["detected_step"] for i in incidents["incidents"] if i["action"] == "skip_step"} == {
        200
    }


def _level_shift(start: int) -> Callable[[int, torch.Tensor], torch.Tensor]:
    def poison(position: int, loss: torch.Tensor) -> torch.Tensor:
        return loss + 5.0 if start <= position < start + 60 else loss

    return poison


def test_the_guards_own_margin_wins_and_the_service_sees_the_rollback(tmp_path: Path) -> None:
    model, opt = _mlp()
    config = "[monitor.policy]\nmargin = 100\nskip_ahead = 70\n"
    with ServiceProcess(tmp_path, config=config) as svc:
        guard = SpikeGuard(
            model, opt, run_id="m", monitor_url=svc.url, token=TOKEN, margin=20,
            snapshot_every=10, keep_snapshots=10,
        )  # fmt: skip
        _train(guard, model, opt, _data(500), poison=_level_shift(250))
        guard.close(timeout=60)  # a loaded CI host can be slow to take the last batch
        _, run = svc.get("/v1/runs/m")
        _, metrics = svc.request("GET", "/metrics", token=None)
    assert guard.stats["rollbacks"] == 1
    [(start, _)] = guard.stats["skip_ledger"]
    assert 220 <= start <= 250  # margin 20 before the onset at 250, not the service's 100
    assert run["config"]["policy"]["margin"] == 20  # the effective config, stored with the run
    assert run["config"]["policy"]["skip_ahead"] == 70  # the rest from the service
    assert run["rollbacks"] == 1 and run["last_step"] == guard.step_count - 1
    assert run["skipped_batches"] == guard.stats["skipped_batches"]
    assert 'spikewatch_rollbacks_total{run="m"} 1.0' in metrics


def test_without_its_own_settings_the_guard_takes_the_services(tmp_path: Path) -> None:
    model, opt = _mlp()
    config = "[monitor.policy]\nmargin = 30\n"
    with ServiceProcess(tmp_path, config=config) as svc:
        guard = SpikeGuard(model, opt, run_id="s", monitor_url=svc.url, token=TOKEN)
        assert guard.config.policy.margin == 30
        guard.close(timeout=60)  # a loaded CI host can be slow to take the last batch


def test_an_unreachable_service_leaves_the_local_settings(caplog: pytest.LogCaptureFixture) -> None:
    model, opt = _mlp()
    guard = SpikeGuard(model, opt, run_id="u", monitor_url="http://127.0.0.1:9", token="t")
    assert guard.config.policy.margin == 100
    assert "did not answer with run 'u''s settings; using the local ones" in caplog.text
    guard.close(timeout=0.1)


def _proposal(svc: ServiceProcess, run: str) -> dict[str, object] | None:
    _, view = svc.get(f"/v1/runs/{run}")
    if not isinstance(view, dict):
        return None
    return next((c for c in view.get("commands", []) if c["status"] == "proposed"), None)


@pytest.mark.parametrize("answer", ["approve", "veto"])
def test_manual_approval_waits_for_the_operator(tmp_path: Path, answer: str) -> None:
    model, opt = _mlp()
    config = '[service]\napproval = "manual"\n'
    with ServiceProcess(tmp_path, config=config) as svc:
        guard = SpikeGuard(
            model, opt, run_id="a", monitor_url=svc.url, token=TOKEN, margin=20,
            snapshot_every=10, keep_snapshots=10,
        )  # fmt: skip
        answered: list[int] = []

        def operator(step: int) -> None:
            if answered or guard.engine.approvals.open is None:
                return
            # The proposal reaches the service asynchronously: on a loaded host the run
            # could end before it arrives, so the operator waits for it as a person would.
            _wait(lambda: _proposal(svc, "a") is not None)
            proposal = _proposal(svc, "a")
            assert proposal is not None
            assert guard.stats["rollbacks"] == 0  # nothing applied while it waits
            body = {"action": answer, "command": proposal["id"]}
            assert svc.post("/v1/runs/a/commands", body)[0] == 200
            answered.append(step)
            # The answer reaches the trainer with an ingest answer (it polls while a
            # proposal waits) and is applied at the next step boundary.
            _wait(lambda: guard.transport.pending_commands() > 0)  # type: ignore[attr-defined]

        _train(guard, model, opt, _data(500), poison=_level_shift(250), between=operator)
        guard.close(timeout=60)  # a loaded CI host can be slow to take the last batch
        _, view = svc.get("/v1/runs/a")
    assert answered, "no rollback was proposed"
    statuses = [c["status"] for c in view["commands"]]
    if answer == "approve":
        assert guard.stats["rollbacks"] == 1 and statuses == ["applied"]
        [(start, _)] = guard.stats["skip_ledger"]
        assert 220 <= start <= 250  # the pinned pre-onset snapshot was still there
    else:
        assert guard.stats["rollbacks"] == 0 and statuses == ["vetoed"]
        assert guard.engine.ring.pinned is None  # the trainer let go of the snapshot


def test_an_operator_rollback_beyond_the_ring_is_refused(tmp_path: Path) -> None:
    model, opt = _mlp()
    with ServiceProcess(tmp_path) as svc:
        guard = SpikeGuard(model, opt, run_id="o", monitor_url=svc.url, token=TOKEN)
        _train(guard, model, opt, _data(600))
        assert guard.transport.client.flush(timeout=20)  # type: ignore[attr-defined]
        body = {"action": "rollback", "rollback_before_step": 50, "reason": "bad shard"}
        status, answer = svc.post("/v1/runs/o/commands", body)
        guard.close(timeout=60)  # a loaded CI host can be slow to take the last batch
    assert status == 409
    assert "no snapshot at or before step 50" in answer["error"]
    assert guard.stats["rollbacks"] == 0


def test_a_service_killed_mid_run_changes_nothing_in_training(tmp_path: Path) -> None:
    data = _data(600)
    model, opt = _mlp()
    embedded = SpikeGuard(model, opt, run_id="k")
    _train(embedded, model, opt, data, poison=_level_shift(300))
    embedded.close()  # the last steps reach its monitor too
    reference = [p.detach().clone() for p in model.parameters()]

    model, opt = _mlp()
    with ServiceProcess(tmp_path) as svc:
        guard = SpikeGuard(model, opt, run_id="k", monitor_url=svc.url, token=TOKEN)
        client = guard.transport.client  # type: ignore[attr-defined]

        def outage(step: int) -> None:
            position = guard.engine.position  # steps rewind with a rollback; data does not
            if position == 150:
                svc.kill()
            elif position == 450:
                _wait(lambda: client.failures > 0)  # the sender noticed; training went on
                svc.start()

        _train(guard, model, opt, data, poison=_level_shift(300), between=outage)
        guard.close(timeout=30)
        _, run = svc.get("/v1/runs/k")
    # The same decisions, step for step, as the embedded monitor: bit-identical weights.
    assert guard.stats["rollbacks"] == embedded.stats["rollbacks"] >= 1
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), reference, strict=True))
    # Every record once: the steps of both branches around the rollback, no duplicates.
    assert run["records"] == embedded.engine.transport.monitor.records  # type: ignore[attr-defined]
    assert run["rollbacks"] == guard.stats["rollbacks"] and run["state"] == "finished"
