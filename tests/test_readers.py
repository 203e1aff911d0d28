"""Reading logged curves: every format round-trips, every bad input names file, place and fix."""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import pytest

from spikewatch.errors import ReplayInputError
from spikewatch.replay.readers import read_curve
from spikewatch.replay.tensorboard import find_event_files

NAN, INF = math.nan, math.inf
Write = Callable[[str, str], Path]


def same(values: Sequence[float | None] | None) -> list[str] | None:
    """Compare float lists with NaN == NaN (``repr`` keeps nan, inf and -inf apart)."""
    return None if values is None else [repr(v) for v in values]


def f32(value: float) -> float:
    """``value`` as TensorBoard stores a ``simple_value``: rounded to float32."""
    return float(struct.unpack("<f", struct.pack("<f", value))[0])


@pytest.fixture
def write(tmp_path: Path) -> Write:
    def _write(name: str, text: str) -> Path:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        return path

    return _write


def read_error(path: Path, fmt: str | None = None) -> str:
    with pytest.raises(ReplayInputError) as info:
        read_curve(path, format=fmt)
    message = str(info.value)
    assert "\n" not in message
    return message


# --- text formats -----------------------------------------------------------------


def test_csv_round_trip_keeps_nan_and_inf(write: Write) -> None:
    path = write("run.csv", "step,loss,grad_norm,lr\n0,2.5,1.0,1e-3\n1,nan,inf,1e-3\n2,inf,,\n")
    curve = read_curve(path)
    assert (curve.path, curve.format, curve.steps) == (str(path), "csv", [0, 1, 2])
    assert same(curve.loss) == same([2.5, NAN, INF])
    assert same(curve.grad_norm) == same([1.0, INF, None])  # a blank cell is no value
    assert same(curve.lr) == same([1e-3, 1e-3, None])


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("a.csv", "global_step,train_loss,grad-norm,learning_rate\n"
                  "1,2.0,0.5,0.1\n2,-inf,0.6,0.1\n"),
        ("b.csv", "Step, Loss/train ,Grad Norm,LR\n1,2.0,0.5,0.1\n2,-INF,0.6,0.1\n"),
        ("c.tsv", "step\tloss\tgrad_norm\tlr\n1\t2.0\t0.5\t0.1\n\n2\t-Infinity\t0.6\t0.1\n"),
        ("d.csv", "\ufeffepoch,step,loss,grad_norm,lr,val_loss\n0,1,2.0,0.5,0.1,\n0,1,,,,3.1\n"
                  "0,2.0,-inf,0.6,0.1,\n"),
    ],
)  # fmt: skip
def test_csv_aliases_delimiters_and_rows_without_loss(write: Write, name: str, text: str) -> None:
    curve = read_curve(write(name, text))
    assert curve.steps == [1, 2]
    assert same(curve.loss) == same([2.0, -INF])
    assert curve.grad_norm == [0.5, 0.6]
    assert curve.lr == [0.1, 0.1]


def test_jsonl_round_trip(write: Write) -> None:
    lines = [
        '{"step": 1, "loss": 2.5, "grad_norm": 1.0}',
        "",
        '{"step": 2, "loss": NaN, "grad_norm": Infinity}',
        '{"step": 2, "eval_loss": 3.0}',
        '{"step": 3, "train_loss": "inf", "lr": 0.1}',
        '{"step": 4, "loss": -Infinity, "grad_norm": null}',
        '{"step": 5, "loss": 1.',  # the writer was killed mid-line: ignored
    ]
    curve = read_curve(write("log.jsonl", "\n".join(lines)))
    assert (curve.format, curve.steps) == ("jsonl", [1, 2, 3, 4])
    assert same(curve.loss) == same([2.5, NAN, INF, -INF])
    assert same(curve.grad_norm) == same([1.0, INF, None, None])  # missing key, null
    assert same(curve.lr) == same([None, None, 0.1, None])
    assert curve.dropped == {"no loss": 1, "truncated": 1}


def hf_state(history: Sequence[Mapping[str, object]]) -> str:
    # json.dumps writes NaN/Infinity literals, exactly like the HF Trainer does.
    return json.dumps({"global_step": 30, "log_history": history}, indent=2, sort_keys=True)


def test_hf_trainer_state_round_trip(write: Write) -> None:
    history: list[dict[str, object]] = [
        {"epoch": 0.1, "grad_norm": 1.5, "learning_rate": 1e-4, "loss": 2.5, "step": 10},
        {"epoch": 0.1, "eval_loss": 2.6, "step": 10},
        {"epoch": 0.2, "grad_norm": INF, "learning_rate": 9e-5, "loss": NAN, "step": 20},
        {"epoch": 0.3, "learning_rate": 8e-5, "loss": 2.1, "step": 30},
        {"step": 30, "train_loss": 2.3, "train_runtime": 12.0},
    ]
    path = write("checkpoint-30/trainer_state.json", hf_state(history))
    for source in (path, path.parent):  # the file, or the checkpoint folder holding it
        curve = read_curve(source)
        assert (curve.format, curve.steps) == ("hf", [10, 20, 30])
        assert same(curve.loss) == same([2.5, NAN, 2.1])
        assert same(curve.grad_norm) == same([1.5, INF, None])
        assert curve.lr == [1e-4, 9e-5, 8e-5]
        assert curve.dropped == {"no loss": 2}  # the eval entry and the final summary


@pytest.mark.parametrize(
    ("name", "text", "expected"),
    [
        ("loss_log", "step,loss\n1,2.0\n", "csv"),
        ("loss_log", '{"step": 1, "loss": 2.0}\n', "jsonl"),
        ("state.json", hf_state([{"loss": 2.0, "step": 1}]), "hf"),
        ("state.txt", json.dumps({"log_history": [{"loss": 2.0, "step": 1}]}), "hf"),
    ],
)
def test_format_is_detected_from_content(write: Write, name: str, text: str, expected: str) -> None:
    assert read_curve(write(name, text)).format == expected


# --- TensorBoard ------------------------------------------------------------------


def write_tensorboard(logdir: Path, tags: tuple[str, str, str], losses: list[float]) -> Path:
    tensorboardx = pytest.importorskip("tensorboardX")
    writer = tensorboardx.SummaryWriter(str(logdir))
    for step, loss in enumerate(losses):
        writer.add_scalar(tags[0], loss, step * 10)
        writer.add_scalar(tags[1], 1.0 + step, step * 10)
        if step % 2 == 0:
            writer.add_scalar(tags[2], 0.1, step * 10)
        writer.add_scalar("accuracy", 0.5, step * 10)
    writer.close()
    (path,) = logdir.glob("events.out.tfevents.*")
    return path


@pytest.mark.parametrize(
    "tags",
    [
        ("loss", "grad_norm", "lr"),
        ("train/loss", "train/grad_norm", "train/learning_rate"),
        ("train_loss", "grad_norm", "learning_rate"),
        ("Loss/train", "grad_norm", "lr"),
    ],
)
@pytest.mark.filterwarnings("ignore")
def test_tensorboard_scalars_from_tensorboardx(tmp_path: Path, tags: tuple[str, str, str]) -> None:
    losses = [2.5, 2.4, NAN, INF, 2.2]
    path = write_tensorboard(tmp_path / "run", tags, losses)
    for source in (path, path.parent):  # the event file, or the run folder
        curve = read_curve(source)
        assert (curve.format, curve.steps) == ("tensorboard", [0, 10, 20, 30, 40])
        assert same(curve.loss) == same([f32(v) for v in losses])
        assert curve.grad_norm == [1.0, 2.0, 3.0, 4.0, 5.0]
        assert same(curve.lr) == same([f32(0.1), None, f32(0.1), None, f32(0.1)])


def test_tensorboard_scalar_tensors(tmp_path: Path) -> None:
    tensorboardx = pytest.importorskip("tensorboardX")
    summary_pb2 = pytest.importorskip("tensorboardX.proto.summary_pb2")
    tensor_pb2 = pytest.importorskip("tensorboardX.proto.tensor_pb2")

    tensors = [
        tensor_pb2.TensorProto(dtype=1, float_val=[2.5]),  # DT_FLOAT, packed float_val
        tensor_pb2.TensorProto(dtype=2, double_val=[2.25]),  # DT_DOUBLE, packed double_val
        tensor_pb2.TensorProto(dtype=2, tensor_content=struct.pack("<d", NAN)),
        tensor_pb2.TensorProto(dtype=1, tensor_content=struct.pack("<f", 2.0)),
    ]
    writer = tensorboardx.FileWriter(str(tmp_path))
    for step, tensor in enumerate(tensors, start=1):
        writer.add_summary(
            summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag="loss", tensor=tensor)]), step
        )
        text = tensor_pb2.TensorProto(dtype=7, string_val=[b"not a scalar"])  # DT_STRING: skipped
        writer.add_summary(
            summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag="notes", tensor=text)]), step
        )
    shape_pb2 = pytest.importorskip("tensorboardX.proto.tensor_shape_pb2")
    shape = shape_pb2.TensorShapeProto(dim=[shape_pb2.TensorShapeProto.Dim(size=2)])
    # One float_val fills the whole shape ([1.0, 1.0]): only the shape tells it is a vector.
    vector = tensor_pb2.TensorProto(dtype=1, float_val=[1.0], tensor_shape=shape)
    vector_value = summary_pb2.Summary.Value(tag="loss", tensor=vector)  # not a scalar: skipped
    writer.add_summary(summary_pb2.Summary(value=[vector_value]), 5)
    writer.close()
    curve = read_curve(tmp_path)
    assert curve.steps == [1, 2, 3, 4]
    assert same(curve.loss) == same([2.5, 2.25, NAN, 2.0])
    assert curve.grad_norm is None


@pytest.mark.parametrize("cut", [1, 4, 13, 30])
@pytest.mark.filterwarnings("ignore")
def test_tensorboard_truncated_final_record_keeps_earlier_data(tmp_path: Path, cut: int) -> None:
    path = write_tensorboard(tmp_path, ("loss", "grad_norm", "lr"), [2.5, 2.4, 2.3, 2.2])
    data = path.read_bytes()
    # The last record is the step-30 "accuracy" scalar (about 30 bytes).
    path.write_bytes(data[:-cut])
    curve = read_curve(path)
    assert curve.steps == [0, 10, 20, 30]
    path.write_bytes(data + bytes(64))  # a zero-filled tail, as a crash can leave
    assert read_curve(path).steps == [0, 10, 20, 30]


def record_offsets(data: bytes) -> list[int]:
    offsets, pos = [], 0
    while pos < len(data):
        offsets.append(pos)
        pos += 16 + struct.unpack_from("<Q", data, pos)[0]
    return offsets


@pytest.mark.parametrize(
    ("where", "problem"),
    [(0, "the length checksum does not match"), (14, "the payload checksum does not match")],
)
def test_tensorboard_corrupt_record_names_record_and_byte(
    tmp_path: Path, where: int, problem: str
) -> None:
    path = write_tensorboard(tmp_path, ("loss", "grad_norm", "lr"), [2.5, 2.4, 2.3])
    data = bytearray(path.read_bytes())
    offset = record_offsets(bytes(data))[3]  # record 3: a loss scalar
    data[offset + where] ^= 0xFF
    path.write_bytes(bytes(data))
    assert read_error(path) == (
        f"{path} record 3 (byte {offset}): {problem}, so the file is corrupt from here; "
        f"copy it again, or keep the part before: head -c {offset} {path} > fixed.tfevents"
    )


# --- errors -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "text", "fmt", "message"),
    [
        ("run.csv", "step,loss\n1,2\n2,3\n3,2\n4,2\n5,2\n6,abc\n", None,
         "line 7: loss='abc' is not a number; fix the value or remove the line"),
        ("run.csv", "step,loss,grad_norm\n1,2,x1\n", None,
         "line 2: grad_norm='x1' is not a number; fix the value or remove the line"),
        ("run.csv", "step,loss\n1.5,2\n", None,
         "line 2: step='1.5' is not a whole number; fix the value or remove the line"),
        ("run.csv", "step,acc\n1,2\n", None,
         "line 1: no loss column in header 'step,acc'; "
         "name a column loss or train/loss or train_loss"),
        ("run.csv", "\nloss\n1\n", None,
         "line 2: no step column in header 'loss'; "
         "name a column step or global_step or trainer/global_step"),
        ("run.csv", "step,loss\n1,2\n2,2\n2,1\n", None,
         "line 4: step 2 repeats step 2 of line 3; remove one line"),
        ("run.csv", "step,loss\n1,2\n5,2\n3,1\n", None,
         "line 4: step 3 comes after step 5 of line 3 (steps must increase; was the run "
         "restarted?); sort by step, or keep only what was logged after the restart"),
        ("run.csv", "step,loss\n", None,
         ": no line has a loss value; add rows below the header, e.g. 1,2.31"),
        ("run.csv", " \n\n", None,
         ": the file is empty; point at the file the run logged to"),
        ("run.jsonl", '{"step": 1, "loss": 2}\n{"step": 2, "loss": "abc"}\n', None,
         "line 2: loss='abc' is not a number; fix the value or remove the line"),
        ("run.jsonl", '{"step": 1, "loss": 2}\n{"step": 1, "loss": 3}\n', None,
         "line 2: step 1 repeats step 1 of line 1; remove one line"),
        ("run.jsonl", '{"step": 1, "loss": 2}\n{"loss": 3}\n', None,
         'line 2: no step key; add "step": N to every line'),
        ("run.jsonl", '{"step": 1, "loss": 2,}\n{"step": 2, "loss": 3}\n', None,
         "line 1: not valid JSON (Expecting property name enclosed in double quotes at "
         "column 23); fix or remove the line"),
        ("run.jsonl", '[1, 2]\n', None,
         'line 1: expected a JSON object like {"step": 1, "loss": 2.3}; '
         "fix or remove the line"),
        ("run.jsonl", '{"step": 1, "acc": 2}\n', None,
         ': no line has a loss value; write one object per line, e.g. {"step": 1, "loss": 2.31}'),
        ("trainer_state.json", hf_state([{"loss": 2, "step": 5}, {"loss": "x", "step": 6}]),
         None, "log_history[1]: loss='x' is not a number; fix the value or remove the entry"),
        ("trainer_state.json", hf_state([{"loss": 2, "step": 5}, {"loss": 1, "step": 4}]),
         None, "log_history[1]: step 4 comes after step 5 of log_history[0] (steps must "
         "increase; was the run restarted?); sort by step, or keep only what was logged after "
         "the restart"),
        ("trainer_state.json", hf_state([{"eval_loss": 2, "step": 5}]), None,
         ": no entry has a loss value; set TrainingArguments(logging_steps=...) > 0"),
        ("trainer_state.json", '{"global_step": 3}', None,
         ": no log_history list; pass the trainer_state.json the HF Trainer saves in each "
         "checkpoint folder"),
        ("trainer_state.json", '{"log_history": [\n  {"loss": 1,}\n]}', None,
         " line 2: not valid JSON (Expecting property name enclosed in double quotes); pass "
         "the trainer_state.json the HF Trainer saves in each checkpoint folder"),
        ("run.dat", "hello\n", None,
         ": cannot tell the format from the name or content; pass --format (one of csv, "
         "wandb, jsonl, hf, tensorboard, text), or --pattern REGEX for a plain-text log"),
        ("run.csv", "step,loss\n1,2\n", "xml",
         ": format 'xml' is not supported; use one of csv, wandb, jsonl, hf, tensorboard, text"),
        ("run.csv", "step,loss\n1,2\n", "tensorboard",
         " record 0: the length checksum does not match, so this is not a TensorBoard event "
         "file; pass an events.out.tfevents.* file or choose another --format"),
        ("events.out.tfevents.1", "", None,
         ": the file is empty; point at the file the run logged to"),
    ],
)  # fmt: skip
def test_bad_input_message_names_file_place_and_fix(
    write: Write, name: str, text: str, fmt: str | None, message: str
) -> None:
    path = write(name, text)
    separator = "" if message[0] in ": " else " "
    assert read_error(path, fmt) == f"{path}{separator}{message}"


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.csv"
    assert read_error(path) == f"{path}: no such file or folder; check the path"


@pytest.mark.filterwarnings("ignore")
def test_tensorboard_errors(tmp_path: Path) -> None:
    path = write_tensorboard(tmp_path / "a" / "run1", ("acc", "grad_norm", "lr"), [0.5])
    assert read_error(path) == (
        f"{path}: no loss tag (scalar tags found: acc, accuracy, grad_norm, lr); log the "
        "loss under a tag named loss, train/loss, train_loss or Loss/train"
    )
    steps = tmp_path / "b" / "run"
    write_tensorboard(steps, ("loss", "grad_norm", "lr"), [2.0, 1.0])
    write_tensorboard(tmp_path / "b2", ("loss", "grad_norm", "lr"), [2.0])
    (second,) = (tmp_path / "b2").glob("events*")
    moved = second.rename(steps / (second.name + ".2"))  # a restart: steps begin again at 0
    first = next(p for p in find_event_files(steps) if p != moved)
    assert read_error(steps) == (
        f"{moved} record 1 (tag 'loss'): step 0 comes after step 10 of {first} record 5 "
        "(tag 'loss') (steps must increase; was the run restarted?); sort by step, or keep "
        "only what was logged after the restart"
    )
    assert read_error(tmp_path) == (
        f"{tmp_path}: event files of 2 runs (a/run1, b/run); pass one of these folders"
    )
    (tmp_path / "empty").mkdir()
    assert read_error(tmp_path / "empty", "tensorboard") == (
        f"{tmp_path / 'empty'}: no events.out.tfevents.* file in this folder; "
        "pass the run's log folder or one event file"
    )


# --- missing values and dropped rows ---------------------------------------------


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("run.csv", "step,loss,grad_norm,lr\n0,2.5,1.0,0.1\n1,2.4,,0.1\n2,2.3,nan,\n"),
        ("run.jsonl", '{"step": 0, "loss": 2.5, "grad_norm": 1.0, "lr": 0.1}\n'
                      '{"step": 1, "loss": 2.4, "lr": 0.1}\n'
                      '{"step": 2, "loss": 2.3, "grad_norm": NaN, "lr": null}\n'),
        ("trainer_state.json", hf_state([
            {"grad_norm": 1.0, "learning_rate": 0.1, "loss": 2.5, "step": 0},
            {"learning_rate": 0.1, "loss": 2.4, "step": 1},
            {"grad_norm": NAN, "loss": 2.3, "step": 2},
        ])),
    ],
)  # fmt: skip
def test_not_logged_is_none_and_only_a_nan_literal_is_nan(
    write: Write, name: str, text: str
) -> None:
    curve = read_curve(write(name, text))
    assert same(curve.grad_norm) == same([1.0, None, NAN])
    assert same(curve.lr) == same([0.1, 0.1, None])
    assert curve.dropped == {}


@pytest.mark.parametrize(
    ("name", "text", "dropped"),
    [
        ("run.csv", "step,loss,val_loss\n1,2.0,\n1,,2.1\n\n2,1.9,\n3,,\n", {"no loss": 2}),
        ("run.jsonl", '{"step": 1, "loss": 2.0}\n{"step": 1, "eval_loss": 2.1}\n'
                      '{"step": 2, "loss": null}\n{"step": 3, "loss": 1.9}\n{"step": 4, "lo',
         {"no loss": 2, "truncated": 1}),
        ("trainer_state.json", hf_state([
            {"loss": 2.0, "step": 1}, {"eval_loss": 2.1, "step": 1}, {"loss": 1.9, "step": 2},
            {"step": 2, "train_loss": 2.0, "train_runtime": 3.0},
        ]), {"no loss": 2}),
    ],
)  # fmt: skip
def test_rows_without_a_loss_are_dropped_and_counted(
    write: Write, name: str, text: str, dropped: dict[str, int]
) -> None:
    assert read_curve(write(name, text)).dropped == dropped


def test_json_null_loss_is_no_value_not_nan(write: Write) -> None:
    curve = read_curve(write("run.jsonl", '{"step": 1, "loss": 2.0}\n{"step": 2, "loss": null}\n'))
    assert (curve.steps, curve.dropped) == ([1], {"no loss": 1})


# --- detection does not confuse formats ------------------------------------------


@pytest.mark.parametrize(
    ("name", "text", "expected"),
    [
        ("metrics.log", "step,loss\n1,2.0\n", "csv"),
        ("metrics.txt", "iter,loss\n1,2.0\n2,1.9\n", "csv"),
        ("export.txt", ",_step,train/loss,_runtime\n0,1,2.0,3.1\n", "wandb"),
        ("train.out", "tokens per iteration will be: 16,384\niter 0: loss 4.2654, time 9.7ms\n",
         "text:nanogpt"),
        ("notes.log", "iter 0: loss 4.2654, time 9.7ms, mfu 1.00%\n", "text:nanogpt"),
    ],
)  # fmt: skip
def test_content_sniffing(write: Write, name: str, text: str, expected: str) -> None:
    assert read_curve(write(name, text)).format == expected


def test_free_text_is_not_taken_for_csv(write: Write) -> None:
    path = write("notes.log", "epoch 1, step 10, loss 2.3\nepoch 1, step 20, loss 2.2, lr 0.1\n")
    assert read_error(path).startswith(f"{path}: cannot tell the format")
