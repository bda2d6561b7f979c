"""runlog.py: the one metrics.jsonl reader and writer; a resume logs each step once."""

import json
import os

from diffusion import runlog


def write_lines(path, lines):
  with open(path, "w") as fh:
    fh.write("\n".join(lines) + "\n")


def test_reader_skips_torn_lines_and_keeps_the_newest_row_of_a_step(tmp_path):
  write_lines(
    tmp_path / "metrics.jsonl",
    [
      '{"step": 1, "loss": 3.0}',
      '{"step": 2, "loss": 2.0}',
      '{"step": 2, "mode": "eval", "fd": 9}',
      '{"step": 2, "loss": 1.5}',
      "[1, 2]",
      '{"step": 3, "lo',
    ],
  )  # a list, and a line cut by a kill
  rows = runlog.read_metrics(str(tmp_path))
  assert len(rows) == 4
  assert [(r["step"], r["loss"]) for r in runlog.train_rows(rows)] == [(1, 3.0), (2, 1.5)]
  assert runlog.eval_rows(rows) == [{"step": 2, "mode": "eval", "fd": 9}]
  assert runlog.last_train_step(str(tmp_path)) == 2
  assert runlog.read_metrics(str(tmp_path / "missing")) == []


def test_a_resumed_writer_drops_the_rows_after_its_step_and_keeps_eval_rows(tmp_path):
  lines = [json.dumps({"step": s, "loss": 1.0 / s}) for s in (2, 4, 6)]
  write_lines(tmp_path / "metrics.jsonl", [*lines, '{"step": 6, "mode": "eval", "fd": 1}'])
  w = runlog.Writer(str(tmp_path), True, start_step=4)
  w.write(6, {"loss": 0.5})
  w.close()
  rows = runlog.read_metrics(str(tmp_path))
  assert [(r["step"], r.get("loss"), r.get("mode")) for r in rows] == [
    (2, 0.5, None),
    (4, 0.25, None),
    (6, None, "eval"),
    (6, 0.5, None),
  ]
  assert not [f for f in os.listdir(tmp_path) if ".tmp" in f]


def test_duration_shows_days_past_24_hours():
  assert runlog.duration(3 * 3600 + 4 * 60 + 5) == "03:04:05"
  assert runlog.duration(2 * 86400 + 3 * 3600 + 4 * 60 + 5.9) == "2d 03:04:05"
