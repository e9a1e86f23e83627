"""MetricsLogger, read_metrics and PhaseTimer: conversion, durability, resuming, TensorBoard, timing."""

import json
import struct
import time

import jax.numpy as jnp
import numpy as np
import pytest

from sfpo_jax.train.metrics import MetricsLogger, PhaseTimer, deterministic, read_metrics, to_json_value


def run_rows(n: int, seed: int = 0) -> list[dict]:
    """Rows as a loop builds them: JAX/NumPy scalars, a bool, a non-finite value, eval keys every 3rd step."""
    rng = np.random.default_rng(seed)
    rows = []
    for step in range(1, n + 1):
        row = {
            "step": step,
            "rollouts": np.int64(16 * step),
            "reward/mean": jnp.float32(rng.random()),
            "sfpo_active": np.bool_(step < 4),
            "grad_norm": jnp.float32(np.inf) if step == 2 else np.float64(rng.random()),
            "time/total": time.perf_counter(),  # differs between runs by nature
        }
        if step % 3 == 0:
            row["eval/test/accuracy"] = float(rng.random())
        rows.append(row)
    return rows


def test_to_json_value():
    assert to_json_value(jnp.float32(0.5)) == 0.5 and type(to_json_value(jnp.float32(0.5))) is float
    assert to_json_value(jnp.int32(3)) == 3 and type(to_json_value(np.int64(3))) is int
    assert to_json_value(jnp.bool_(True)) is True and to_json_value(np.bool_(False)) is False
    assert to_json_value(jnp.bfloat16(1.5)) == 1.5
    assert to_json_value(float("nan")) is None and to_json_value(np.float32(-np.inf)) is None
    assert to_json_value(jnp.array([1.0, np.nan])) == [1.0, None]
    assert to_json_value({"a": (np.int32(1), "x")}) == {"a": [1, "x"]}
    with pytest.raises(TypeError, match="cannot write a value of type object"):
        to_json_value(object())


def test_rows_written_as_strict_json_and_read_back(tmp_path):
    rows = run_rows(5)
    with MetricsLogger(tmp_path) as logger:
        logged = [logger.log(r) for r in rows]
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 5
    for line in lines:  # strict JSON: NaN/Infinity tokens would fail here
        json.loads(line, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    back = read_metrics(tmp_path)
    assert back == logged == logger.rows
    assert back[1]["grad_norm"] is None
    assert back[0]["sfpo_active"] is True and back[4]["sfpo_active"] is False
    assert back[2]["eval/test/accuracy"] == rows[2]["eval/test/accuracy"]
    assert back[0]["reward/mean"] == float(np.float32(rows[0]["reward/mean"]))
    assert list(back[0]) == list(rows[0])  # key order as built


def test_log_checks_steps(tmp_path):
    with MetricsLogger(tmp_path) as logger:
        with pytest.raises(ValueError, match="needs an integer 'step'"):
            logger.log({"loss": 1.0})
        logger.log({"step": 2})
        with pytest.raises(ValueError, match="step 2 is not after the previous row's step 2"):
            logger.log({"step": 2})
    with pytest.raises(ValueError, match="resume_step must be None or a non-negative int, got -1"):
        MetricsLogger(tmp_path, resume_step=-1)


def test_read_metrics_drops_truncated_last_line_only(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "a": 1.0}\n{"step": 2, "a": 2.0}\n{"step": 3, "a"')
    assert read_metrics(path) == [{"step": 1, "a": 1.0}, {"step": 2, "a": 2.0}]
    path.write_text('{"step": 1}\n{"step": 2, "a\n{"step": 3}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: not a JSON object"):
        read_metrics(path)


@pytest.mark.parametrize("kill_after", [2, 4, 6])
def test_resume_reproduces_the_uninterrupted_file(tmp_path, kill_after):
    """A run checkpointed every 2 steps, killed mid-write after ``kill_after`` rows, resumed from its last
    checkpoint, ends with the uninterrupted run's metrics.jsonl except for the time/ keys."""
    rows = run_rows(9)
    with MetricsLogger(tmp_path / "full") as logger:
        for r in rows:
            logger.log(r)
    out = tmp_path / "killed"
    logger = MetricsLogger(out)
    for r in rows[:kill_after]:
        logger.log(r)
    logger.close()
    with open(out / "metrics.jsonl", "a") as f:  # the row being written when the kill came
        f.write(json.dumps({"step": kill_after + 1, "reward/mean": 0.1})[:12])
    checkpoint_step = kill_after - 1 - (kill_after - 1) % 2  # rows after the last checkpoint are redone
    with MetricsLogger(out, resume_step=checkpoint_step) as logger:
        assert [r["step"] for r in logger.rows] == list(range(1, checkpoint_step + 1))
        for r in rows[checkpoint_step:]:
            r = {**r, "time/total": time.perf_counter()}
            logger.log(r)
    full, resumed = read_metrics(tmp_path / "full"), read_metrics(out)
    assert [deterministic(r) for r in resumed] == [deterministic(r) for r in full]
    assert any(a != b for a, b in zip(resumed, full, strict=True))  # the time/ keys did differ
    assert not (out / "metrics.jsonl.tmp").exists()


def test_fresh_start_replaces_old_file_and_disabled_writes_nothing(tmp_path):
    with MetricsLogger(tmp_path) as logger:
        logger.log({"step": 1, "x": 1})
    with MetricsLogger(tmp_path) as logger:  # not resuming: a new run
        assert logger.rows == []
    assert read_metrics(tmp_path) == []
    with MetricsLogger(tmp_path / "other", enabled=False) as logger:
        assert logger.log({"step": 1, "x": np.float32(2.0)}) == {"step": 1, "x": 2.0}
        assert logger.rows == [{"step": 1, "x": 2.0}]
    assert not (tmp_path / "other").exists()


def _read_tfrecords(path):
    """(tag, step, value) scalars from a TensorBoard event file (TFRecord framing; CRCs not checked)."""
    from tensorboardX.proto import event_pb2

    data, out, i = path.read_bytes(), [], 0
    while i < len(data):
        (length,) = struct.unpack("<Q", data[i : i + 8])
        event = event_pb2.Event.FromString(data[i + 12 : i + 12 + length])
        out += [(v.tag, event.step, v.simple_value) for v in event.summary.value]
        i += 12 + length + 4
    return out


def test_tensorboard_scalars(tmp_path):
    pytest.importorskip("tensorboardX", reason="TensorBoard output needs tensorboardX")
    with MetricsLogger(tmp_path, tensorboard=True) as logger:
        logger.log({"step": 1, "loss": jnp.float32(0.5), "sfpo_active": True, "note": "text", "nan": np.nan})
        logger.log({"step": 2, "loss": 0.25})
    (events,) = (tmp_path / "tensorboard").glob("events.out.tfevents.*")
    scalars = _read_tfrecords(events)
    assert ("loss", 1, 0.5) in scalars and ("loss", 2, 0.25) in scalars and ("sfpo_active", 1, 1.0) in scalars
    assert not any(tag in ("note", "nan", "step") for tag, _, _ in scalars)


def test_phase_timer_totals_and_resume():
    timer = PhaseTimer()
    assert timer.totals() == {
        "time/sample": 0.0,
        "time/score": 0.0,
        "time/update": 0.0,
        "time/eval": 0.0,
        "time/total": 0.0,
    }
    with timer("sample"):
        time.sleep(0.02)
    with timer("eval"):
        time.sleep(0.01)
    with timer("sample"):
        time.sleep(0.01)
    totals = timer.totals()
    assert totals["time/sample"] >= 0.03 and totals["time/eval"] >= 0.01
    assert 0.01 <= timer.last("sample") < totals["time/sample"]
    assert totals["time/total"] == totals["time/sample"]  # eval is not training time

    resumed = PhaseTimer()
    resumed.load(json.loads(json.dumps(timer.state())))  # through a checkpoint's JSON meta
    assert resumed.totals() == totals
    with resumed("update"):
        pass
    assert resumed.totals()["time/total"] >= totals["time/total"]
    assert resumed.last("sample") == 0.0
    with pytest.raises(ValueError, match="'total' is reserved"), resumed("total"):
        pass
    with pytest.raises(ValueError, match="phases must not contain 'total'"):
        PhaseTimer(("sample", "total"))
