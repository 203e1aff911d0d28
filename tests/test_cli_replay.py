"""``spikewatch replay``: the text table, the JSON report, the plot, errors and exit codes."""

from __future__ import annotations

import io
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from spikewatch.cli import main
from spikewatch.replay.command import ProgressBar

EVENT_KEYS = {"kind", "onset_step", "peak_step", "end_step", "transient", "score", "action"}


def write_curve(path: Path, points: int, spike_at: int | None, seed: int = 0) -> Path:
    """A noisy, falling loss curve with (optionally) one clear one-step spike."""
    rng = random.Random(seed)
    rows = ["step,loss,grad_norm,lr"]
    for step in range(points):
        loss = 5.0 - 3.0 * step / points + rng.gauss(0, 0.05)
        if step == spike_at:
            loss += 2.0
        rows.append(f"{step},{loss:.5f},{1.0 + 0.1 * rng.random():.4f},0.001")
    path.write_text("\n".join(rows) + "\n")
    return path


@pytest.fixture
def spike_csv(tmp_path: Path) -> Path:
    return write_curve(tmp_path / "run.csv", points=600, spike_at=300)


def test_text_report_lists_the_spike(spike_csv: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["replay", str(spike_csv)]) == 0
    out, err = capsys.readouterr()
    header, row, _, title, head, first, second, _, summary = out.splitlines()
    assert title == "decisions"  # the timeline: streaming alarm, then its confirmation
    assert head.split()[:7] == ["step", "action", "metric", "signal", "restore", "lr", "incident"]
    assert first.split()[:7] == ["300", "watch", "loss", "spike", "-", "1", "loss-spike-300"]
    assert second.split()[:2] == ["308", "watch"]
    assert head.index("incident") == first.index("loss-spike-300")  # columns line up
    assert header.split() == [
        "kind",
        "metric",
        "onset",
        "peak",
        "end",
        "transient",
        "score",
        "action",
    ]
    assert row.split()[:6] == ["spike", "loss", "300", "300", "300", "yes"]
    assert row.split()[7] == "watch"
    assert header.index("action") == row.index("watch")  # columns line up
    assert summary == f"{spike_csv} (csv): 600 points, 1 event (1 watch)"
    assert err == ""


def test_json_report_shape(spike_csv: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["replay", str(spike_csv), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["points"] == 600
    (event,) = report["events"]
    assert event.keys() >= EVENT_KEYS
    assert event["kind"] == "spike"
    assert (event["onset_step"], event["peak_step"]) == (300, 300)
    assert event["transient"] is True
    assert event["action"] == "watch"
    assert isinstance(event["score"], float) and event["score"] > 0


def test_clean_curve_has_no_events(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_curve(tmp_path / "clean.csv", points=600, spike_at=None)
    assert main(["replay", str(path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["points"], report["events"], report["dropped"]) == (600, [], {})
    assert main(["replay", str(path)]) == 0
    assert capsys.readouterr().out == f"{path} (csv): 600 points, 0 events\n"


def test_plot_writes_a_png(spike_csv: Path, tmp_path: Path) -> None:
    png = tmp_path / "run.png"
    assert main(["replay", str(spike_csv), "--plot", str(png), "--json"]) == 0
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 10_000


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["{dir}/nope.csv"], "{dir}/nope.csv: no such file or folder; check the path"),
        (
            ["{dir}/bad.csv"],
            "{dir}/bad.csv line 3: loss='abc' is not a number; fix the value or remove the line",
        ),
        (
            ["{dir}/bad.csv", "--plot", "{dir}/out.jpg"],
            "--plot='{dir}/out.jpg' is invalid: name a .png, .svg or .pdf file",
        ),
        (
            ["{dir}/bad.csv", "--plot", "{dir}/missing/out.png"],
            "--plot='{dir}/missing/out.png' is invalid: create the folder '{dir}/missing' first",
        ),
    ],
)
def test_errors_are_one_line_with_exit_code_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    (tmp_path / "bad.csv").write_text("step,loss\n1,2.0\n2,abc\n")
    argv = ["replay", *(a.format(dir=tmp_path) for a in args)]
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err == f"spikewatch replay: error: {message.format(dir=tmp_path)}\n"


@pytest.mark.parametrize(
    ("argv", "code"), [([], 2), (["replay"], 2), (["replay", "x", "--format", "xml"], 2)]
)
def test_usage_errors_return_2(
    argv: list[str], code: int, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == code
    assert "usage: spikewatch" in capsys.readouterr().err


def test_help_and_version_return_0(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("spikewatch ")
    assert main(["replay", "--help"]) == 0
    assert "--no-progress" in capsys.readouterr().out


@pytest.mark.parametrize(("flags", "shown"), [([], True), (["--no-progress"], False)])
def test_progress_bar_on_a_terminal_for_long_curves(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    flags: list[str],
    shown: bool,
) -> None:
    path = write_curve(tmp_path / "long.csv", points=5001, spike_at=None)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert main(["replay", str(path), "--json", *flags]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["points"] == 5001
    assert ("100%  5001/5001 steps\n" in err) is shown


def test_no_progress_bar_when_stderr_is_not_a_terminal(
    spike_csv: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("spikewatch.replay.command.PROGRESS_MIN_POINTS", 10)
    assert main(["replay", str(spike_csv)]) == 0
    assert capsys.readouterr().err == ""


def test_progress_bar_redraws_only_when_the_percentage_changes() -> None:
    stream = io.StringIO()
    bar = ProgressBar(stream, width=4, label="x")
    for done in (0, 1, 2, 500, 1000):
        bar(done, 1000)
    bar.close()
    assert stream.getvalue().split("\r")[1:] == [
        "x [....]   0%  0/1000 steps",
        "x [##..]  50%  500/1000 steps",
        "x [####] 100%  1000/1000 steps\n",
    ]


def test_console_script(spike_csv: Path) -> None:
    script = Path(sys.executable).with_name("spikewatch")
    if not script.exists():
        pytest.skip("the spikewatch console script is not installed in this environment")
    done = subprocess.run(
        [str(script), "replay", str(spike_csv), "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert [e["peak_step"] for e in json.loads(done.stdout)["events"]] == [300]
    missing = subprocess.run(
        [str(script), "replay", str(spike_csv.with_name("nope.csv"))],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert missing.returncode == 2
    assert missing.stderr.startswith("spikewatch replay: error: ")
    assert "Traceback" not in missing.stderr


# --- sparse metrics, dropped rows, more formats -----------------------------------

DATA = Path(__file__).parent / "data" / "replay"


def healthy_rows(points: int, seed: int = 0) -> list[tuple[int, float, float | None]]:
    """A healthy falling curve whose grad norm is logged every 10th step only."""
    rng = random.Random(seed)
    rows = []
    for step in range(points):
        loss = 5.0 - 3.0 * step / points + rng.gauss(0, 0.05)
        grad = 1.0 + 0.1 * rng.random() if step % 10 == 0 else None
        rows.append((step, round(loss, 5), None if grad is None else round(grad, 4)))
    return rows


def sparse_csv(path: Path, rows: list[tuple[int, float, float | None]]) -> None:
    lines = ["step,loss,grad_norm,lr"]
    lines += [f"{s},{loss},{'' if g is None else g},0.001" for s, loss, g in rows]
    path.write_text("\n".join(lines) + "\n")


def sparse_jsonl(path: Path, rows: list[tuple[int, float, float | None]]) -> None:
    objects = [{"step": s, "loss": loss, **({} if g is None else {"grad_norm": g})}
               for s, loss, g in rows]  # fmt: skip
    path.write_text("".join(json.dumps(o) + "\n" for o in objects))


def sparse_hf(path: Path, rows: list[tuple[int, float, float | None]]) -> None:
    history = [{"epoch": s / 300, "learning_rate": 1e-4, "loss": loss, "step": s,
                **({} if g is None else {"grad_norm": g})} for s, loss, g in rows]  # fmt: skip
    path.mkdir()
    (path / "trainer_state.json").write_text(json.dumps({"log_history": history}))


@pytest.mark.parametrize(
    ("writer", "name"),
    [(sparse_csv, "run.csv"), (sparse_jsonl, "run.jsonl"), (sparse_hf, "checkpoint-300")],
)
def test_a_grad_norm_logged_every_10th_step_is_not_a_nan(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], writer: object, name: str
) -> None:
    path = tmp_path / name
    writer(path, healthy_rows(300))  # type: ignore[operator]
    assert main(["replay", str(path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["points"] == 300
    actions = [e["action"] for e in report["events"]]
    assert "halt" not in actions and "skip_step" not in actions, report["events"]
    assert [e for e in report["events"] if e["kind"] == "nonfinite"] == []


def test_dropped_rows_in_text_and_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "run.jsonl"
    rows = healthy_rows(300)
    sparse_jsonl(path, rows)
    evals = "".join(json.dumps({"step": s, "eval_loss": 2.0}) + "\n" for s in range(0, 300, 25))
    path.write_text(path.read_text() + evals[:-1])  # + 12 eval lines, the last one cut short
    path.write_text(path.read_text()[:-3])
    assert main(["replay", str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["dropped"] == {"no loss": 11, "truncated": 1}
    assert main(["replay", str(path)]) == 0
    summary = capsys.readouterr().out.splitlines()[-1]
    assert summary.startswith(f"{path} (jsonl): 300 points, ")
    assert summary.endswith(", 12 rows dropped (11 no loss, 1 truncated)")


def test_text_log_through_the_cli(capsys: pytest.CaptureFixture[str]) -> None:
    path = DATA / "megatron_pretrain_gpt.log"
    assert main(["replay", str(path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["points"], report["dropped"]) == (2, {"no loss": 1, "no match": 11})
    assert main(["replay", str(path)]) == 0
    assert capsys.readouterr().out == (
        f"{path} (text:megatron): 2 points, 0 events, 12 rows dropped (1 no loss, 11 no match)\n"
    )


def test_pattern_through_the_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "train.log"
    lines = [f"[rank0] it {s} | loss {loss:.4f}" for s, loss, _ in healthy_rows(300)]
    lines[150] = "[rank0] it 150 | loss 9.0000"
    path.write_text("booting\n" + "\n".join(lines) + "\n")
    argv = ["replay", str(path), "--pattern", r"it (?P<step>\d+) \| loss (?P<loss>\S+)"]
    assert main([*argv, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["points"] == 300
    assert [(e["kind"], e["peak_step"]) for e in report["events"]] == [("spike", 150)]
    assert report["dropped"] == {"no match": 1}
    assert main([*argv, "--format", "csv"]) == 2
    assert capsys.readouterr().err == (
        f"spikewatch replay: error: {path}: --pattern reads plain-text logs, not csv; "
        "drop --format or --pattern\n"
    )
    assert main(["replay", str(path), "--pattern", "it (?P<step>"]) == 2
    assert capsys.readouterr().err == (
        "spikewatch replay: error: --pattern 'it (?P<step>': not a valid regular expression "
        "(missing ), unterminated subpattern at position 3); fix it, e.g. "
        "'step (?P<step>\\\\d+) loss (?P<loss>\\\\S+)'\n"
    )


@pytest.mark.parametrize(
    ("name", "fmt", "points"),
    [
        ("wandb_history.csv", "wandb", 3),
        ("wandb_chart.csv", "wandb", 3),
        ("llamafactory_trainer_log.jsonl", "jsonl", 3),
        ("nanogpt_train.log", "text:nanogpt", 5),
        ("llmc_train_gpt2py.log", "text:llm.c", 3),
        ("modded_nanogpt.txt", "text:modded-nanogpt", 3),
    ],
)
def test_real_tool_logs_replay(
    capsys: pytest.CaptureFixture[str], name: str, fmt: str, points: int
) -> None:
    assert main(["replay", str(DATA / name)]) == 0
    assert (
        capsys.readouterr()
        .out.splitlines()[-1]
        .startswith(f"{DATA / name} ({fmt}): {points} points, ")
    )


def test_plot_of_a_sparse_grad_norm(tmp_path: Path) -> None:
    path, png = tmp_path / "run.csv", tmp_path / "run.png"
    sparse_csv(path, healthy_rows(300))  # grad norm None on 9 steps of 10
    assert main(["replay", str(path), "--plot", str(png), "--json"]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
