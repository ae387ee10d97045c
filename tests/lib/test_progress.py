"""Progress display (stages/lib/progress.py): a bar with an ETA in a terminal, one line per step in logs."""
from __future__ import annotations

import io
import logging

import pytest

from stages.lib import progress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_in_a_log_each_tenth_of_the_work_is_one_line_with_the_time_left(caplog, monkeypatch):
    monkeypatch.delenv(progress.ENV, raising=False)
    logger = logging.getLogger("stages.test")
    with caplog.at_level(logging.INFO, logger="stages.test"):
        items = list(progress.track(range(95), total=95, what="augment train", unit="images", logger=logger,
                                    stream=io.StringIO()))
    assert items == list(range(95))
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 10, lines
    assert lines[0].startswith("augment train: 10/95 images (11%), ") and "left" in lines[0]
    assert lines[-1].startswith("augment train: 95/95 images (100%), ") and lines[-1].endswith("about 0 s left")


def test_batch_updates_log_every_step_they_cross(caplog, monkeypatch):
    monkeypatch.delenv(progress.ENV, raising=False)
    logger = logging.getLogger("stages.test")
    with caplog.at_level(logging.INFO, logger="stages.test"), \
            progress.Progress(100, "int8 on test", "images", logger, steps=4, stream=io.StringIO()) as bar:
        bar.update(60)  # crosses 25% and 50%: one line
        bar.update(10)  # crosses nothing
        bar.update(30)  # crosses 75% and 100%: one line
    assert [r.getMessage().split(",")[0] for r in caplog.records] == [
        "int8 on test: 60/100 images (60%)", "int8 on test: 100/100 images (100%)"]


def test_in_a_terminal_a_bar_shows_the_rate_and_time_left(caplog, monkeypatch):
    monkeypatch.delenv(progress.ENV, raising=False)
    screen = Terminal()
    with caplog.at_level(logging.INFO):
        for _ in progress.track(range(50), total=50, what="dedupe", unit="images", stream=screen):
            pass
    drawn = screen.getvalue()
    assert "dedupe" in drawn and "100%" in drawn and "50/50" in drawn and "<" in drawn  # elapsed<left
    assert not [r for r in caplog.records if r.name == "stages.lib.progress"], "no log lines under a bar"


@pytest.mark.parametrize("forced, expected", [("log", "log"), ("bar", "bar"), ("off", "off"), ("", "bar")])
def test_the_environment_can_force_a_mode(monkeypatch, forced, expected):
    monkeypatch.setenv(progress.ENV, forced)
    assert progress.mode(Terminal()) == expected


def test_durations_read_like_a_clock():
    assert [progress.duration(s) for s in (0.4, 7, 65, 3723)] == ["0 s", "7 s", "1:05", "1:02:03"]
