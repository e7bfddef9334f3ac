"""``index_scans``: a folder of scans (+ labels) becomes a validated, pseudonymised, split :class:`Manifest`.

One pass over the folder (``os.scandir``; hidden files, non-image files such as CSV/JSON/text, ``DICOMDIR``
and our own output folder are skipped), then one header read per file (:mod:`medtransfer.data.headers`),
then grouping into cases, labels, demographics, pseudonymous keys, pixel verification and the split.

Rules others rely on:

* **Formats.** DICOM is recognised by content (``.dcm`` or any name, with or without the 128-byte preamble),
  NIfTI by ``.nii``/``.nii.gz``, PNG/JPEG by content. A file with an image extension whose content is not
  an image is quarantined; an unknown file without one is ignored.
* **Series grouping.** Single-frame DICOM slices of one SeriesInstanceUID form one case only for volumetric
  modalities (CT, MR, PT, NM) with ImagePositionPatient, in one folder or several; the case ``path`` is the
  deepest folder common to the slices and ``files`` lists them (sorted). Every other DICOM file is one case:
  radiographs (CR/DX/MG/...) of one series are separate images, and a multi-frame file is one case.
* **Volumes checked from headers, before any decoding** (each reason names the fix): slices that do not form
  one regular stack (``mixed_series``: sizes, orientations, shared positions; ``series_geometry``: a missing
  slice, uneven spacing, gantry tilt), two series whose case would be the same folder (``mixed_series``),
  slices tilted beyond ``data.max_obliquity`` (``oblique``), and more voxels than ``data.max_volume_voxels``
  (``too_large``).
* **Labels.** Class sub-folders (the first folder below the data folder) or a labels CSV. A folder without
  labels (no CSV, no scan in a class sub-folder), or with a single class, is refused when labels are required
  (training, evaluation: "need at least two classes") and is otherwise (``require_labels=False``, what
  ``medtransfer index`` does) an *inventory*: a Manifest with task ``"unlabelled"``, no label column and no
  split (see :mod:`medtransfer.data.manifest` for why no split).
* **Patients.** ``patient_key`` is the pseudonym of the CSV ``patient_id``, else of PatientID; without either,
  the study stands in for the patient, and last the case itself, with a warning that patient-level leakage
  cannot then be ruled out.
* **Symlinks.** Directory links are never followed (so link loops cannot hang the walk; they are counted in a
  warning); file links are read only when they resolve inside the data folder, else quarantined.
* **Warnings** are collected in ``Manifest.warnings`` (also in ``manifest.json``/``summary.json``, printed by
  ``render_summary``) and logged at INFO, so the CLI does not show them twice.
* **Privacy.** Warnings and logs carry counts and pseudonymous keys only, never file names; only the ``path``
  and ``files`` columns of ``manifest.csv`` and the ``path`` column of ``quarantine.csv`` name files.
* **Parallel header reading and pixel check.** From :data:`PARALLEL_MIN_FILES` files on, headers are read by a
  pool of worker processes (``workers``; default :func:`index_workers`) in chunks of 64-256 files, and so is the
  pixel check (``data.verify_pixels``: every case decoded once; chunks of whole cases, ~64-256 files each; a
  worker sends back each case's dimensionality or quarantine reason, never pixels). Results are applied in the
  walk's (headers) and the rows' (pixels) order, so the manifest and ``quarantine.csv`` are byte-identical to
  one worker's, whatever the worker count or the order chunks finish in. Workers start with ``forkserver``
  (``spawn`` where there is none), never ``fork``: a forked child of a multi-threaded process (torch's thread
  pools in ``train``, progress and log threads) can inherit locks that no thread of its own will ever release.
  As with any such pool, a script that indexes a large folder needs the ``if __name__ == "__main__":`` guard.
  A worker process that dies (killed, out of memory) makes its unread chunks fall back to this process, with a
  warning. Inside a daemonic process (a DataLoader worker), which may not have children, both run in-process.
"""

from __future__ import annotations

import logging
import math
import multiprocessing
import numbers
import os
import posixpath
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar

import pandas as pd

from medtransfer import io
from medtransfer.config import DataConfig
from medtransfer.cpu import usable_cpus
from medtransfer.data.headers import (
    HeaderProblem,
    ScanHeader,
    merge_fields,
    oblique_problem,
    read_header_chunk,
    series_problem,
    too_large_reason,
)
from medtransfer.data.labels import LabelTable, folder_label, match_rows, read_labels_csv, resolve_classes
from medtransfer.data.manifest import (
    ACQ_COLUMNS,
    ID_COLUMNS,
    QUARANTINE_COLUMNS,
    SUBGROUP_COLUMNS,
    Manifest,
    Task,
    write_quarantine,
)
from medtransfer.data.privacy import pseudonym
from medtransfer.data.splits import assign_splits, resolve_keys, split_warnings
from medtransfer.data.summary import summary_dict
from medtransfer.errors import ConfigError, ManifestError, ScanReadError
from medtransfer.progress import progress_bar

logger = logging.getLogger(__name__)
A = TypeVar("A")
R = TypeVar("R")

IMAGE_SUFFIXES = frozenset({".dcm", ".dicom", ".dic", ".ima", ".nii", ".nii.gz", ".png", ".jpg", ".jpeg"})
#: Never opened: text, tables, archives, documents. Everything else is sniffed by content.
SKIP_SUFFIXES = frozenset(
    {".csv", ".tsv", ".txt", ".md", ".rst", ".json", ".yaml", ".yml", ".xml", ".html", ".htm", ".pdf", ".py",
     ".log", ".zip", ".gz", ".tar", ".tgz", ".7z", ".db", ".sqlite", ".ini", ".cfg", ".toml", ".lock", ".xlsx",
     ".xls", ".doc", ".docx", ".sh", ".bat", ".pt", ".pth", ".npy", ".npz", ".pkl", ".safetensors"}
)
#: Header reading uses worker processes from this many candidate files on (the first pool of a process takes
#: ~1 s to start, later ones ~0.3 s; ~5 s when its fork server also imports the decoder), and so does the pixel
#: check from this many files to decode.
PARALLEL_MIN_FILES = 1000
#: The most worker processes :func:`index_workers` chooses by itself (header reading is mostly file I/O; a
#: pixel-checking worker also holds one decoded case at a time, which for a large volume is hundreds of MB).
MAX_AUTO_WORKERS = 8
_CHUNK_MIN, _CHUNK_MAX = 64, 256
_HEADER_PRELOAD = ("medtransfer.data.headers",)
#: torch + MONAI, and this module (the pixel workers' task): see _read_headers's then_pixels
_PIXEL_PRELOAD = ("medtransfer.data.loading", "medtransfer.data.discovery")
_Candidate = tuple[str, Path, int, bool]  # (rel, path, size, looks_like_image)
_Case = tuple[Path | list[Path], str]  # (the file, or a series' files; format): one case for the pixel check
_FORMATS_LOOKED_FOR = ("DICOM (by content: .dcm, .dicom, .ima or no extension), NIfTI (.nii, .nii.gz), PNG and "
                       "JPEG (.png, .jpg, .jpeg)")


@dataclass
class _State:
    """What one indexing run collects besides cases: quarantine rows, warnings and walk statistics."""

    root: Path
    strict: bool
    require_labels: bool = True
    quarantine: list[dict[str, str]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    existing: set[str] = field(default_factory=set)
    candidates: list[_Candidate] = field(default_factory=list)
    ignored: int = 0
    dir_links: int = 0
    loops: int = 0
    max_voxels: int | None = None
    max_obliquity: float | None = None

    def reject(self, exc: ScanReadError, problem: str | None = None) -> None:
        """Quarantine one file (or raise it, in strict mode)."""
        if self.strict:
            raise exc
        self.quarantine.append({"path": exc.path, "problem": problem or getattr(exc, "problem", "unreadable"),
                                "reason": exc.reason})

    def warn(self, message: str) -> None:
        """Record a warning for the manifest (and ``summary.json``); logged at INFO since the summary prints it."""
        self.warnings.append(message)
        logger.info("warning: %s", message)


def index_scans(
    data_dir: str | Path,
    *,
    labels: str | Path | None = None,
    label_columns: Sequence[str] | None = None,
    config: DataConfig | None = None,
    out_dir: str | Path | None = None,
    strict: bool | None = None,
    spatial_dims: int | None = None,
    require_labels: bool = True,
    progress: bool = False,
    workers: int | None = None,
) -> Manifest:
    """Index a scan folder into a :class:`Manifest`: cases, labels, demographics, pseudonymous keys, split.

    Args:
        data_dir: the scan folder (class sub-folders, or any layout with ``labels``).
        labels: labels CSV (``path`` relative to ``data_dir``); None uses ``config.labels``, else class folders.
        label_columns: 0/1/blank CSV columns for a multi-label task; None uses ``config.label_columns``.
        config: split fractions, seed, age bands, strictness, pixel verification; defaults to ``DataConfig()``.
        out_dir: when given, ``manifest.csv``, ``manifest.json``, ``quarantine.csv`` and ``summary.json`` are
            written there atomically (``quarantine.csv`` also when indexing fails).
        strict: raise at the first unusable file instead of quarantining it; None uses ``config.strict``.
        spatial_dims: 2 or 3 to keep only images or only volumes (``input.size`` of the model they are for);
            the others are quarantined (problem ``dims``) instead of failing training later. None keeps both.
        require_labels: True (the default; what training and evaluation need) refuses a folder without at least
            two classes. False accepts it as an inventory: without labels, or with a single class, the result
            is a Manifest with task ``"unlabelled"`` (no classes, no label column, no split).
        progress: show rich progress bars (the CLI passes True unless ``--quiet``).
        workers: processes that read headers, and then check pixels, when the folder has at least
            :data:`PARALLEL_MIN_FILES` candidate files (files to decode); 1 does it here. None:
            :func:`index_workers`. The result does not depend on it.

    Returns:
        The manifest; ``manifest.quarantine`` lists the files left out and why.

    Raises:
        ManifestError: no scans, bad labels CSV, fewer than two classes (with ``require_labels``), patient
            leakage in a given split.
        ConfigError: ``workers`` below 1.
        ScanReadError: in strict mode, the first unusable file.

    Examples:
        >>> m = index_scans("scans/", out_dir="runs/index")  # doctest: +SKIP
        >>> m.df.groupby(["split", "label"]).size()  # doctest: +SKIP
        >>> inventory = index_scans("pacs_export/", require_labels=False)  # doctest: +SKIP
        >>> inventory.task, inventory.df["modality"].value_counts()  # doctest: +SKIP
    """
    cfg = config or DataConfig()
    n_workers = index_workers(workers)
    root = _check_root(data_dir)
    labels = labels if labels is not None else cfg.labels
    columns = list(label_columns or cfg.label_columns or []) or None
    state = _State(root, cfg.strict if strict is None else strict, require_labels, max_voxels=cfg.max_volume_voxels,
                   max_obliquity=cfg.max_obliquity)
    table = read_labels_csv(labels, root, label_columns=columns) if labels is not None else None
    try:
        _walk(root, _inside(root, out_dir), state)
        df = _cases(_read_headers(state, progress, n_workers, then_pixels=cfg.verify_pixels), state)
        df = _attach_labels(df, table, state)
        if cfg.verify_pixels:
            df = _verify_pixels(df, state, progress, n_workers, spatial_dims)
        elif spatial_dims is not None:
            df = _keep_dims(df, df["frames"].fillna(1).astype(int).gt(1).map({True: 3, False: 2}), state,
                            spatial_dims)
        manifest = _finish(df, table, cfg, state)
    except ManifestError:
        if out_dir is not None:
            write_quarantine(Path(out_dir) / "quarantine.csv", _quarantine_frame(state))
        raise
    if out_dir is not None:
        manifest.save(out_dir)
        io.write_json(Path(out_dir) / "summary.json", summary_dict(manifest))
    _log_quarantine(manifest, out_dir)
    return manifest


def _log_quarantine(manifest: Manifest, out_dir: str | Path | None) -> None:
    """One warning naming how many files were left out and why (every command that indexes shows it)."""
    q = manifest.quarantine
    if not len(q):
        return
    counts = ", ".join(f"{k}: {v}" for k, v in q["problem"].value_counts().items())
    where = f"{Path(out_dir) / 'quarantine.csv'}" if out_dir is not None else "manifest.quarantine"
    logger.warning("%d file(s) could not be used and were quarantined (%s); each file and reason is in %s",
                   len(q), counts, where)


def _check_root(data_dir: str | Path) -> Path:
    root = Path(data_dir).expanduser()
    if not root.exists():
        raise ManifestError(f"{root}: data folder not found. Pass the folder that holds your scans.")
    if not root.is_dir():
        raise ManifestError(f"{root}: is a file, not a folder. Pass the folder that holds your scans.")
    return root.resolve()


def _inside(root: Path, out_dir: str | Path | None) -> str | None:
    """``out_dir`` relative to ``root`` when it lies inside it (so the walk skips our own outputs)."""
    if out_dir is None:
        return None
    out = Path(out_dir).expanduser().resolve()
    return out.relative_to(root).as_posix() if out != root and out.is_relative_to(root) else None


def scan_suffix(name: str) -> str:
    """The lower-case extension that decides a file's kind (``.nii.gz`` counts as one)."""
    lower = name.lower()
    return ".nii.gz" if lower.endswith(".nii.gz") else os.path.splitext(lower)[1]


def _walk(root: Path, skip: str | None, state: _State) -> None:
    """List every file once (sorted, hidden entries skipped), recording candidates for header reading."""
    stack: list[tuple[str, str]] = [(str(root), "")]
    while stack:
        folder, prefix = stack.pop()
        try:
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as exc:
            state.warn(f"a folder could not be listed ({type(exc).__name__}); its scans were skipped. Check "
                       "the folder permissions.")
            continue
        for entry in entries:
            rel = prefix + entry.name
            if entry.name.startswith(".") or rel == skip:
                continue
            if entry.is_symlink():
                _link(entry, rel, root, state)
            elif entry.is_dir(follow_symlinks=False):
                state.existing.add(rel)
                stack.append((entry.path, rel + "/"))
            elif entry.is_file(follow_symlinks=False):
                _consider(rel, Path(entry.path), entry.stat(follow_symlinks=False).st_size, state)
    if state.dir_links:
        loops = f", {state.loops} of them forming loops" if state.loops else ""
        state.warn(f"{state.dir_links} folder symlink(s) were not followed{loops}; copy or bind-mount the "
                   "folders into the data folder if their scans belong to this dataset.")


def _link(entry: os.DirEntry[str], rel: str, root: Path, state: _State) -> None:
    """A symlink: folders are never followed (loops are counted); files only when they stay inside ``root``."""
    try:
        target = Path(entry.path).resolve(strict=True)
    except (OSError, RuntimeError):  # dangling, or a loop of links
        state.dir_links += 1
        state.loops += 1
        return
    if target.is_dir():
        state.dir_links += 1
        parent = Path(entry.path).parent.resolve()
        state.loops += int(parent == target or parent.is_relative_to(target))
        return
    if not target.is_relative_to(root):
        state.existing.add(rel)
        if scan_suffix(entry.name) not in SKIP_SUFFIXES:
            state.reject(HeaderProblem(rel, "symbolic link to a file outside the data folder; not read. Copy the "
                                            "file into the data folder instead.", "outside"))
        return
    _consider(rel, target, target.stat().st_size, state)


def _consider(rel: str, path: Path, size: int, state: _State) -> None:
    state.existing.add(rel)
    if posixpath.basename(rel).upper() == "DICOMDIR" or scan_suffix(rel) in SKIP_SUFFIXES:
        state.ignored += 1
        return
    try:
        rel.encode("utf-8")
    except UnicodeEncodeError:  # undecodable bytes in the name: manifest.csv (UTF-8) could not name the file
        shown = rel.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
        state.reject(HeaderProblem(shown, "the file or folder name is not valid UTF-8; rename it", "bad_name"))
        return
    looks_like_image = scan_suffix(rel) in IMAGE_SUFFIXES or scan_suffix(path.name) in IMAGE_SUFFIXES
    state.candidates.append((rel, path, size, looks_like_image))


def index_workers(workers: int | None = None) -> int:
    """How many processes index (read headers, check pixels): ``workers`` when given, else the CPUs this process
    may use, at most 8.

    The CPUs are :func:`medtransfer.cpu.usable_cpus` (affinity mask, cgroup quota, ``MEDTRANSFER_NUM_THREADS``)
    and, under SLURM, no more than ``SLURM_CPUS_PER_TASK``. Beyond 8 processes header reading is bound by the
    file system rather than the CPUs.

    Raises:
        ConfigError: ``workers`` below 1.

    Examples:
        >>> index_workers(3)
        3
    """
    if workers is not None:
        if isinstance(workers, bool) or not isinstance(workers, numbers.Integral) or workers < 1:
            raise ConfigError(f"workers={workers!r}: the number of processes that read headers and check pixels "
                              "must be a whole number of at least 1 (1 does it in this process); leave it unset to "
                              "use the CPUs")
        return int(workers)
    n = usable_cpus()
    slurm = os.environ.get("SLURM_CPUS_PER_TASK", "").strip()
    if slurm.isdigit() and int(slurm) >= 1:
        n = min(n, int(slurm))
    return max(1, min(n, MAX_AUTO_WORKERS))


def _read_headers(state: _State, progress: bool, workers: int, *, then_pixels: bool = False
                  ) -> list[tuple[str, ScanHeader]]:
    """Sniff each candidate's format by content and read its header once; quarantine what cannot be used.

    Outcomes are applied in candidate order whether they come from this process or from worker processes, so
    quarantine rows, warnings and the strict-mode error are the same with any number of workers.
    ``then_pixels``: the pixel check follows, so a fork server started here also imports its decoder (torch,
    MONAI): the header pool then starts ~4 s later, but each pixel-checking worker starts in 0.1 s instead of
    ~9 s and shares those modules copy-on-write (~15 MB of its own instead of ~500 MB; docs/decisions.md).
    """
    items = state.candidates
    pool_size = _pool_size(len(items), workers)
    size = _chunk_size(len(items), pool_size)
    chunks = [items[i:i + size] for i in range(0, len(items), size)] if pool_size > 1 else [items]
    preload = (*_HEADER_PRELOAD, *_PIXEL_PRELOAD) if then_pixels else _HEADER_PRELOAD
    stage = _Stage(f"reading {len(items)} headers with {pool_size} processes (chunks of {size} files)",
                   "read headers", "header-reading", "files", "read", preload)
    out: list[tuple[str, ScanHeader]] = []
    with progress_bar(progress and bool(items), transient=True) as bar:
        task = bar.add_task("reading headers", total=len(items), unit="files",
                            info=f"{pool_size} processes" if pool_size > 1 else "")
        outcomes = _in_order(chunks, pool_size, read_header_chunk, lambda chunk: bar.advance(task, len(chunk)),
                             stage)
        try:
            for (rel, _, _, _), outcome in zip(items, outcomes, strict=True):
                if isinstance(outcome, HeaderProblem):
                    state.reject(outcome)
                elif outcome is None:  # not a scan: an unknown file, a DICOMDIR under another name
                    state.ignored += 1
                else:
                    out.append((rel, outcome))
        finally:
            outcomes.close()  # strict mode stops at the first problem: cancel the chunks not read yet
    logger.info("read %d headers; %d files ignored, %d quarantined", len(out), state.ignored, len(state.quarantine))
    return out


def _pool_size(n_files: int, workers: int) -> int:
    """Worker processes for ``n_files`` candidates: 1 (this process) for small folders, one worker, or inside a
    daemonic process (a DataLoader worker may not have children); else ``workers``, at most one per chunk."""
    if workers <= 1 or n_files < PARALLEL_MIN_FILES or multiprocessing.current_process().daemon:
        return 1
    return max(1, min(workers, math.ceil(n_files / _CHUNK_MIN)))


def _chunk_size(n_files: int, workers: int) -> int:
    """Files per task: ~4 chunks per worker (so a slow chunk does not idle the others), 64 to 256 files each
    (fewer would let inter-process traffic dominate, more would make the progress coarse)."""
    return max(_CHUNK_MIN, min(_CHUNK_MAX, math.ceil(n_files / (workers * 4))))


@dataclass(frozen=True)
class _Stage:
    """How one pooled stage of indexing names itself in logs, and what its fork server preloads."""

    started: str  # the INFO line once the pool runs
    verb: str  # "read headers": "could not start N processes to <verb>"
    worker: str  # "header-reading": "a <worker> process died"
    items: str  # what a chunk holds: "files", "cases"
    redo: str  # "read": "the <items> ... are <redo> in this process"
    preload: tuple[str, ...]


def _pool_context(preload: tuple[str, ...] = ()) -> multiprocessing.context.BaseContext:
    """``forkserver`` where the platform has it, else ``spawn``; never ``fork`` (see the module docstring).

    The fork server imports ``preload`` once (``set_forkserver_preload``), so each worker it forks starts warm
    instead of importing the modules itself: pydicom and pandas for headers (~0.6 s), torch and MONAI for the
    pixel check (~4-8 s and ~0.8 GB, then shared copy-on-write). A process has one fork server and its preload
    is fixed when it starts (by the first pool); a later pool that needs more imports them in each worker.
    """
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(list(preload))  # never __main__: a user's script must not run there
    return ctx


def _in_order(chunks: Sequence[Sequence[A]], pool_size: int, work: Callable[[Sequence[A]], list[R]],
              advance: Callable[[Sequence[A]], object], stage: _Stage,
              initializer: Callable[[], object] | None = None) -> Iterator[R]:
    """``work``'s result for every item of every chunk, in order: computed here, one item at a time (``pool_size``
    1), or by a pool of ``pool_size`` worker processes, one chunk per task. ``advance`` is called per chunk done.

    Order is what makes the outputs independent of the worker count: the caller applies results exactly as
    the in-process loop would. Closing the generator (strict mode's first error) cancels the chunks not started.
    """
    if pool_size <= 1:
        for chunk in chunks:
            for item in chunk:
                yield from work([item])
                advance([item])
        return
    pool: ProcessPoolExecutor | None = None
    try:
        pool = ProcessPoolExecutor(max_workers=pool_size, mp_context=_pool_context(stage.preload),
                                   initializer=initializer)
        futures: list[Future[list[R]]] = [pool.submit(work, chunk) for chunk in chunks]
    except (OSError, NotImplementedError) as exc:  # no semaphores, no processes left, ...
        logger.warning("could not start %d processes to %s (%s); the %s are %s in this process", pool_size,
                       stage.verb, type(exc).__name__, stage.items, stage.redo)
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
        yield from _in_order(chunks, 1, work, advance, stage)
        return
    logger.info("%s", stage.started)
    broken = False
    try:
        for chunk, future in zip(chunks, futures, strict=True):
            try:
                results = future.result()
            except BrokenProcessPool:
                if not broken:
                    logger.warning("a %s process died (killed, out of memory, or started by a script without an "
                                   "'if __name__ == \"__main__\":' guard); the %s it had not reported are %s in "
                                   "this process instead", stage.worker, stage.items, stage.redo)
                    broken = True
                results = work(chunk)
            advance(chunk)
            yield from results
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _cases(headers: list[tuple[str, ScanHeader]], state: _State) -> pd.DataFrame:
    """Group files into cases (see the module docstring) as a DataFrame sorted by path; volumes that cannot be
    used, by their headers, are quarantined here."""
    series: dict[str, list[tuple[str, ScanHeader]]] = {}
    rows: list[dict[str, Any]] = []
    for rel, header in headers:
        if header.is_volume_slice:
            series.setdefault(header.series_uid, []).append((rel, header))
        elif not _volume_refused(rel, header, header.frames, state):
            rows.append(_case_row([rel], header))
    volumes: dict[str, list[list[tuple[str, ScanHeader]]]] = {}
    for members in series.values():
        members.sort(key=lambda m: m[0])
        found = series_problem([h for _, h in members], max_obliquity=state.max_obliquity) if len(members) > 1 \
            else None
        if found:
            for rel, _ in members:
                state.reject(HeaderProblem(rel, found[1], found[0]))
            continue
        if len(members) == 1:
            rows.append(_case_row([members[0][0]], members[0][1]))
        else:
            volumes.setdefault(_series_folder([rel for rel, _ in members]), []).append(members)
    for folder, groups in volumes.items():
        if len(groups) > 1:  # two series would be one case, with one path and one label
            sizes = ", ".join(str(len(g)) for g in sorted(groups, key=len, reverse=True))
            reason = (f"this folder holds {len(groups)} series ({sizes} slices; SeriesInstanceUID differs) and a case "
                      "folder must hold one: move each series into its own folder")
            for rel, _ in (m for g in groups for m in g):
                state.reject(HeaderProblem(rel, reason, "mixed_series"))
            continue
        members = groups[0]
        if not _volume_refused(folder, members[0][1], len(members), state):
            rows.append(_case_row([rel for rel, _ in members], members[0][1]))
    if not rows:
        raise ManifestError(
            f"no scans found in {state.root}: looked for {_FORMATS_LOOKED_FOR}; {state.ignored} other file(s) "
            f"ignored, {len(state.quarantine)} quarantined (see quarantine.csv). Point to the folder that holds "
            "the scans."
        )
    return pd.DataFrame(rows).sort_values("path", kind="stable").reset_index(drop=True)


def _volume_refused(path: str, header: ScanHeader, depth: int, state: _State) -> bool:
    """Quarantine a volume (``depth`` slices or frames) that is too large or too oblique; True if it was."""
    if depth <= 1 or not header.rows or not header.cols:
        return False
    count = depth * header.rows * header.cols
    if state.max_voxels is not None and count > state.max_voxels:
        shown = f"{header.rows}x{header.cols}x{depth}"
        state.reject(HeaderProblem(path, too_large_reason(shown, count, state.max_voxels), "too_large"))
        return True
    # NIfTI here; DICOM series in series_problem. Multi-frame DICOM objects are not: a cine loop in an oblique
    # plane is a sequence of frames, not a volume to orient
    found = oblique_problem(header.obliquity if header.fmt == "nifti" else None, state.max_obliquity)
    if found:
        state.reject(HeaderProblem(path, found[1], found[0]))
        return True
    return False


def _series_folder(rels: list[str]) -> str:
    """The case path of a series: the deepest folder common to its files."""
    return posixpath.commonpath([posixpath.dirname(r) for r in rels]) or "."


def _case_row(rels: list[str], header: ScanHeader) -> dict[str, Any]:
    values = {f.name: getattr(header, f.name) for f in fields(header)}
    for internal in ("series_uid", "position", "orientation", "fmt", "obliquity", "extra_dims"):
        values.pop(internal)
    if len(rels) == 1:
        return {"path": rels[0], "files": "", "format": header.fmt, **values}
    return {"path": _series_folder(rels), "files": ";".join(rels), "format": header.fmt, **values, "frames": len(rels)}


def _attach_labels(df: pd.DataFrame, table: LabelTable | None, state: _State) -> pd.DataFrame:
    """Labels from class folders (first folder of the path) or from the CSV (plus its optional columns)."""
    if table is None:
        return _folder_labels(df, state)
    lookup = {p: i for i, p in enumerate(df["path"])}
    for i, files in enumerate(df["files"]):
        lookup.update({f: i for f in files.split(";") if f})
    quarantined = {q["path"] for q in state.quarantine}
    matched, not_scans = match_rows(table, lookup, existing=state.existing, quarantined=quarantined)
    for pos in not_scans:
        state.reject(HeaderProblem(table.df["path"].iloc[pos], "listed in the labels CSV but not a DICOM, NIfTI, "
                                   "PNG or JPEG scan; fix the path or remove the row", "not_a_scan"))
    unlisted = len(df) - len(matched)
    if unlisted:
        state.warn(f"{unlisted} scan(s) in the data folder are not listed in {table.name} and were ignored.")
    if not matched:
        raise ManifestError(f"none of the rows of {table.name} matched a readable scan; check that its paths are "
                            "relative to the data folder.")
    cases = sorted(matched)
    out = df.iloc[cases].reset_index(drop=True)
    rows = table.df.iloc[[matched[c] for c in cases]].reset_index(drop=True)
    for col in rows.columns.drop(["row", "path"]):
        target = col if col in (table.label_columns or ["label"]) else f"csv_{col}"
        out[target] = rows[col].to_numpy()
    return out


def _folder_labels(df: pd.DataFrame, state: _State) -> pd.DataFrame:
    """The class-folder layout: the first folder of each path is its class.

    Without two classes and with ``require_labels=False`` the folder is an inventory instead: every scan is
    kept (also those directly in the data folder) and no label column is added, since a single sub-folder is
    more likely a container (``DICOM/``, ``export/``) than a class, and one class teaches nothing anyway.
    """
    labels = df["path"].map(folder_label)
    top = int(labels.isna().sum())
    if not state.require_labels and labels.nunique() < 2:
        if labels.notna().any():
            state.warn(f"only one class sub-folder ({str(labels.dropna().iloc[0])!r}) holds scans; one class cannot "
                       "be trained on, so every scan is indexed as an unlabelled inventory.")
        return df
    if top == len(df):
        raise ManifestError(f"need at least two classes to train a classifier; found none: {len(df)} scan(s) found "
                            "but none in a class sub-folder, and no labels CSV was given. Put them in DATA/<class>/ "
                            "folders, or pass a labels CSV with --labels. To see what the folder holds without "
                            "labels, run 'medtransfer index DATA'.")
    if top:
        state.warn(f"{top} scan(s) directly in the data folder (not in a class sub-folder) were ignored.")
    return df.assign(label=labels)[labels.notna()].reset_index(drop=True)


#: What the pixel check makes of one case: its spatial dimensions (2 or 3), or why it is quarantined as
#: ``(reason, exception type)``, the type given only for an unexpected decoder failure (it is logged).
PixelOutcome = int | tuple[str, str | None]


def check_pixels_chunk(cases: Sequence[tuple[Path | list[Path], str]]) -> list[PixelOutcome]:
    """Decode each case ``(file or slice files, format)`` once, in order, and keep only what the index needs.

    The pixel check of indexing (``DataConfig.verify_pixels``) and the task of its worker processes: a
    top-level function, picklable under any start method. It imports :mod:`medtransfer.data.loading` (torch and
    MONAI, ~0.8 GB) when it runs, so that importing this module (and reading headers) never does. Each decoded
    array is dropped at once; what travels back is a small :data:`PixelOutcome` per case, never pixels.
    """
    from medtransfer.data.loading import load_case  # torch + MONAI: imported where pixels are decoded only
    from medtransfer.data.spec import InputSpec

    spec = InputSpec()
    out: list[PixelOutcome] = []
    for targets, fmt in cases:
        try:
            ndim = load_case(targets, fmt, spec).ndim
        except ScanReadError as exc:
            out.append((exc.reason, None))
        except Exception as exc:  # noqa: BLE001 - a decoder failing in any way means "quarantine", not "crash"
            out.append((f"pixel data could not be decoded ({type(exc).__name__})", type(exc).__name__))
        else:
            out.append(ndim - 1)
    return out


def init_pixel_worker() -> None:
    """Start a pixel-checking worker process: one compute thread (the pool is the parallelism: N processes with
    N threads each would oversubscribe the CPUs) and :mod:`medtransfer.data.loading` imported up front."""
    import torch

    torch.set_num_threads(1)
    import medtransfer.data.loading  # noqa: F401


def _verify_pixels(df: pd.DataFrame, state: _State, progress: bool, workers: int = 1,
                   spatial_dims: int | None = None) -> pd.DataFrame:
    """Decode every case once (``loading.load_case``) and quarantine those whose pixels are unusable.

    From :data:`PARALLEL_MIN_FILES` files to decode on, cases are decoded by ``workers`` processes (the rules of
    the header step: chunks of ~64-256 files, whole cases, results applied in row order), so which cases are
    quarantined, and why, does not depend on the worker count. Workers return each case's dimensionality or its
    quarantine reason, never its pixels.
    """
    cases: list[_Case] = [
        ([state.root / f for f in files.split(";")] if files else state.root / path, fmt)
        for path, files, fmt in zip(df["path"], df["files"], df["format"], strict=True)
    ]
    weights = [_files_in(c) for c in cases]
    n_files = sum(weights)
    pool_size = _pool_size(n_files, workers)
    size = _chunk_size(n_files, pool_size)
    chunks = _weighted_chunks(cases, weights, size) if pool_size > 1 else [cases]
    pool_size = min(pool_size, len(chunks))
    stage = _Stage(f"checking the pixels of {len(cases)} cases ({n_files} files) with {pool_size} processes "
                   f"(chunks of ~{size} files)", "check pixels", "pixel-checking", "cases", "checked", _PIXEL_PRELOAD)
    keep: list[int] = []
    dims: list[int] = []
    with progress_bar(progress and bool(cases), transient=True) as bar:
        task = bar.add_task("checking pixels", total=n_files, unit="files",
                            info=f"{pool_size} processes" if pool_size > 1 else "")
        outcomes = _in_order(chunks, pool_size, check_pixels_chunk,
                             lambda chunk: bar.advance(task, sum(map(_files_in, chunk))), stage,
                             initializer=init_pixel_worker)
        try:
            for i, path, outcome in zip(range(len(df)), df["path"], outcomes, strict=True):
                if isinstance(outcome, int):
                    keep.append(i)
                    dims.append(outcome)
                    continue
                reason, unexpected = outcome
                if unexpected:
                    logger.debug("pixel check failed for case %d: %s", i, unexpected)
                state.reject(ScanReadError(path, reason), "pixels")
        finally:
            outcomes.close()  # strict mode stops at the first problem: cancel the chunks not checked yet
    df = df.iloc[keep].reset_index(drop=True)
    return _keep_dims(df, pd.Series(dims, dtype=int), state, spatial_dims) if spatial_dims else df


def _files_in(case: _Case) -> int:
    """How many files a case has (its weight in chunks and progress)."""
    return len(case[0]) if isinstance(case[0], list) else 1


def _weighted_chunks(items: Sequence[A], weights: Sequence[int], size: int) -> list[list[A]]:
    """Consecutive items grouped into chunks of about ``size`` in weight (files); a heavier item is a chunk alone."""
    chunks: list[list[A]] = []
    current: list[A] = []
    total = 0
    for item, w in zip(items, weights, strict=True):
        if current and total + w > size:
            chunks.append(current)
            current, total = [], 0
        current.append(item)
        total += w
    if current:
        chunks.append(current)
    return chunks


def _keep_dims(df: pd.DataFrame, dims: pd.Series, state: _State, spatial_dims: int | None) -> pd.DataFrame:
    """Quarantine the cases whose dimensionality (``dims``: 2 or 3 per row) is not ``spatial_dims``."""
    if spatial_dims is None:
        return df
    ok = dims.to_numpy() == spatial_dims
    for path, d in zip(df.loc[~ok, "path"], dims[~ok], strict=True):
        kind, want = ("a volume", "images (H, W)") if d == 3 else ("a 2D image", "volumes (D, H, W)")
        state.reject(ScanReadError(path, f"{kind}, but input.size is for {want}; it was left out. Train a "
                                         f"{d}D model (input.size with {d} numbers) to use it"), "dims")
    return df[ok].reset_index(drop=True)


def _finish(df: pd.DataFrame, table: LabelTable | None, cfg: DataConfig, state: _State) -> Manifest:
    """Classes and task, demographics and keys, split and leakage check: the final Manifest."""
    if "label" in df.columns or (table is not None and table.label_columns):
        classes, task = resolve_classes(df, table, quarantined=[q["path"] for q in state.quarantine],
                                        require_labels=state.require_labels)
    else:
        classes, task = [], "unlabelled"
    if task == "unlabelled" and "label" in df.columns:  # a labels CSV with a single class
        state.warn(f"all {len(df)} case(s) have one label in {table.name if table else 'the labels'} "
                   f"({str(df['label'].iloc[0])!r}); one class cannot be trained on, so this is an unlabelled "
                   "inventory and the label is left out of manifest.csv.")
        df = df.drop(columns="label")
    df = merge_fields(df, cfg.age_bands)
    df, key_warnings = resolve_keys(df)
    for message in key_warnings:
        state.warn(message)
    df["case_id"] = ["c" + pseudonym(p, kind="case", length=10) for p in df["path"]]
    if task != "unlabelled":  # no split without labels (see the manifest module for why)
        df = _split(df, classes, task, cfg, state)
    if state.quarantine:
        state.warn(f"{len(state.quarantine)} file(s) quarantined; see quarantine.csv for which and why.")
    label_cols = [] if task == "unlabelled" else list(classes) if task == "multilabel" else ["label"]
    split_col = [] if task == "unlabelled" else ["split"]
    columns = [*ID_COLUMNS, *label_cols, *split_col, *SUBGROUP_COLUMNS, *ACQ_COLUMNS]
    manifest = Manifest(df[columns].copy(), classes, task, state.root, list(state.warnings),
                        _quarantine_frame(state))
    manifest.check_leakage()
    logger.info("indexed %d cases of %d patients", len(manifest), manifest.df["patient_key"].nunique())
    return manifest


def _split(df: pd.DataFrame, classes: list[str], task: Task, cfg: DataConfig, state: _State) -> pd.DataFrame:
    """The ``split`` column: the CSV's, else a patient-level stratified split; warnings about empty splits."""
    if "csv_split" in df.columns:
        df["split"] = df["csv_split"]
        fractions = None
    else:
        df["split"] = assign_splits(df, classes, task, val_fraction=cfg.val_fraction,
                                    test_fraction=cfg.test_fraction, seed=cfg.seed).to_numpy()
        fractions = {"train": 1.0, "val": cfg.val_fraction, "test": cfg.test_fraction}
    for message in split_warnings(df, classes, task, fractions=fractions):
        state.warn(message)
    return df


def _quarantine_frame(state: _State) -> pd.DataFrame:
    return pd.DataFrame(state.quarantine, columns=list(QUARANTINE_COLUMNS))
