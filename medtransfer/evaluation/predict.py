"""``predict``: score scans with a trained run and (optionally) write the table, for ``medtransfer predict``.

A thin public entry over :meth:`medtransfer.run_dir.Run.predict`, which runs the one inference path
(:mod:`medtransfer.inference`); the columns are documented there.
"""

from __future__ import annotations

import os

import pandas as pd

from medtransfer import distributed, io
from medtransfer.data.manifest import Manifest
from medtransfer.run_dir import Run, ScanPaths, load_run


def predict(run: Run | str | os.PathLike[str], data: Manifest | ScanPaths, *, batch_size: int = 32,
            device: str = "auto", out: str | os.PathLike[str] | None = None, progress: bool = False) -> pd.DataFrame:
    """Score cases with a trained run: new scan files and folders, or the cases of a Manifest.

    Args:
        run: a loaded run or its directory.
        data: scan files and/or folders (→ ``case_id``, ``file``, calibrated ``p_<class>``, ``pred_<class>`` at
            the stored operating point, ``predicted``, ``error``), or a :class:`Manifest` (→ the full predictions
            table, as ``predictions.csv``).
        batch_size, device, progress: inference settings.
        out: also write the table there as CSV (atomically).

    Returns:
        The table, one row per case; unreadable files are rows with an ``error``, never a crash.

    Examples:
        >>> import medtransfer as mt
        >>> mt.predict("runs/cxr1", "new_scans/", out="predictions.csv")  # doctest: +SKIP
    """
    loaded = run if isinstance(run, Run) else load_run(run)
    table = loaded.predict(data, batch_size=batch_size, device=device, progress=progress)
    if out is not None and distributed.is_main():  # under torchrun every rank has the table; rank 0 writes it
        with io.atomic_path(out) as tmp:
            table.to_csv(tmp, index=False)
    distributed.barrier()
    return table
