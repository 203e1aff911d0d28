"""GPU check for a lent machine (not run in CI): several fused optimizers and a GradScaler.

Run ``python bench/gpu_multi_check.py``. Two checks on CUDA, one JSON object printed:

- ``two_fused``: a model whose halves have their own fused AdamW, guarded together;
  a NaN loss at one step must be skipped on the device by *both* (each one's ``found_inf``
  set), under ``torch.cuda.set_sync_debug_mode("error")``: weights finite, each
  optimizer's step count one short, no host sync.
- ``scaler``: autocast fp16 with ``GradScaler("cuda", init_scale=2**30)`` and a fused
  AdamW through ``SpikeGuard(scaler=...)``: 0 rollbacks and no halt through the start-up
  back-off (``scaler_backoffs`` > 0), a NaN loss later still skipped.

Exit status: 0 when every check passes, 1 when one fails; 0 with a message when there is
no CUDA device (nothing to check).
"""

from __future__ import annotations

import json
import sys
import traceback
from typing import Any

import torch

from spikewatch_hooks.guard import SpikeGuard

STEPS, NAN_AT = 120, 90


def _model() -> torch.nn.Sequential:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 1)
    ).cuda()


def _batch(i: int) -> torch.Tensor:
    g = torch.Generator(device="cuda").manual_seed(i)
    return torch.randn(64, 64, device="cuda", generator=g)


def two_fused() -> dict[str, Any]:
    """Both fused optimizers skip the NaN step on the device, without a sync."""
    model = _model()
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-3, fused=True) for m in (model[0], model[2])]
    guard = SpikeGuard(model, opts, snapshot_every=50)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    error = None
    try:
        for i in range(STEPS):
            loss = model(_batch(i)).pow(2).mean() * (float("nan") if i == NAN_AT else 1.0)
            loss.backward()
            guard.step(loss=loss, grad_norm=torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0))
            for opt in opts:
                opt.zero_grad(set_to_none=True)
    except RuntimeError as exc:
        error = str(exc).splitlines()[0]
    finally:
        torch.cuda.set_sync_debug_mode(0)
    steps = [int(next(iter(o.state.values()))["step"].item()) for o in opts]
    finite = all(bool(torch.isfinite(p).all()) for p in model.parameters())
    ok = error is None and finite and steps == [STEPS - 1, STEPS - 1]
    return {"ok": ok, "sync_error": error, "adam_steps": steps, "finite": finite}


def scaler() -> dict[str, Any]:
    """Start-up back-off is no incident; a NaN loss later still is."""
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    grad_scaler = torch.amp.GradScaler("cuda", init_scale=2.0**30)
    guard = SpikeGuard(model, opt, scaler=grad_scaler, snapshot_every=50)
    for i in range(STEPS):
        with torch.autocast("cuda", dtype=torch.float16):
            loss = model(_batch(i)).float().pow(2).mean()
        loss = loss * (float("nan") if i == NAN_AT else 1.0)
        grad_scaler.scale(loss).backward()
        grad_scaler.unscale_(opt)
        guard.step(loss=loss, grad_norm=torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0))
        opt.zero_grad(set_to_none=True)
    stats = guard.stats
    ok = (stats["rollbacks"] == 0 and not stats["halted"] and stats["scaler_backoffs"] > 0
          and stats["skipped_steps"] == 1)  # fmt: skip
    keys = ("rollbacks", "halted", "scaler_backoffs", "skipped_steps")
    return {"ok": ok, **{k: stats[k] for k in keys}, "scale": grad_scaler.get_scale()}


def main() -> int:
    """Run both checks; print one JSON object."""
    if not torch.cuda.is_available():
        print(
            json.dumps({"cuda": False, "ok": None, "message": "no CUDA device: nothing to check"})
        )
        return 0
    result: dict[str, Any] = {"cuda": True, "torch": torch.__version__}
    for name, check in (("two_fused", two_fused), ("scaler", scaler)):
        try:
            result[name] = check()
        except Exception:  # a failing check is reported, the other still runs
            result[name] = {"ok": False, "error": traceback.format_exc(limit=3)}
    result["ok"] = all(result[n]["ok"] for n in ("two_fused", "scaler"))
    print(json.dumps(result, indent=2))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
