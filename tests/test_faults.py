"""Fault points: inert unless armed; armed in-process by ``faults.arm`` or in a child process by its environment."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from medtransfer import faults, io

KILLED = -9


def _child(code: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(faults.ENV_PREFIX)}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env={**clean, **env}, cwd=cwd,
                          capture_output=True, text=True, timeout=120)


def test_unarmed_points_do_nothing(tmp_path: Path) -> None:
    faults.point("write", tmp_path / "x.json")
    faults.point("step")
    assert io.write_text(tmp_path / "x.json", "ok").read_text() == "ok"


def test_armed_write_fails_at_the_nth_matching_write_and_keeps_the_previous_file(tmp_path: Path) -> None:
    card = io.write_text(tmp_path / "model_card.json", "old")
    with faults.arm("write", match="model_card.json", nth=2):
        io.write_text(tmp_path / "other.json", "fine")  # does not match: not counted
        io.write_text(card, "first")  # hit 1
        with pytest.raises(faults.InjectedFault):
            io.write_text(card, "second")  # hit 2: fails after the temporary is written, before the rename
        io.write_text(card, "third")  # hit 3: fires once only
    assert card.read_text() == "third" and (tmp_path / "other.json").read_text() == "fine"
    assert not list(tmp_path.glob(".tmp-*"))


def test_failure_before_the_rename_leaves_the_final_name_untouched(tmp_path: Path) -> None:
    card = io.write_text(tmp_path / "model_card.json", "old")
    with faults.arm("write", match="*.json"), pytest.raises(faults.InjectedFault):
        io.write_text(card, "new")
    assert card.read_text() == "old"
    io.write_text(card, "new")  # disarmed when the block ended
    assert card.read_text() == "new"


def test_arm_restores_the_previous_state_and_leaves_the_environment_alone(tmp_path: Path) -> None:
    fired: list[str] = []
    before = dict(os.environ)
    with faults.arm("step", nth=1, action=lambda: fired.append("outer")):
        with faults.arm("step", nth=2, action=lambda: fired.append("inner")):
            faults.point("step")
            faults.point("step")
        assert dict(os.environ) == before
        faults.point("step")  # the outer fault again, with its own count
    faults.point("step")
    assert fired == ["inner", "outer"]


def test_stepper_hits_the_step_point_before_updating_the_weights() -> None:
    import torch
    from torch import nn

    from medtransfer.training.loop import Stepper

    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    stepper = Stepper(model=model, optimizer=opt, scheduler=None, interval="epoch", loss_fn=nn.MSELoss(),
                      device=torch.device("cpu"), amp=None, scaler=torch.amp.GradScaler("cpu", enabled=False))
    x, y = torch.ones(4, 3), torch.zeros(4, 1)
    with faults.arm("step", nth=2):
        stepper.step(x, y)
        after_first = model.weight.detach().clone()
        with pytest.raises(faults.InjectedFault):
            stepper.step(x, y)
    assert torch.equal(model.weight, after_first)


def test_a_child_armed_through_its_environment_is_killed_at_the_nth_matching_write(tmp_path: Path) -> None:
    code = """
        from medtransfer import io
        io.write_text("state.json", "1")
        io.write_text("other.txt", "x")
        io.write_text("state.json", "2")
        io.write_text("after.txt", "never")
    """
    proc = _child(code, faults.subprocess_env("write", match="state.*", nth=2), tmp_path)
    assert proc.returncode == KILLED, proc.stderr[-2000:]
    assert (tmp_path / "state.json").read_text() == "1" and not (tmp_path / "after.txt").exists()
    assert len(list(tmp_path.glob(".tmp-state.json.*"))) == 1  # killed between writing and renaming


def test_the_environment_is_read_on_first_use_not_at_import(tmp_path: Path) -> None:
    # Armed only after medtransfer.io (and the training loop's modules) are imported: it still fires.
    code = """
        import os
        from medtransfer import faults, io
        os.environ.update(faults.subprocess_env("step", nth=2))
        faults.point("step")
        print("step 1", flush=True)
        faults.point("step")
        print("step 2", flush=True)
    """
    proc = _child(code, {}, tmp_path)
    assert proc.returncode == KILLED, proc.stderr[-2000:]
    assert proc.stdout.split() == ["step", "1"]


def test_a_malformed_variable_does_not_break_import_and_is_reported_on_first_use(tmp_path: Path) -> None:
    code = """
        from medtransfer import io
        try:
            io.write_text("a.txt", "x")
        except ValueError as exc:
            print(exc)
    """
    proc = _child(code, {"MEDTRANSFER_FAULT_KILL_AT_STEP": "three"}, tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "KILL_AT_STEP='three'" in proc.stdout and not (tmp_path / "a.txt").exists()


def test_bad_arguments_say_what_to_do() -> None:
    with pytest.raises(ValueError, match="choose from"):
        faults.subprocess_env("read", match="*")
    with pytest.raises(ValueError, match="needs match"):
        faults.subprocess_env("write")
    with pytest.raises(ValueError, match="no subject"):
        faults.subprocess_env("step", match="*.json")
    with pytest.raises(ValueError, match="counted from 1"), faults.arm("step", nth=0):
        pass
    assert faults.subprocess_env("write", match="*.png") == {"MEDTRANSFER_FAULT_KILL_IN_WRITE": "*.png:1"}
