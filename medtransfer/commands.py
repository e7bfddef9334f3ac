"""Commands that medtransfer suggests to a user, built from the run's real path and the data's real columns.

A suggestion that fails when followed ("Run 'medtransfer audit demo'" for a run in ``runs/demo``; "re-run with
--subgroups sex,age_band,site" on data that has none of them) costs trust. Every command the console or the
report prints comes from :class:`Commands`: the run is named by its path relative to the working directory
(what the user typed, or would type), shell-quoted; subgroup options name only columns the data have.
Torch-free.
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

#: Subgroup columns medtransfer can break metrics down by, in the order it suggests them.
SUBGROUP_CANDIDATES = ("sex", "age_band", "site", "manufacturer", "view")


def run_ref(run_dir: str | os.PathLike[str], cwd: str | os.PathLike[str] | None = None) -> str:
    """How to name ``run_dir`` in a command typed in ``cwd`` (default: the current directory), shell-quoted.

    A path relative to ``cwd`` when the run lies inside it (``runs/demo``); otherwise the run folder's own
    name, to be typed from the folder that holds it (a ``../../`` path would spell out the absolute location,
    which may name a user or a patient study, and a report must not carry it).
    """
    here = Path(cwd) if cwd is not None else Path.cwd()
    target = Path(run_dir).absolute()
    try:
        rel = os.path.relpath(target, here.absolute())
    except ValueError:  # another drive on Windows: no relative path exists
        rel = ".."
    if rel == ".." or rel.startswith(("../", "..\\")):
        rel = target.name
    return shlex.quote(rel)


@dataclass(frozen=True)
class Commands:
    """Suggested commands for one run.

    Attributes:
        run: the run directory as it should be typed (see :func:`run_ref`).
        subgroup_columns: subgroup columns that hold at least one value in this run's data.
    """

    run: str
    subgroup_columns: tuple[str, ...] = ()

    @classmethod
    def for_run(cls, run_dir: str | os.PathLike[str], columns: Sequence[str] = ()) -> Commands:
        """Commands for ``run_dir``; ``columns``: the data's columns that hold values (manifest/predictions)."""
        present = tuple(c for c in SUBGROUP_CANDIDATES if c in set(columns))
        return cls(run_ref(run_dir), present)

    @property
    def evaluate(self) -> str:
        """Evaluate the run on its test split."""
        return f"medtransfer evaluate {self.run}"

    @property
    def evaluate_subgroups(self) -> str | None:
        """Evaluate with every subgroup column the data have; None when they have none."""
        if not self.subgroup_columns:
            return None
        return f"medtransfer evaluate {self.run} --subgroups {','.join(self.subgroup_columns)}"

    @property
    def explain(self) -> str:
        """Grad-CAM heat maps (with their sanity check) for the most confident hits and errors."""
        return f"medtransfer explain {self.run}"

    @property
    def explain_occlusion(self) -> str:
        """Occlusion heat maps (slower; finds small markers and text)."""
        return f"medtransfer explain {self.run} --method occlusion"

    @property
    def audit(self) -> str:
        """The transfer and shortcut audits on the run's own data."""
        return f"medtransfer audit {self.run}"

    @property
    def audit_transfer_quick(self) -> str:
        """The transfer audit alone, in its quick form (two strategies, one seed): minutes, not an hour."""
        return (f"medtransfer audit {self.run} --no-shortcuts --strategy linear-probe --strategy scratch "
                "--seeds 1")

    @property
    def audit_shortcuts(self) -> str:
        """The shortcut audit alone (site probe, leave-one-site-out): a few feature passes."""
        return f"medtransfer audit {self.run} --no-transfer"

    @property
    def report(self) -> str:
        """Render the report again."""
        return f"medtransfer report {self.run}"

    def evaluate_external(self, data: str = "EXTERNAL_FOLDER", labels: str = "LABELS.csv") -> str:
        """Evaluate on data from another site (placeholders for the user's folders)."""
        return f"medtransfer evaluate {self.run} --data {data} --labels {labels}"

    def how_to_add_subgroups(self) -> str:
        """What to do when the data carry no subgroup column at all (a sentence, not a command)."""
        return ("add sex, age and site columns to the labels CSV (or keep the DICOM tags PatientSex, PatientAge, "
                f"InstitutionName), train again, then run '{self.evaluate}'")
