"""Every optimizer, scheduler and the GradScaler of one guard, stepped as one.

A guard may drive several optimizers (Muon + AdamW, a GAN's generator and
discriminator) and schedulers: they are stepped, skipped, rolled back and checkpointed
together; an LR cut applies to all of them and the LR reported is the first
optimizer's first group.

With an fp16 ``GradScaler`` the loop is::

    scaler.scale(loss).backward()
    scaler.unscale_(opt)                 # for each optimizer; the guard does it if not
    grad_norm = clip_grad_norm_(model.parameters(), 1.0)
    guard.step(loss=loss, grad_norm=grad_norm)  # scaler.step(opt) for each, scaler.update()

A step whose unscaled gradients overflowed with a finite loss is the scaler's own
business (it skips the update and halves the scale): it is counted in
``stats["scaler_backoffs"]`` and its grad norm is withheld from the monitor, so the
start-up back-off of a large ``init_scale`` is no incident. It becomes one when the
scale collapses: below ``scaler_floor`` (1.0: the gradients overflow fp16 even
unscaled) or after ``scaler_max_overflows`` (50) overflowing steps in a row; from then
on the monitor sees the non-finite grad norms and its policy escalates as usual.
Reading the scaler's overflow flag is one host sync per step, which ``scaler.step``
itself makes anyway for an unfused optimizer.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from spikewatch_hooks.core.values import Number


class Updates:
    """The objects that update the model: optimizers, schedulers, an optional scaler.

    Example:
        >>> model = torch.nn.Linear(2, 1)
        >>> o1 = torch.optim.SGD([model.weight], lr=0.1)
        >>> o2 = torch.optim.AdamW([model.bias], lr=0.01)
        >>> updates = Updates([o1, o2], [])
        >>> updates.scale_lr(0.5)
        >>> updates.lr(), o2.param_groups[0]["lr"]
        (0.05, 0.005)
    """

    def __init__(
        self,
        optimizers: list[torch.optim.Optimizer],
        schedulers: list[Any],
        scaler: Any = None,
        *,
        scaler_floor: float = 1.0,
        scaler_max_overflows: int = 50,
    ) -> None:
        self.optimizers, self.schedulers = optimizers, schedulers
        enabled = scaler is not None and bool(getattr(scaler, "is_enabled", lambda: True)())
        self.scaler = scaler if enabled else None
        self.scaler_floor, self.scaler_max_overflows = scaler_floor, scaler_max_overflows
        #: Overflowing steps in a row (the scaler's back-off streak).
        self.overflows_in_row = 0
        self.collapsed = False

    @property
    def extras(self) -> Mapping[str, Any]:
        """Stateful objects besides optimizers and schedulers, by name (for snapshots)."""
        return {} if self.scaler is None else {"scaler": self.scaler}

    def lr(self) -> float | None:
        """The first optimizer's first group's LR (what records report)."""
        lr = self.optimizers[0].param_groups[0].get("lr")
        return float(lr) if isinstance(lr, (int, float)) else None

    def scale_lr(self, factor: float) -> None:
        """Multiply every group's LR, and every scheduler's base LRs, by ``factor``."""
        if factor == 1.0:
            return
        for opt in self.optimizers:
            for group in opt.param_groups:
                group["lr"] = group["lr"] * factor
        for scheduler in self.schedulers:
            base = getattr(scheduler, "base_lrs", None)
            if isinstance(base, list):
                scheduler.base_lrs = [b * factor for b in base]

    # -- the scaler ---------------------------------------------------------------------
    def scaler_backoff(self, loss: Number) -> bool:
        """Whether this step is a scaler back-off: gradients overflowed, the loss is
        finite and the scale has not collapsed. Unscales every optimizer not unscaled yet.
        """
        if self.scaler is None:
            return False
        found = 0.0
        for opt in self.optimizers:
            state = self.scaler._per_optimizer_states[id(opt)]
            if not state["found_inf_per_device"]:
                self.scaler.unscale_(opt)
            found += sum(float(v.item()) for v in state["found_inf_per_device"].values())
        if not found:
            self.overflows_in_row = 0
            return False
        self.overflows_in_row += 1
        value = float(loss.detach()) if isinstance(loss, torch.Tensor) else float(loss)
        return math.isfinite(value) and not self.collapsed

    def _check_collapse(self) -> None:
        assert self.scaler is not None
        scale = float(self.scaler.get_scale())
        self.collapsed = scale < self.scaler_floor or (
            self.overflows_in_row >= self.scaler_max_overflows
        )

    # -- stepping -----------------------------------------------------------------------
    def step(self, *, skip: bool) -> None:
        """Step every optimizer (through the scaler) unless ``skip``, then the scaler's
        ``update`` and every scheduler (the schedule keeps its pace through skips)."""
        for opt in self.optimizers:
            if skip:
                continue
            if self.scaler is not None:
                self.scaler.step(opt)
            else:
                opt.step()
        if self.scaler is not None:
            self.settle_scaler()
            self._check_collapse()
        for scheduler in self.schedulers:
            scheduler.step()

    def settle_scaler(self) -> None:
        """End the scaler's iteration (``update``) if any optimizer was unscaled in it,
        so the next ``unscale_`` is allowed; a rollback restores the scale right after."""
        if self.scaler is None:
            return
        states = self.scaler._per_optimizer_states.values()
        if any(state["found_inf_per_device"] for state in states):
            self.scaler.update()

    def device_skip(self, loss: Number, grad_norm: Number | None, *, global_only: bool) -> None:
        """On a GPU, set ``found_inf`` on every fused optimizer when the step is not
        finite, so it skips on the device without a host sync (the GradScaler path).

        A fused Adam/AdamW/SGD skips its update when ``found_inf`` is 1. With a scaler,
        ``scaler.step`` sets it. ``global_only``: under lockstep only the grad norm is the
        same on every rank.
        """
        if self.scaler is not None or not (isinstance(loss, torch.Tensor) and loss.is_cuda):
            return
        fused = [o for o in self.optimizers if getattr(o, "_step_supports_amp_scaling", False)]
        checked = [grad_norm] if global_only else [loss, grad_norm]
        values = [x.detach().float().reshape(()) for x in checked if isinstance(x, torch.Tensor)]
        if not fused or not values:
            return
        bad = (~torch.isfinite(torch.stack(values)).all()).float().reshape(())
        for opt in fused:
            opt.found_inf = bad  # type: ignore[attr-defined]
            opt.grad_scale = None  # type: ignore[attr-defined]

    def clear_found_inf(self) -> None:
        """Drop the on-device skip flags once the optimizers stepped (or were skipped)."""
        if self.scaler is not None:
            return
        for opt in self.optimizers:
            if getattr(opt, "found_inf", None) is not None:
                opt.found_inf = None  # type: ignore[attr-defined]


def as_list(value: Any) -> list[Any]:
    """None -> [], one object -> [it], a list or tuple -> a list of its items.

    Example:
        >>> as_list(None), as_list(3), as_list((1, 2))
        ([], [3], [1, 2])
    """
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return list(value)
    return [value]
