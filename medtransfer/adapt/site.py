"""``medtransfer adapt``: one command from a new hospital's scans to a site profile, and ``--site`` to use it.

:func:`adapt` indexes the site's folder (labels optional: an unlabelled folder is a normal input), checks for a
shift against the run's own data (:func:`~medtransfer.adapt.shift.check_shift`), adapts what the evidence says
helps (:func:`~medtransfer.adapt.adaptation.adapt_site`) and writes ``RUN/sites/<name>/``:

- ``shift.json``: the shift check (``shift``, ``p_value``, ``domain_auroc``, ... and the one-line verdict);
- ``profile.json`` (+ ``bn_stats.safetensors`` when BatchNorm statistics were re-estimated): the site profile,
  tied to the run by its model card's SHA-256 (a profile of another run is refused);
- ``adaptation.csv``: every option tried, with its holdout metrics and CIs when labels were given;
- ``manifest.csv`` / ``quarantine.csv``: the site's cases as indexed (pseudonymous, like every manifest).

:func:`load_site` gives the run as the profile adapts it; ``predict --site``, ``evaluate --site`` and
``report --site`` go through it.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from medtransfer import io
from medtransfer.data.manifest import Manifest
from medtransfer.errors import ConfigError, ManifestError, RunDirError
from medtransfer.evaluation.evaluate import index_external
from medtransfer.run_dir import Run, load_run

logger = logging.getLogger(__name__)

#: Where a run keeps its site profiles: ``RUN/sites/<name>``.
SITES_DIR = "sites"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


@dataclass
class AdaptResult:
    """What :func:`adapt` found and kept.

    Attributes:
        name: the site's name; ``folder``: where its files are.
        shift: the shift check (:class:`~medtransfer.adapt.shift.ShiftReport`).
        profile: the site profile (:class:`~medtransfer.adapt.profile.SiteProfile`).
        table: every option tried, with holdout metrics and CIs (labels given), or the unlabelled evidence.
        notes: what was and was not applied, and why.
    """

    name: str
    folder: Path
    shift: Any
    profile: Any
    table: pd.DataFrame
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """The lines the CLI prints: verdict, what the profile applies, where it is."""
        applied = ", ".join(self.profile.options) if self.profile.options else "nothing (the model as trained)"
        lines = [f"shift check: {self.shift.verdict}", f"site profile '{self.name}' applies: {applied}"]
        lines += [f"note: {n}" for n in self.notes]
        lines.append(f"written to {self.folder} (use it with --site {self.name})")
        return "\n".join(lines)


def site_folder(run: Run, name: str) -> Path:
    """``RUN/sites/<name>``, after checking that ``name`` is a plain folder name."""
    if not _NAME.match(name):
        raise ConfigError(f"site name {name!r}: use letters, digits, '.', '_' or '-' (up to 64), e.g. 'hospital-b'")
    return run.path / SITES_DIR / name


def adapt(run_or_path: Run | str | os.PathLike[str], site_data: str | os.PathLike[str], *,
          labels: str | os.PathLike[str] | None = None, name: str | None = None,
          out: str | os.PathLike[str] | None = None, seed: int = 0, n_boot: int = 1000, head: bool = True,
          progress: bool = False) -> AdaptResult:
    """Check a new site's scans for a shift, adapt the run to it, and write the site profile.

    Args:
        run_or_path: the trained run (or its folder).
        site_data: the site's scan folder; labels are optional.
        labels: a labels CSV for some or all of the site's scans (50-200 cases are enough): temperature and
            operating point are then refitted on part of them and every option is judged on the rest.
        name: the site's name (default: the folder's name); ``--site NAME`` finds the profile by it.
        out: where to write (default ``RUN/sites/<name>``).
        seed, n_boot: the split of the labelled cases, permutations and bootstrap resamples.
        head: with labels, also try fine-tuning the classification head on the adapt part (kept only when
            the holdout shows it better, like every option).
        progress: progress bars on stderr.

    Returns:
        The :class:`AdaptResult` (also written to ``out``).

    Raises:
        ManifestError: no usable scans in ``site_data``.
        RunDirError: ``run_or_path`` is not a finished run.

    Examples:
        >>> result = adapt("runs/cxr", "hospital_b/", name="hospital-b")  # doctest: +SKIP
        >>> print(result.summary())  # doctest: +SKIP
    """
    from medtransfer.adapt.adaptation import adapt_site
    from medtransfer.adapt.shift import check_shift

    run = run_or_path if isinstance(run_or_path, Run) else load_run(run_or_path)
    folder_in = Path(site_data).expanduser()
    if not folder_in.is_dir():
        raise ManifestError(f"{site_data}: not a folder. Pass the new site's scan folder.")
    site_name = name or folder_in.resolve().name
    folder = Path(out) if out is not None else site_folder(run, site_name)
    site = _index_site(run, folder_in, labels, progress)
    logger.info("site %s: %d case(s)%s", site_name, len(site), " with labels" if site.has_labels else "")
    shift = check_shift(run, site, n_perm=max(200, n_boot), seed=seed, progress=progress)
    profile, table = adapt_site(run, site, labels_available=site.has_labels, seed=seed, n_boot=n_boot,
                                progress=progress, shift_detected=bool(shift.shift), name=site_name, head=head)
    site.save(folder)
    io.write_json(folder / "shift.json", shift.to_json())
    with io.atomic_path(folder / "adaptation.csv") as tmp:
        table.to_csv(tmp, index=False)
    profile.save(folder)
    return AdaptResult(site_name, folder, shift, profile, table, list(profile.notes))


def load_site(run_or_path: Run | str | os.PathLike[str], site: str | os.PathLike[str]) -> Run:
    """The run as site profile ``site`` adapts it (a name under ``RUN/sites/`` or a profile folder).

    Raises:
        RunDirError: no such profile (the message lists the run's profiles), or a profile of another run.
    """
    from medtransfer.adapt.profile import SiteProfile

    run = run_or_path if isinstance(run_or_path, Run) else load_run(run_or_path)
    given = Path(site).expanduser()
    folder = given if given.is_dir() and (given / "profile.json").is_file() else run.path / SITES_DIR / str(site)
    if not (folder / "profile.json").is_file():
        known = sorted(p.parent.name for p in (run.path / SITES_DIR).glob("*/profile.json"))
        raise RunDirError(f"no site profile '{site}' for {run.path} (profiles: {', '.join(known) or 'none'}); "
                          f"make one with 'medtransfer adapt {run.path} SITE_FOLDER --name {site}'")
    return SiteProfile.load(folder, run).apply(run)


def _index_site(run: Run, folder: Path, labels: Any, progress: bool) -> Manifest:
    """The site's cases (split ``site``): labelled with the card's classes when a labels CSV or class folders
    say so, else an unlabelled inventory."""
    return index_external(run, folder, labels, progress, split="site", require_labels=False)
