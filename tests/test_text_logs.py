"""Plain-text training logs: the built-in trainer patterns and a user's ``--pattern``.

The files in tests/data/replay are cut in the exact shape each trainer prints (the
print/printf format strings of nanoGPT train.py, llm.c train_gpt2.{py,cu,c} and its
main.log logger, modded-nanogpt, Megatron-LM training_log), surrounding output included.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import pytest

from spikewatch.errors import ReplayInputError
from spikewatch.replay.readers import read_curve

DATA = Path(__file__).parent / "data" / "replay"
NAN, INF = math.nan, math.inf


def same(values: Sequence[float | None] | None) -> list[str] | None:
    return None if values is None else [repr(v) for v in values]


Values = list[float] | None
Case = tuple[str, list[int], list[float], Values, Values, dict[str, int]]
CASES: dict[str, Case] = {
    "nanogpt_train.log": ("text:nanogpt", [0, 10, 20, 30, 40],
                          [4.2654, 3.2443, 2.7956, NAN, 2.5172], None, None, {"no match": 11}),
    "llmc_train_gpt2py.log": ("text:llm.c", [1, 2, 3], [11.00939, 10.938522, 10.812049],
                              [15.4006, 14.9867, 13.2107], [8.39e-07, 1.68e-06, 2.52e-06],
                              {"no match": 5}),
    "llmc_train_gpt2cu.log": ("text:llm.c", [1, 2, 3], [11.010519, 10.375446, NAN],
                              [15.3875, 13.0113, INF], [6e-06, 1.2e-05, 1.8e-05], {"no match": 7}),
    "llmc_train_gpt2c.log": ("text:llm.c", [0, 1, 2], [4.677779, 5.191576, 4.438685],
                             None, None, {"no match": 11}),
    "llmc_main.log": ("text:llm.c", [0, 1, 2], [10.9914, 10.9335, 10.812],
                      [15.43, 14.99, 13.21], [0.0, 2e-06, 4e-06], {"no loss": 1}),
    "modded_nanogpt.txt": ("text:modded-nanogpt", [1, 2, 3], [10.8258, 10.1429, 9.4672],
                           None, None, {"no loss": 1, "no match": 11}),
    # Megatron leaves the loss out of an interval whose iterations were all skipped.
    "megatron_pretrain_gpt.log": ("text:megatron", [20, 30], [10.5125, 9.873456],
                                  [12.345, 8.21], [1.5e-06, 3e-06],
                                  {"no loss": 1, "no match": 11}),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(CASES))
def test_builtin_log_patterns(name: str) -> None:
    fmt, steps, loss, grad_norm, lr, dropped = CASES[name]
    for format_flag in (None, "text"):  # detected, or asked for
        curve = read_curve(DATA / name, format=format_flag)
        assert (curve.format, curve.steps) == (fmt, steps)
        assert same(curve.loss) == same(loss)
        assert same(curve.grad_norm) == same(grad_norm)
        assert same(curve.lr) == same(lr)
        assert curve.dropped == dropped


def test_user_pattern(tmp_path: Path) -> None:
    path = tmp_path / "train.log"
    path.write_text(
        "2024-05-01 12:00:00 INFO starting\n"
        "2024-05-01 12:00:01 INFO it=10 loss=2.50 gn=1.1\n"
        "2024-05-01 12:00:02 INFO it=20 loss=nan\n"
        "2024-05-01 12:00:03 INFO eval it=20 acc=0.5\n"
        "2024-05-01 12:00:04 INFO it=30 loss=2.30 gn=0.9\n"
    )
    pattern = r"it=(?P<step>\d+) loss=(?P<loss>\S+)(?: gn=(?P<grad_norm>\S+))?"
    curve = read_curve(path, pattern=pattern)
    assert (curve.format, curve.steps) == ("text", [10, 20, 30])
    assert same(curve.loss) == same([2.5, NAN, 2.3])
    assert curve.grad_norm == [1.1, None, 0.9]
    assert curve.lr is None
    assert curve.dropped == {"no match": 2}


def read_error(path: Path, **kwargs: str) -> str:
    with pytest.raises(ReplayInputError) as info:
        read_curve(path, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize(
    ("pattern", "message"),
    [
        (r"step (?P<step>\d+", "--pattern 'step (?P<step>\\\\d+': not a valid regular "
         "expression (missing ), unterminated subpattern at position 5); fix it, e.g. "
         "'step (?P<step>\\\\d+) loss (?P<loss>\\\\S+)'"),
        (r"step (?P<step>\d+)", "--pattern 'step (?P<step>\\\\d+)': no (?P<loss>...) group; "
         "name the loss group, e.g. 'step (?P<step>\\\\d+) loss (?P<loss>\\\\S+)'"),
        (r"loss (?P<loss>\S+)", "--pattern 'loss (?P<loss>\\\\S+)': no (?P<step>...) group; "
         "name the step group, e.g. 'step (?P<step>\\\\d+) loss (?P<loss>\\\\S+)'"),
        (r"(?P<step>\d+) (?P<loss>\S+) (?P<gnorm>\S+)", "--pattern '(?P<step>\\\\d+) "
         "(?P<loss>\\\\S+) (?P<gnorm>\\\\S+)': group 'gnorm' is not one of step, loss, "
         "grad_norm, lr; rename it, or make it unnamed with (?:...)"),
    ],
)  # fmt: skip
def test_bad_pattern_names_the_flag_and_the_fix(tmp_path: Path, pattern: str, message: str) -> None:
    path = tmp_path / "train.log"
    path.write_text("step 1 loss 2.0\n")
    assert read_error(path, pattern=pattern) == message


def test_pattern_errors_in_the_file(tmp_path: Path) -> None:
    path = tmp_path / "train.log"
    path.write_text("step 1 loss 2.0,\nstep 2 loss 1.9\n")
    assert read_error(path, pattern=r"step (?P<step>\d+) loss (?P<loss>\S+)") == (
        f"{path} line 1: loss='2.0,' is not a number; fix the value, or narrow the "
        "--pattern group to the number"
    )
    assert read_error(path, pattern=r"iter (?P<step>\d+) loss (?P<loss>\S+)") == (
        f"{path}: no line has a loss value; check --pattern against a line of the log "
        "(it is searched in every line)"
    )
    assert read_error(path, pattern=r"(?P<step>\d+) (?P<loss>\S+)", format="csv") == (
        f"{path}: --pattern reads plain-text logs, not csv; drop --format or --pattern"
    )
    assert read_error(path, format="text") == (
        f"{path}: no line looks like a nanoGPT, llm.c, modded-nanogpt or Megatron-LM log "
        "line; pass --pattern with named groups step and loss, e.g. 'step (?P<step>\\d+) "
        "loss (?P<loss>\\S+)'"
    )


def test_a_restarted_log_names_both_lines(tmp_path: Path) -> None:
    path = tmp_path / "train.log"
    path.write_text("iter 0: loss 4.2, time 1.0ms\niter 10: loss 3.9, time 1.0ms\n"
                    "iter 0: loss 4.2, time 1.0ms\n")  # fmt: skip
    assert read_error(path) == (
        f"{path} line 3: step 0 comes after step 10 of line 2 (steps must increase; was the "
        "run restarted?); sort by step, or keep only what was logged after the restart"
    )
