"""``predict``: score scans with a trained run and (optionally) write the table, for ``medtransfer predict``.

A thin public entry over :meth:`medtransfer.run_dir.Run.predict`, which runs the one inference path
(:mod:`medtransfer.inference`); the columns are documented there. With ``dicom_out`` the results of DICOM
inputs are also filed back into their studies (:mod:`medtransfer.deploy.dicom`), which is why this module sits
in the deploy layer (``tests/test_import_graph.py``).
"""

from __future__ import annotations

import os

import pandas as pd

from medtransfer import distributed, io
from medtransfer._optional import require
from medtransfer.data.manifest import Manifest
from medtransfer.deploy.dicom import write_dicom_outputs
from medtransfer.errors import ConfigError
from medtransfer.run_dir import Run, ScanPaths, load_run


def predict(run: Run | str | os.PathLike[str], data: Manifest | ScanPaths, *, batch_size: int = 32,
            device: str = "auto", out: str | os.PathLike[str] | None = None, progress: bool = False,
            dicom_out: str | os.PathLike[str] | None = None) -> pd.DataFrame:
    """Score cases with a trained run: new scan files and folders, or the cases of a Manifest.

    Args:
        run: a loaded run or its directory.
        data: scan files and/or folders (→ ``case_id``, ``file``, calibrated ``p_<class>``, ``pred_<class>`` at
            the stored operating point, ``predicted``, ``error``), or a :class:`Manifest` (→ the full predictions
            table, as ``predictions.csv``).
        batch_size, device, progress: inference settings.
        out: also write the table there as CSV (atomically).
        dicom_out: also write DICOM outputs for the DICOM inputs into this folder, one sub-folder per study:
            a Structured Report, heat-map Secondary Captures and an Encapsulated PDF result sheet, filed into
            the source study (:func:`medtransfer.deploy.dicom.write_dicom_outputs`; needs the ``dicom-out``
            extra). The table then gains ``dicom_out`` (the case's study folder) and ``dicom_note`` (why a case
            has no, or incomplete, DICOM outputs: PNG/JPEG/NIfTI inputs have no study to attach to).

    Returns:
        The table, one row per case; unreadable files are rows with an ``error``, never a crash.

    Raises:
        ConfigError: ``dicom_out`` with a Manifest (it needs scan files or folders).
        MissingDependency: ``dicom_out`` without highdicom (``pip install "medtransfer[dicom-out]"``).

    Examples:
        >>> import medtransfer as mt
        >>> mt.predict("runs/cxr1", "new_scans/", out="predictions.csv")  # doctest: +SKIP
    """
    if dicom_out is not None:  # refused before minutes of inference, not after
        if isinstance(data, Manifest):
            raise ConfigError("dicom_out needs scan files or folders (the DICOM objects are filed into the studies "
                              "of those files); pass the files instead of a Manifest.")
        require("highdicom", extra="dicom-out", purpose="DICOM outputs (--dicom-out)")
    loaded = run if isinstance(run, Run) else load_run(run)
    table = loaded.predict(data, batch_size=batch_size, device=device, progress=progress)
    if dicom_out is not None and distributed.is_main():
        table = write_dicom_outputs(loaded, table, dicom_out, device=device).annotate(table)
    if out is not None and distributed.is_main():  # under torchrun every rank has the table; rank 0 writes it
        with io.atomic_path(out) as tmp:
            table.to_csv(tmp, index=False)
    distributed.barrier()
    return table
