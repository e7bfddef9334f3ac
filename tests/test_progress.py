"""Progress that stays readable: rich bars that end cleanly on a terminal, timed plain lines in a log."""

from __future__ import annotations

import io
import logging
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from rich.console import Console

from medtransfer import progress as prog
from medtransfer.progress import format_duration, plain_line, progress_bar

CSI = re.compile(r"\x1b\[([0-9;?]*)([A-Za-z])")


def screen(raw: str) -> list[str]:
    """What a terminal shows after ``raw``: a minimal emulator of the codes rich's live display writes
    (carriage return, newline, cursor up, erase line, column moves; colours and cursor visibility ignored)."""
    lines, row, col, i = [""], 0, 0, 0
    while i < len(raw):
        m = CSI.match(raw, i)
        if m:
            arg, code = m.groups()
            n = int(arg) if arg.isdigit() else 1
            if code == "A":
                row = max(0, row - n)
            elif code == "K":
                lines[row] = "" if arg == "2" else lines[row][:col]
            elif code == "G":
                col = n - 1
            i = m.end()
            continue
        ch = raw[i]
        if ch == "\r":
            col = 0
        elif ch == "\n":
            row, col = row + 1, 0
            lines += [""] * (row + 1 - len(lines))
        else:
            line = lines[row].ljust(col)
            lines[row] = line[:col] + ch + line[col + 1:]
            col += 1
        i += 1
    while lines and not lines[-1].strip():
        lines.pop()
    return [line.rstrip() for line in lines]


@pytest.fixture
def terminal(monkeypatch: pytest.MonkeyPatch) -> tuple[Console, io.StringIO]:
    monkeypatch.setenv("TERM", "xterm-256color")
    monkeypatch.delenv("TTY_INTERACTIVE", raising=False)
    out = io.StringIO()
    return Console(file=out, force_terminal=True, width=110, color_system=None), out


@pytest.fixture
def terminal_log(terminal: tuple[Console, io.StringIO]):
    """A log handler writing to the same 'terminal', as the CLI's handler writes to stderr."""
    _, out = terminal
    handler = logging.StreamHandler(out)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    log = logging.getLogger("medtransfer")
    log.addHandler(handler)
    # not to the root logger: handlers other tests left there (CliRunner's closed streams) are not this terminal
    propagate, log.propagate = log.propagate, False
    yield logging.getLogger("medtransfer.test"), handler
    log.propagate = propagate
    log.removeHandler(handler)


def test_plain_line_format() -> None:
    assert plain_line("features (train)", 120, 480, 31, unit="images") == (
        "features (train): 120/480 images, 25%, elapsed 0:31, ETA 1:33")
    assert plain_line("epoch 3/8 [all]", 0, 9, 0, unit="batches") == (
        "epoch 3/8 [all]: 0/9 batches, 0%, elapsed 0:00, ETA unknown")
    assert plain_line("predicting", 9, 9, 4000, unit="batches", info="loss 0.3", final=True) == (
        "predicting: 9/9 batches, 100%, elapsed 1:06:40, done, loss 0.3")
    assert plain_line("scan", 5, None, 61, unit="files") == "scan: 5 files, elapsed 1:01"
    assert plain_line("x", 2, 9, 10, final=True).endswith("stopped")  # ended before its total
    assert format_duration(427) == "7:07"


def test_interval_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(prog.INTERVAL_ENV, raising=False)
    assert prog.plain_interval() == prog.PLAIN_INTERVAL_S == 30.0
    monkeypatch.setenv(prog.INTERVAL_ENV, "0.5")
    assert prog.plain_interval() == 0.5
    monkeypatch.setenv(prog.INTERVAL_ENV, "soon")
    assert prog.plain_interval() == 30.0


def test_off_a_terminal_lines_keep_coming_even_inside_one_slow_step(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(prog.INTERVAL_ENV, "0.1")
    monkeypatch.delenv("TTY_INTERACTIVE", raising=False)
    out = io.StringIO()
    console = Console(file=out)  # a StringIO is not a terminal
    t0 = time.monotonic()
    with progress_bar(True, console=console) as bar:
        task = bar.add_task("features (train)", total=64, unit="images", info="")
        bar.advance(task, 32)
        time.sleep(0.65)  # one slow batch: the ticker must speak during it
        bar.advance(task, 32)
    took = time.monotonic() - t0
    text = out.getvalue()
    assert "\r" not in text and "\x1b" not in text
    lines = text.splitlines()
    assert lines[0] == "features (train): 0/64 images, 0%, elapsed 0:00, ETA unknown"
    assert lines[-1].startswith("features (train): 64/64 images, 100%, elapsed") and lines[-1].endswith("done")
    during = [ln for ln in lines[1:-1] if "32/64 images, 50%" in ln]
    assert len(during) >= 3, text  # ~6 intervals of 0.1 s passed inside the slow step
    assert all("ETA" in ln for ln in during)
    assert len(lines) <= took / 0.1 + 4  # and not a line per ticker wake-up (every 0.025 s) either


def test_heartbeat_speaks_when_nothing_else_did_and_only_then(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(prog.INTERVAL_ENV, "0.1")
    monkeypatch.setenv("TTY_INTERACTIVE", "0")
    out = io.StringIO()
    with prog.heartbeat("train", stream=out):
        time.sleep(0.65)  # a silent stage (loading weights, a bootstrap): beats every ~0.1 s
    beats = out.getvalue().splitlines()
    assert 3 <= len(beats) <= 8, beats
    assert all(re.fullmatch(r"train: working, elapsed 0:0\d.*", b) for b in beats), beats
    out = io.StringIO()
    with prog.heartbeat("train", stream=out):
        for _ in range(13):  # something else prints every 0.05 s: no beat is needed
            prog.note_output()
            time.sleep(0.05)
    assert out.getvalue() == ""
    out = io.StringIO()
    with prog.heartbeat("train", enabled=False, stream=out):  # --quiet
        time.sleep(0.3)
    assert out.getvalue() == ""


def test_tty_interactive_0_gives_plain_lines_on_a_terminal(terminal, monkeypatch: pytest.MonkeyPatch) -> None:
    console, out = terminal
    monkeypatch.setenv("TTY_INTERACTIVE", "0")  # e.g. a CI that sets FORCE_COLOR
    with progress_bar(True, console=console) as bar:
        bar.advance(bar.add_task("predicting", total=2, unit="batches"), 2)
    assert out.getvalue().splitlines() == ["predicting: 0/2 batches, 0%, elapsed 0:00, ETA unknown",
                                           "predicting: 2/2 batches, 100%, elapsed 0:00, done"]


def test_disabled_prints_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    with progress_bar(False) as bar:
        bar.update(bar.add_task("x", total=3), advance=1, info="y")
    assert capsys.readouterr().err == ""


def test_on_a_terminal_a_log_line_prints_above_the_bar_and_no_bar_is_reprinted(terminal, terminal_log) -> None:
    console, out = terminal
    log, handler = terminal_log
    for epoch in (1, 2):
        with progress_bar(True, console=console) as bar:
            task = bar.add_task(f"epoch {epoch}/2 [head]", total=4, unit="batches", info="")
            for i in range(4):
                time.sleep(0.03)
                bar.update(task, advance=1, info=f"loss {1 / (i + 1):.3f}")
                if i == 1:
                    log.warning("a log line during epoch %d", epoch)
        console.print(f"epoch {epoch} done", markup=False)  # what the CLI prints after each epoch
    assert handler.stream is out  # the handler is given back its stream
    shown = screen(out.getvalue())
    assert [ln.split(" ━")[0] for ln in shown] == [
        "WARNING medtransfer.test: a log line during epoch 1",
        "epoch 1/2 [head]",  # finished row, printed once, "[head]" not swallowed as rich markup
        "epoch 1 done",
        "WARNING medtransfer.test: a log line during epoch 2",
        "epoch 2/2 [head]",
        "epoch 2 done",
    ], "\n".join(shown)
    assert "4/4 batches" in shown[1] and "loss 0.250" in shown[1]


def test_nested_bars_share_one_display_and_transient_ones_vanish(terminal) -> None:
    console, out = terminal
    with progress_bar(True, console=console, transient=True) as outer:
        task = outer.add_task("epoch 1/1 [all]", total=2, unit="batches", info="")
        with progress_bar(True, console=console) as inner:  # e.g. a feature pass inside
            sub = inner.add_task("features (val)", total=10, unit="images", info="")
            inner.advance(sub, 10)
        outer.advance(task, 2)
    console.print("epoch 1 done", markup=False)
    shown = screen(out.getvalue())
    assert [ln.split(" ━")[0] for ln in shown] == ["features (val)", "epoch 1 done"], "\n".join(shown)
    assert prog._live is None


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.training.conftest import make_tiny_dataset

    return make_tiny_dataset(tmp_path_factory.mktemp("tiny") / "data")


def _tiny_train_command(data: Path, out: Path, *extra: str) -> list[str]:
    from tests.training.conftest import TINY_OVERRIDES

    sets = [a for o in [*TINY_OVERRIDES, "train.epochs=2", *extra] for a in ("--set", o)]
    return [sys.executable, "-c", "from medtransfer.cli import main; main()", "train", str(data),
            "--out", str(out), "--device", "cpu", *sets]


@pytest.mark.slow
def test_a_piped_train_writes_timed_lines_inside_every_stage(tiny_data: Path, tmp_path: Path) -> None:
    # `medtransfer train ... > log 2>&1` used to write a line per epoch and nothing inside a stage (a 427-s
    # frozen-feature pass was silent). With the interval at 0.2 s, no two lines may be far apart while it works.
    # 224 px in batches of 2 makes the unfrozen epoch last several intervals (~1 s on 2 cores) however fast the
    # machine, so that lines inside it can be asked for.
    interval = 0.2
    env = {**os.environ, prog.INTERVAL_ENV: str(interval), "COLUMNS": "200"}
    command = _tiny_train_command(tiny_data, tmp_path / "run", "input.size=[224, 224]", "train.batch_size=2")
    proc = subprocess.Popen(command, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, env=env, cwd=tmp_path)
    stamped: list[tuple[float, str]] = []
    assert proc.stdout is not None
    for raw in proc.stdout:  # one line at a time, stamped as it arrives
        stamped.append((time.monotonic(), raw.decode("utf-8", "replace").rstrip("\n")))
    assert proc.wait(timeout=300) == 0, "\n".join(t for _, t in stamped)
    text = "\n".join(t for _, t in stamped)
    assert "\r" not in text and "\x1b" not in text, text
    lines = [(t, ln) for t, ln in stamped if re.search(r": \d+(/\d+)? \w+, ", ln)]
    stages = {ln.split(": ")[0] for _, ln in lines}
    assert {"features (train)", "features (val)", "epoch 1/2 [head]", "epoch 2/2 [all]"} <= stages, text
    assert all("elapsed" in ln for _, ln in lines), text
    # lines inside a stage, not only its first and last: the unfrozen epoch takes several intervals
    inside = [ln for _, ln in lines if ln.startswith("epoch 2/2 [all]") and "ETA" in ln and " 0%" not in ln]
    assert inside, text
    # from the first line to the end (model loading, calibration and saving too: the heartbeat covers them)
    work = [t for t, _ in stamped]
    gaps = [b - a for a, b in zip(work, work[1:], strict=False)]
    assert max(gaps) < 10 * interval, (max(gaps), text)  # scaled: the default 30 s interval gives ~35 s
