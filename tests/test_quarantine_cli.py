"""``spikewatch quarantine FILE`` through the real command line, on files written by the
real `quarantine.append` from verdicts the real `judge` gave."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from spikewatch.forensics import BatchLoss, ForensicsConfig, judge
from spikewatch.forensics.quarantine import append, entries_of, read

REFERENCE = [BatchLoss(p, 2.0, [(1000 + 4 * p + k, 2.0 + 0.01 * k) for k in range(4)])
             for p in range(8)]  # fmt: skip


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "spikewatch.cli", "quarantine", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _quarantine(path: Path, run: str, step: int, bad: list[tuple[int | None, float]]) -> None:
    """What the hook appends after a ``data`` verdict naming the samples ``bad``."""
    suspect = [BatchLoss(step - 10, 6.0, [*bad, (5, 2.0), (6, 2.01)])]
    verdict = judge(suspect, REFERENCE, ForensicsConfig(), incident=f"loss-spike-{step - 10}",
                    step=step, onset_step=step - 10)  # fmt: skip
    assert verdict.cause == "data" and len(verdict.samples) == len(bad)
    append(path, entries_of(verdict, run))


@pytest.fixture
def quarantine_file(tmp_path: Path) -> Path:
    path = tmp_path / "quarantine.jsonl"
    _quarantine(path, "gpt-a", 515, [(4711, 9.0), (17, 12.5), (90210, 7.25)])
    _quarantine(path, "gpt-b", 900, [(17, 8.0), (None, 30.0)])  # an index the hook lacked
    return path


def test_one_row_per_dataset_index_then_the_unindexed_by_position_then_a_total(
    quarantine_file: Path,
) -> None:
    done = _cli(str(quarantine_file))
    assert (done.returncode, done.stderr) == (0, "")
    assert done.stdout == (
        "index  times  max_loss  ref_loss  runs          first_step\n"
        "17     2      12.5      2         gpt-a, gpt-b  515\n"
        "4711   1      9         2         gpt-a         515\n"
        "90210  1      7.25      2         gpt-a         515\n"
        "\n"
        "without a dataset index, by the batch's data position:\n"
        "position  times  max_loss  ref_loss  runs   first_step\n"
        "890       1      30        2         gpt-b  900\n"
        "\n"
        f"{quarantine_file}: 5 entries, 3 dataset indices, 1 entry without an index\n"
    )


def test_indices_prints_only_the_sorted_indices_for_scripts(quarantine_file: Path) -> None:
    done = _cli(str(quarantine_file), "--indices")
    assert (done.returncode, done.stdout, done.stderr) == (0, "17\n4711\n90210\n", "")


def test_json_prints_every_entry_as_it_is_stored(quarantine_file: Path) -> None:
    done = _cli(str(quarantine_file), "--json")
    assert done.returncode == 0, done.stderr
    printed = [json.loads(line) for line in done.stdout.splitlines()]
    assert printed == [dataclasses.asdict(e) for e in read(quarantine_file)]
    assert [e["index"] for e in printed] == [4711, 17, 90210, 17, None]  # in file order


def test_a_line_cut_short_by_a_crash_is_named_and_the_rest_listed(quarantine_file: Path) -> None:
    with quarantine_file.open("a") as out:
        out.write('{"run": "gpt-c", "step": 12')  # the trainer died mid-line
    done = _cli(str(quarantine_file), "--indices")
    assert (done.returncode, done.stdout) == (0, "17\n4711\n90210\n")
    assert "line 6 is not a quarantine entry" in done.stderr


def test_an_empty_file_has_no_samples(tmp_path: Path) -> None:
    (tmp_path / "q.jsonl").write_text("")
    done = _cli(str(tmp_path / "q.jsonl"))
    assert (done.returncode, done.stdout) == (
        0,
        f"{tmp_path / 'q.jsonl'}: no quarantined samples\n",
    )
    assert _cli(str(tmp_path / "q.jsonl"), "--indices").stdout == ""


@pytest.mark.parametrize(
    ("name", "content", "problem"),
    [
        ("missing.jsonl", None, "does not exist"),
        ("folder", "dir", "is a directory"),
        ("losses.csv", "step,loss\n1,2.5\n", "holds no quarantine entry in its 2 lines"),
        ("binary.jsonl", b"\xff\xfe\x00", "is not UTF-8 text"),
    ],
)
def test_a_file_that_is_no_quarantine_file_is_a_one_line_error_with_the_fix(
    tmp_path: Path, name: str, content: str | bytes | None, problem: str
) -> None:
    path = tmp_path / name
    if content == "dir":
        path.mkdir()
    elif isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    done = _cli(str(path))
    assert (done.returncode, done.stdout) == (2, "")
    message = done.stderr.splitlines()[-1]
    assert message.startswith(f"spikewatch quarantine: error: {str(path)!r} {problem}")
    assert "Traceback" not in done.stderr
    if problem != "is not UTF-8 text":
        assert message.endswith(
            "pass the quarantine file the trainer writes (JSON lines, one sample per line)"
        )
