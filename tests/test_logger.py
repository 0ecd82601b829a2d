"""Rank-0 run logging (utils/logger.py): log.jsonl records, truncation on resume, silent other ranks."""

from __future__ import annotations

from utils.logger import RunLogger, read_log, truncate_log


def test_records_world_size_first_and_truncation(tmp_path):
    log = RunLogger(tmp_path, enabled=True, total_steps=10, world_size=2)
    for step in (1, 2, 3):
        log.log({"step": step, "loss": 1.0 / step, "grad_norm": float("nan")})
    log.close()
    records = read_log(tmp_path / "log.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3]
    assert records[0]["world_size"] == 2 and "world_size" not in records[1]
    assert records[0]["grad_norm"] == "nan"  # JSON has no NaN literal
    truncate_log(tmp_path / "log.jsonl", 2)
    assert [r["step"] for r in read_log(tmp_path / "log.jsonl")] == [1, 2]


def test_other_ranks_write_nothing(tmp_path):
    log = RunLogger(tmp_path / "rank1", enabled=False, total_steps=10)
    log.log({"step": 1, "loss": 0.5})
    log.advance(1, {"loss": 0.5})
    log.close()
    assert not (tmp_path / "rank1").exists()
    assert RunLogger.wandb_id(tmp_path) == RunLogger.wandb_id(tmp_path / "x" / "..")
