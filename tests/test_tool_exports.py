"""Logs as real tools write them: LLaMA-Factory, W&B exports, HF Trainer output folders."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest

from spikewatch.errors import ReplayInputError
from spikewatch.replay.readers import read_curve

DATA = Path(__file__).parent / "data" / "replay"


def read_error(path: Path, fmt: str | None = None) -> str:
    with pytest.raises(ReplayInputError) as info:
        read_curve(path, format=fmt)
    message = str(info.value)
    assert "\n" not in message
    return message


def hf_state(history: Sequence[Mapping[str, object]]) -> str:
    return json.dumps({"global_step": 30, "log_history": history}, indent=2, sort_keys=True)


# --- LLaMA-Factory, W&B -----------------------------------------------------------


def test_llamafactory_trainer_log() -> None:
    curve = read_curve(DATA / "llamafactory_trainer_log.jsonl")
    assert (curve.format, curve.steps) == ("jsonl", [5, 10, 15])
    assert curve.loss == [2.3456, 2.1032, 1.9874]
    assert curve.grad_norm == [None, None, 0.8123]
    assert curve.lr == [4.9e-05, 4.5e-05, 3.9e-05]
    assert curve.dropped == {"no loss": 1}  # the eval line of step 10


def test_wandb_history_export() -> None:
    curve = read_curve(DATA / "wandb_history.csv")
    # train/global_step is the trainer's step; _step only counts wandb.log calls.
    assert (curve.format, curve.steps) == ("wandb", [10, 20, 30])
    assert curve.loss == [2.5012, 2.4103, 2.3377]
    assert curve.grad_norm == [1.2034, None, 1.0981]
    assert curve.lr == [5e-05, 4.9e-05, 4.8e-05]
    assert curve.dropped == {"no loss": 1}


def test_wandb_chart_export_skips_min_max_columns(tmp_path: Path) -> None:
    curve = read_curve(DATA / "wandb_chart.csv")
    assert (curve.format, curve.steps) == ("wandb", [10, 20, 40])
    assert curve.loss == [2.5012, 2.4103, 2.3377]
    assert curve.dropped == {"no loss": 1}
    # The band columns first: still the metric column is read, never __MIN or __MAX.
    text = "Step,r - train/loss__MIN,r - train/loss__MAX,r - train/loss\n1,1.0,3.0,2.0\n"
    (tmp_path / "chart.csv").write_text(text)
    assert read_curve(tmp_path / "chart.csv").loss == [2.0]


def test_wandb_chart_export_of_several_runs_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "chart.csv"
    path.write_text("Step,a - train/loss,a - train/loss__MIN,b - train/loss\n1,2,1,3\n")
    assert read_error(path) == (
        f"{path} line 1: a W&B chart export of 2 runs ('a', 'b'); export the chart with one "
        "run shown, or keep only the Step column and one run's columns"
    )


# --- HF output folders ------------------------------------------------------------


def write_checkpoint(folder: Path, last_step: int) -> None:
    folder.mkdir(parents=True)
    history = [{"loss": 3.0 - s / 1000, "step": s} for s in range(100, last_step + 1, 100)]
    (folder / "trainer_state.json").write_text(hf_state(history))


@pytest.mark.parametrize(("top_level", "expected_last"), [(None, 1000), (1100, 1100), (700, 1000)])
def test_hf_output_folder_reads_the_longest_state(
    tmp_path: Path, top_level: int | None, expected_last: int
) -> None:
    for n in (500, 900, 1000):  # 1000 > 900 as numbers, not as text
        write_checkpoint(tmp_path / f"checkpoint-{n}", n)
    (tmp_path / "runs").mkdir()  # the Trainer's TensorBoard folder: not preferred
    if top_level is not None:
        (tmp_path / "trainer_state.json").unlink(missing_ok=True)
        history = [{"loss": 2.0, "step": s} for s in range(100, top_level + 1, 100)]
        (tmp_path / "trainer_state.json").write_text(hf_state(history))
    curve = read_curve(tmp_path)
    assert (curve.format, curve.steps[-1]) == ("hf", expected_last)


def test_folder_with_neither_checkpoints_nor_events(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello\n")
    assert read_error(tmp_path) == (
        f"{tmp_path}: no trainer_state.json, checkpoint-N/trainer_state.json or "
        "events.out.tfevents.* file in this folder; pass the run's output or log folder"
    )
    assert read_error(tmp_path, "hf") == (
        f"{tmp_path}: no trainer_state.json and no checkpoint-N/trainer_state.json in this "
        "folder; pass the Trainer's output_dir or one checkpoint folder"
    )
