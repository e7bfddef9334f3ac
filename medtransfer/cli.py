"""The ``medtransfer`` command line: each subcommand parses, calls ONE public function, prints where outputs went.

User errors (:class:`~medtransfer.errors.MedtransferError`) become one line on stderr and exit code 1,
no traceback; ``--debug`` re-raises. Usage errors exit 2 (typer/click's convention).
"""

from __future__ import annotations

import functools
import logging
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from medtransfer.errors import MedtransferError

app = typer.Typer(
    name="medtransfer",
    help="Transfer learning for medical image classification, with the evidence clinicians need.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True)

_STATE: dict[str, Any] = {"debug": False, "quiet": False}
F = TypeVar("F", bound=Callable[..., Any])


@app.callback()
def _main(
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks for errors.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars; warnings and results only.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log at INFO level.")] = False,
) -> None:
    from medtransfer import distributed

    rank = distributed.env_rank()
    _STATE["debug"] = debug
    _STATE["quiet"] = quiet or rank > 0  # under torchrun rank 0 alone shows progress and results
    level = logging.DEBUG if debug else logging.INFO if verbose else logging.WARNING
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_noted)  # a log line counts as a sign of life for the heartbeat
    fmt = "%(levelname)s %(name)s: %(message)s"
    if distributed.env_world_size() > 1:
        fmt = f"[rank {rank}] {fmt}"
        level = level if rank == 0 else max(level, logging.WARNING)
    handler.setFormatter(logging.Formatter(fmt) if debug else _NoTracebackFormatter(fmt))
    logging.basicConfig(level=level, handlers=[handler], force=True)


class _NoTracebackFormatter(logging.Formatter):
    """Log lines without tracebacks: libraries log the errors they recover from with one (pydicom's decoders
    do, for every file we then quarantine), and the CLI shows no traceback without ``--debug``."""

    def format(self, record: logging.LogRecord) -> str:
        saved = record.exc_info, record.exc_text, record.stack_info
        record.exc_info, record.exc_text, record.stack_info = None, None, None
        try:
            return super().format(record)
        finally:
            record.exc_info, record.exc_text, record.stack_info = saved


def _noted(record: logging.LogRecord) -> bool:
    from medtransfer.progress import note_output

    note_output()
    return True


#: Commands whose work is shared out when run under torchrun (``train`` joins the process group itself).
SHARDED_COMMANDS = ("evaluate", "predict", "explain")


def _group_for(fn: Callable[..., Any], kwargs: dict[str, Any]) -> Any:
    """Under torchrun, the process group for a sharded command (rank 0 writes; see medtransfer.distributed)."""
    import contextlib

    from medtransfer import distributed

    if fn.__name__ not in SHARDED_COMMANDS or distributed.env_world_size() <= 1:
        return contextlib.nullcontext()
    device = str(kwargs.get("device") or "auto")
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    return distributed.process_group(device)


def user_errors(fn: F) -> F:
    """Turn MedtransferError into one stderr line + exit 1 (unless --debug); off a terminal, a heartbeat line
    whenever the command has printed nothing for an interval (see ``progress.heartbeat``)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from medtransfer.progress import heartbeat

        try:
            with heartbeat(fn.__name__.replace("_", "-"), enabled=not _STATE["quiet"]), _group_for(fn, kwargs):
                return fn(*args, **kwargs)
        except MedtransferError as exc:
            if _STATE["debug"]:
                raise
            _print_error(exc)
            raise typer.Exit(1) from None
        except OSError as exc:  # a disk filled by a write outside medtransfer.io (a lock file, a log)
            from medtransfer.io import disk_full_errno, disk_full_error

            code = disk_full_errno(exc)
            if code is None or _STATE["debug"]:
                raise
            _print_error(disk_full_error(exc.filename or "an output file", code))
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            err_console.print("interrupted.")
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


def _print_error(exc: BaseException) -> None:
    """One line on stderr: messages quoting a library's text can hold newlines, and file names or CSV cells
    can hold '[/x]', which rich would read as markup (escaped)."""
    text = " ".join(str(exc).split())
    err_console.print(f"[bold red]error:[/] {type(exc).__name__}: {escape(text)}", highlight=False, soft_wrap=True)


def distributed_rank() -> int:
    """This process's rank under torchrun (0 otherwise)."""
    from medtransfer import distributed

    return distributed.env_rank()


def say(message: str) -> None:
    """Print one result line on stdout, never wrapped (paths stay copy-pasteable); rank 0 only under torchrun."""
    from medtransfer import distributed

    if distributed.env_rank() == 0:
        console.print(message, soft_wrap=True, highlight=False, markup=False)


def quiet() -> bool:
    """Whether --quiet was given (progress bars off)."""
    return bool(_STATE["quiet"])


@app.command()
@user_errors
def info() -> None:
    """Print versions of the libraries medtransfer uses, CUDA, and which optional extras are present."""
    from medtransfer.diagnostics import environment_table

    console.print(environment_table())


@app.command()
@user_errors
def index(
    data: Annotated[Path, typer.Argument(help="Scan folder: class sub-folders, or any layout with --labels.")],
    labels: Annotated[Path | None, typer.Option(help="CSV with 'path' (relative to DATA) and label column(s).")] = None,
    label_columns: Annotated[
        str | None, typer.Option(help="Comma-separated 0/1/blank columns for a multi-label CSV.")
    ] = None,
    out: Annotated[Path, typer.Option(help="Folder for manifest.csv, quarantine.csv, summary.")] = Path("runs/index"),
    config: Annotated[Path | None, typer.Option(help="YAML config (the data: section is used).")] = None,
    strict: Annotated[bool, typer.Option(help="Stop at the first unreadable scan instead of quarantining it.")] = False,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Config override, e.g. data.seed=3.")] = None,
    workers: Annotated[int | None, typer.Option(min=1, help=(
        "Processes that read headers and check pixels in folders of 1,000+ files (default: the usable CPUs, at "
        "most 8). "
        "The manifest is the same with any number."))] = None,
) -> None:
    """Index a scan folder: labels, demographics, pseudonymous IDs, patient-level split, quarantine.

    A folder without labels is inventoried (what was found, what was quarantined and why); only training
    needs two classes.
    """
    from medtransfer.config import load_config
    from medtransfer.data.discovery import index_scans
    from medtransfer.data.summary import render_summary

    overrides = list(set_ or [])
    if strict:
        overrides.append("data.strict=true")
    cfg = load_config(config, overrides).data
    cols = [c.strip() for c in label_columns.split(",") if c.strip()] if label_columns else None
    manifest = index_scans(data, labels=labels, label_columns=cols, config=cfg, out_dir=out, require_labels=False,
                           progress=not quiet(), workers=workers)
    render_summary(manifest, console)
    say(f"wrote {out / 'manifest.csv'}, {out / 'quarantine.csv'} and {out / 'summary.json'}")


@app.command()
@user_errors
def backbones(
    pattern: Annotated[str | None, typer.Argument(
        help="With --timm: the timm models to list, a pattern as timm.list_models takes ('convnext*', "
             "'vit_small*dino*') [default: all].")] = None,
    timm: Annotated[bool, typer.Option(
        "--timm", help="Also list timm's pretrained models (matching PATTERN), each with whether its weights are "
                       "cached for offline use; name one as --backbone timm:<name>.")] = False,
) -> None:
    """List the available backbones and whether their pretrained weights are available locally."""
    from rich.table import Table

    from medtransfer.models.backbones import list_backbones

    rows = list_backbones(timm=(pattern or "*") if timm or pattern else None, cached_timm=True)
    table = Table(title="backbones (pretrained on ImageNet-1k; timm: as its tag says)")
    for col in ("name", "px", "pretrained weights", "offline"):
        table.add_column(col, no_wrap=True)
    for row in rows:
        weights = str(row["weights"]).replace("_Weights.", " ")
        px = "" if row["input_size"] is None else str(row["input_size"])
        table.add_row(escape(row["name"]), px, escape(weights), "yes" if row["available"] else "no")
    console.print(table)
    say("weights not available offline: copy torchvision's file into $TORCH_HOME/hub/checkpoints/, or use "
        "--weights-file PATH; efficientnet_lite0 ships its weights.")
    if timm or pattern:
        n = sum(1 for r in rows if str(r["name"]).startswith("timm:"))
        say(f"{n} pretrained timm model(s) match '{pattern or '*'}'. timm weights come from the Hugging Face hub "
            "cache ($HF_HUB_CACHE): fetch one on a connected machine with 'hf download timm/<name>'.")
    else:
        say("any timm model works too: --backbone timm:<name> (e.g. timm:convnext_tiny, "
            "timm:vit_small_patch16_224.dino); 'medtransfer backbones --timm [PATTERN]' lists them.")


@app.command("sample-data")
@user_errors
def sample_data(
    out: Annotated[Path | None, typer.Option(
        help="Output folder [default: sample_data/generated, or sample_data/volumes with --volumes].")] = None,
    n: Annotated[int | None, typer.Option(
        help="Number of radiographs, or of CT studies with --volumes [default: 400, or 160].")] = None,
    seed: Annotated[int, typer.Option(help="Random seed (same seed, same bytes).")] = 0,
    size: Annotated[int | None, typer.Option(
        help="Image size in pixels (rows = columns) [default: 256, or 64 with --volumes].")] = None,
    volumes: Annotated[bool, typer.Option(
        "--volumes", help="Write chest CT volumes (DICOM series and NIfTI) instead of radiographs.")] = False,
    slices: Annotated[int, typer.Option(help="Slices per volume (with --volumes).")] = 32,
    overwrite: Annotated[bool, typer.Option(help="Regenerate even if a complete dataset is there.")] = False,
) -> None:
    """Write realistic synthetic chest radiographs as DICOM, or chest CT volumes with --volumes (3 sites,
    demographics, planted effects)."""
    if volumes:
        from medtransfer.datasets.synthetic import generate_sample_volumes

        side = 64 if size is None else size
        path = generate_sample_volumes(out or Path("sample_data/volumes"), n=160 if n is None else n, seed=seed,
                                       size=(slices, side, side), overwrite=overwrite)
        say(f"sample volumes in {path} (labels: {path / 'labels.csv'} for the DICOM series, "
            f"{path / 'labels_nifti.csv'} for the NIfTI files)")
        return
    from medtransfer.datasets.synthetic import generate_sample_data

    path = generate_sample_data(out or Path("sample_data/generated"), n=400 if n is None else n, seed=seed,
                                size=256 if size is None else size, overwrite=overwrite)
    say(f"sample data in {path} (labels: {path / 'labels.csv'})")


@app.command()
@user_errors
def pretrain(
    data: Annotated[Path | None, typer.Argument(help="Folder of scans, labels not needed (omit with --resume).")] = None,
    out: Annotated[Path | None, typer.Option(help="Pretraining folder (default runs/pretrain-<timestamp>).")] = None,
    images: Annotated[Path | None, typer.Option(help=(
        "CSV listing the images to use ('path' relative to DATA); rows whose 'split' is test are left out."))] = None,
    method: Annotated[str | None, typer.Option(help="simclr (default), byol or dino.")] = None,
    config: Annotated[str | None, typer.Option(help="YAML config or preset (model, input, train sections).")] = None,
    backbone: Annotated[str | None, typer.Option(help="Backbone to pretrain (see 'medtransfer backbones').")] = None,
    weights: Annotated[str | None, typer.Option(help="Starting weights: imagenet (default), none, or a file.")
                       ] = None,
    epochs: Annotated[int | None, typer.Option(help="Pretraining epochs.")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Images per step (two views each).")] = None,
    image_size: Annotated[int | None, typer.Option(help="Square input size in pixels.")] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu, cuda, cuda:N.")] = None,
    resume: Annotated[bool, typer.Option(help="Continue the interrupted pretraining in --out.")] = False,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Config override, e.g. pretrain.lr=3e-4.")] = None,
) -> None:
    """Self-supervised pretraining on your own unlabelled scans; then 'train --weights OUT' fine-tunes from it."""
    from medtransfer.pretrain.run import pretrain as pretrain_run

    flags = {"pretrain.method": method, "model.backbone": backbone, "model.weights": weights,
             "pretrain.epochs": epochs, "pretrain.batch_size": batch_size, "train.device": device,
             "input.size": f"[{image_size}, {image_size}]" if image_size else None}
    overrides = [f"{k}={v}" for k, v in flags.items() if v is not None] + list(set_ or [])
    if resume and out is None:
        raise typer.BadParameter("--resume needs --out DIR (the interrupted pretraining)")
    result = pretrain_run(data, out=out, labels=images, config=config, overrides=overrides, resume=resume,
                          progress=not quiet())
    last = result.history["loss"].iloc[-1] if len(result.history) else float("nan")
    say(f"pretrained {result.backbone} with {result.method} on {result.images} images ({result.epochs} epochs, "
        f"final loss {last:.4f}): {result.path}")
    say(f"fine-tune from it: medtransfer train DATA --labels LABELS.csv --backbone {result.backbone} "
        f"--weights {result.path}")


@app.command()
@user_errors
def train(
    data: Annotated[Path | None, typer.Argument(help="Scan folder (omit with --resume).")] = None,
    labels: Annotated[Path | None, typer.Option(help="Labels CSV ('path' relative to DATA).")] = None,
    label_columns: Annotated[str | None, typer.Option(help="Comma-separated 0/1/blank columns (multi-label).")] = None,
    config: Annotated[
        str | None, typer.Option(help="YAML config, or a preset name: quickstart, chexnet, linear-probe.")
    ] = None,
    backbone: Annotated[str | None, typer.Option(help="Backbone name (see 'medtransfer backbones').")] = None,
    weights: Annotated[str | None, typer.Option(help=(
        "imagenet (default), none (scratch), a weights file, or a 'medtransfer pretrain' folder."))] = None,
    weights_file: Annotated[Path | None, typer.Option(help="Local pretrained weights file (air-gapped sites).")] = None,
    strategy: Annotated[str | None, typer.Option(help="linear-probe, fine-tune or gradual.")] = None,
    epochs: Annotated[int | None, typer.Option(help="Maximum epochs.")] = None,
    image_size: Annotated[int | None, typer.Option(help="Square input size in pixels.")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Batch size.")] = None,
    lr: Annotated[float | None, typer.Option(help="Learning rate (of the head, under discriminative LRs).")] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu, cuda, cuda:N.")] = None,
    out: Annotated[Path | None, typer.Option(help="Run directory (default runs/<timestamp>).")] = None,
    resume: Annotated[bool, typer.Option(help="Continue the interrupted run in --out.")] = False,
    tensorboard: Annotated[bool, typer.Option(help="Also write TensorBoard event files.")] = False,
    mlflow: Annotated[bool, typer.Option(help="Also log to MLflow (needs the mlflow extra).")] = False,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Config override, e.g. train.patience=3.")] = None,
    dry_run: Annotated[bool, typer.Option(
        help="Only estimate: index, fit the input size and time a few steps here; print the cost, write nothing.")
    ] = False,
    nproc: Annotated[int, typer.Option(
        "--nproc", min=1, help="Train with N processes on this machine (DDP under torchrun's agent: one per GPU, "
        "or CPU processes). --batch-size stays the global batch.")] = 1,
    max_restarts: Annotated[int, typer.Option(
        "--max-restarts", min=0, help="With --nproc: restart the process group up to K times when a process "
        "dies; each restart resumes from the last checkpoint.")] = 0,
) -> None:
    """Fine-tune a pretrained backbone on a scan folder and write a run directory.

    On several GPUs: 'medtransfer train --nproc 4 ...' on one machine, or 'torchrun ... -m medtransfer train ...'
    across machines (docs/guide-scale.md).
    """
    from medtransfer.config import resolve_config_path
    from medtransfer.training.run import default_run_dir
    from medtransfer.training.run import train as train_run

    flags = {"model.backbone": backbone, "model.weights": str(weights_file) if weights_file else weights,
             "train.strategy": strategy, "train.epochs": epochs, "train.batch_size": batch_size,
             "train.lr": lr, "train.device": device,
             "input.size": f"[{image_size}, {image_size}]" if image_size else None,
             "train.tensorboard": "true" if tensorboard else None, "train.mlflow": "true" if mlflow else None}
    overrides = [f"{k}={v}" for k, v in flags.items() if v is not None] + list(set_ or [])
    if resume and out is None:
        raise typer.BadParameter("--resume needs --out RUN_DIR (the interrupted run)")
    if resume and (overrides or config or labels or label_columns):
        given = [o.split("=", 1)[0] for o in overrides] + [n for n, v in (("--config", config), ("--labels", labels),
                                                                         ("--label-columns", label_columns)) if v]
        raise typer.BadParameter(f"--resume continues the run with the configuration saved in {out}/config.yaml; "
                                 f"it cannot change {', '.join(given)}. Drop those options, or start a new run "
                                 "with another --out.")
    cols = [c.strip() for c in label_columns.split(",") if c.strip()] if label_columns else None
    if dry_run:
        from medtransfer.training.estimate import estimate_training

        if resume:
            raise typer.BadParameter("--dry-run estimates a new run; it cannot be combined with --resume")
        est = estimate_training(data, labels=labels, label_columns=cols, config=resolve_config_path(config),
                                overrides=overrides, progress=not quiet())
        for line in est.lines():
            say(line)
        say("dry run: nothing was trained or written; drop --dry-run to train")
        return
    out = out or default_run_dir()  # chosen here so that an interrupted run can print its resume command
    if nproc > 1 or max_restarts:
        _launch_train(nproc, max_restarts, out)
        return

    def show(row: dict) -> None:
        say(f"epoch {row['epoch']:>3} [{row['phase']}]  train_loss {row['train_loss']:.4f}  "
                      f"val_loss {row['val_loss']:.4f}  val_auroc {row['val_auroc']:.4f}  ({row['seconds']:.1f}s)")

    try:
        run = train_run(data, labels=labels, label_columns=cols, config=resolve_config_path(config),
                        overrides=overrides, out=out, resume=resume, progress=not quiet(), on_epoch=show)
    except KeyboardInterrupt:
        err_console.print(f"interrupted; continue with: medtransfer train --resume --out {shlex.quote(str(out))}",
                          highlight=False, markup=False, soft_wrap=True)
        raise typer.Exit(130) from None
    t = run.card.training
    say(f"best epoch {t['best_epoch']} (val AUROC {t['best_val_auroc']:.4f}); run written to {run.path}")


def _launch_train(nproc: int, max_restarts: int, out: Path) -> None:
    """``train --nproc N``: the same command in N processes under torchrun's elastic agent (rank 0 reports)."""
    from medtransfer import distributed
    from medtransfer.errors import ConfigError

    if distributed.env_world_size() > 1:
        raise ConfigError("--nproc/--max-restarts start torchrun's agent; this process already runs under "
                          "torchrun. Drop them (torchrun's own --nproc-per-node and --max-restarts apply).")
    args = _without_launch_options(sys.argv[1:])
    if "--out" not in args and not any(a.startswith("--out=") for a in args):
        args += ["--out", str(out)]  # every process must write the same run directory
    say(f"starting {nproc} training process(es) (torchrun agent, max {max_restarts} restart(s)); run: {out}")
    try:
        distributed.launch(args, nproc=nproc, max_restarts=max_restarts)
    except RuntimeError as exc:
        raise ConfigError(f"distributed training failed: {exc}. Continue it with: medtransfer train --resume "
                          f"--out {shlex.quote(str(out))} --nproc {nproc}") from None


def _without_launch_options(argv: list[str]) -> list[str]:
    """``argv`` without ``--nproc N`` and ``--max-restarts K`` (the processes it starts must not launch again)."""
    out: list[str] = []
    skip = False
    for a in argv:
        if skip:
            skip = False
            continue
        if a in ("--nproc", "--max-restarts"):
            skip = True
            continue
        if a.startswith(("--nproc=", "--max-restarts=")):
            continue
        out.append(a)
    return out


@app.command()
@user_errors
def evaluate(
    run_dir: Annotated[Path, typer.Argument(help="Run directory written by 'medtransfer train'.")],
    data: Annotated[Path | None, typer.Option(help="External scan folder (default: the run's own --split).")] = None,
    labels: Annotated[Path | None, typer.Option(help="Labels CSV for --data ('path' relative to it).")] = None,
    split: Annotated[str | None, typer.Option(
        help="The run's split to evaluate when --data is not given [default: eval.split, test].")] = None,
    subgroups: Annotated[str | None, typer.Option(
        help="Comma-separated subgroup columns [default: eval.subgroups, sex,age_band,site].")] = None,
    n_boot: Annotated[int | None, typer.Option(
        help="Bootstrap resamples (by patient) for CIs; 0 = none [default: eval.n_boot, 1000].")] = None,
    ci: Annotated[float | None, typer.Option(help="Confidence level [default: eval.ci, 0.95].")] = None,
    min_group_size: Annotated[int | None, typer.Option(
        help="Smallest subgroup (patients) that is assessed [default: eval.min_group_size, 10].")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N.")] = "auto",
    batch_size: Annotated[int, typer.Option(min=1, help="Inference batch size.")] = 32,
    site: Annotated[str | None, typer.Option(
        help="Evaluate the model as site profile NAME adapts it ('medtransfer adapt'); written under "
        "RUN/sites/NAME/evaluation unless --out is given.")] = None,
    out: Annotated[Path | None, typer.Option(help="Output folder (default: the run, or <run>/external/<name>).")
                   ] = None,
) -> None:
    """Evaluate a run: AUROC with CIs, operating point, calibration, subgroup gaps; writes evaluation.json."""
    from medtransfer.evaluation.evaluate import evaluate as evaluate_run

    target: Any = run_dir
    if site is not None:
        from medtransfer.adapt.site import load_site, site_folder

        target = load_site(run_dir, site)
        if out is None:
            base = site_folder(target, site) / "evaluation"
            out = base / "external" / data.expanduser().resolve().name if data is not None else base / (
                split or target.config.eval.split)

    groups = tuple(s.strip() for s in subgroups.split(",") if s.strip()) if subgroups is not None else None
    result = evaluate_run(target, data, labels=labels, split=split, subgroups=groups, n_boot=n_boot, ci=ci,
                          min_group_size=min_group_size, device=device, batch_size=batch_size, out_dir=out,
                          progress=not quiet())
    if distributed_rank() > 0:
        return  # under torchrun rank 0 prints the result
    console.print(_evaluation_table(result))
    for check in result.meta.get("checks", []):
        line = f"{check['status']}: {check['title']}. {check['detail']}"
        if check["status"] != "passed" and check.get("action"):
            line += f" What to do: {check['action']}"
        clean = check["status"] == "passed" and "Not assessed" not in check["detail"]  # else it is a warning
        (console if clean else err_console).print(line, highlight=False, soft_wrap=True, markup=False)
    where = result.saved_to
    say(f"wrote {where / 'evaluation.json'} and {where / 'predictions.csv'}" if where else "nothing written")


def _evaluation_table(result: Any) -> Any:
    """A compact rich table: per class AUROC (CI), operating point metrics, ECE; then flagged gaps."""
    from rich import box
    from rich.markup import escape
    from rich.table import Table

    m = result.meta
    table = Table(title=escape(f"{m.get('run_id')} on {m.get('data')} [{m.get('split')}]: {m.get('n_cases')} "
                               f"cases, {m.get('n_patients')} patients"), title_justify="left",
                  box=box.SIMPLE_HEAD, show_edge=False, caption_justify="left")
    for col in ("class", f"AUROC ({100 * m.get('ci', 0.95):.0f}% CI)", "thr", "sens", "spec", "PPV", "NPV", "ECE"):
        table.add_column(col, justify="left" if col == "class" else "right", no_wrap=True)
    ece = dict(zip(result.calibration.get("class", []), result.calibration.get("ece", []), strict=False))

    def f(v: Any, ci: tuple[Any, Any] | None = None, digits: int = 2) -> str:
        if v is None or v != v:
            return "-"
        lo, hi = ci or (None, None)
        return f"{v:.3f} ({lo:.3f}-{hi:.3f})" if lo is not None and lo == lo and hi == hi else f"{v:.{digits}f}"

    for r in result.overall.to_dict("records"):
        table.add_row(escape(str(r["class"])), f(r["auroc"], (r["auroc_lo"], r["auroc_hi"]), 3), f(r["threshold"]),
                      f(r["sensitivity"]), f(r["specificity"]), f(r["ppv"]), f(r["npv"]),
                      f(ece.get(r["class"]), digits=3))
    return table


@app.command()
@user_errors
def predict(
    run_dir: Annotated[Path, typer.Argument(help="Run directory written by 'medtransfer train'.")],
    paths: Annotated[list[Path], typer.Argument(help="Scan files and/or folders.")],
    out: Annotated[Path, typer.Option(help="CSV to write.")] = Path("predictions.csv"),
    batch_size: Annotated[int, typer.Option(help="Batch size.")] = 32,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N.")] = "auto",
    dicom_out: Annotated[Path | None, typer.Option(
        "--dicom-out", help="Also file the results of DICOM inputs into their studies, one folder per study: "
        "a Structured Report, heat-map Secondary Captures and a PDF sheet (NOT FOR CLINICAL USE).")] = None,
    site: Annotated[str | None, typer.Option(
        help="Predict with site profile NAME ('medtransfer adapt'): its BatchNorm statistics, prevalence, "
        "temperature and operating point.")] = None,
) -> None:
    """Predict new scans: calibrated probabilities and the label at the run's operating point (CSV)."""
    from medtransfer.evaluation.predict import predict as predict_scans

    target: Any = run_dir
    if site is not None:
        from medtransfer.adapt.site import load_site

        target = load_site(run_dir, site)
        say(f"using site profile '{site}'")
    table = predict_scans(target, paths, batch_size=batch_size, device=device, out=out, progress=not quiet(),
                          dicom_out=dicom_out)
    failed = int((table["error"] != "").sum())
    note = f" ({failed} could not be read: see the 'error' column)" if failed else ""
    say(f"predicted {len(table) - failed} scan(s){note}; wrote {out}")
    if dicom_out is not None and "dicom_out" in table:
        filed = table["dicom_out"] != ""
        say(f"DICOM outputs (NOT FOR CLINICAL USE) for {int(filed.sum())} case(s) in "
            f"{table.loc[filed, 'dicom_out'].nunique()} study folder(s) under {dicom_out}"
            + (f"; {int((~filed).sum())} case(s) without: see the 'dicom_note' column" if (~filed).any() else ""))


@app.command()
@user_errors
def adapt(
    run_dir: Annotated[Path, typer.Argument(help="Run directory written by 'medtransfer train'.")],
    site_data: Annotated[Path, typer.Argument(help="The new site's scan folder (labels optional).")],
    labels: Annotated[Path | None, typer.Option(
        help="Labels CSV for some of the site's scans (50-200 are enough): refit temperature and operating point "
        "on half, judge every option on the other half.")] = None,
    name: Annotated[str | None, typer.Option(help="Site name for --site (default: the folder's name).")] = None,
    out: Annotated[Path | None, typer.Option(help="Output folder (default RUN/sites/NAME).")] = None,
    n_boot: Annotated[int, typer.Option(min=0, help="Bootstrap resamples and permutations.")] = 1000,
    seed: Annotated[int, typer.Option(help="Seed of the split, permutations and bootstrap.")] = 0,
    head: Annotated[bool, typer.Option("--head/--no-head", help=(
        "With --labels, also try fine-tuning the classification head on the labelled half (kept only if the "
        "holdout shows it better)."))] = True,
) -> None:
    """A new hospital: check its scans for a shift, adapt the model when the evidence says it helps, and write
    a site profile that predict/evaluate use with --site NAME."""
    from medtransfer.adapt.site import adapt as adapt_run

    result = adapt_run(run_dir, site_data, labels=labels, name=name, out=out, seed=seed, n_boot=n_boot,
                       head=head, progress=not quiet())
    for line in result.summary().splitlines():
        say(line)


@app.command()
@user_errors
def explain(
    run_dir: Annotated[Path, typer.Argument(help="A run directory written by 'medtransfer train'.")],
    method: Annotated[str, typer.Option(help="gradcam, integrated_gradients, occlusion or saliency.")] = "gradcam",
    cases: Annotated[int, typer.Option(help="Cases per class and kind (TP/FP/FN).")] = 4,
    case_id: Annotated[list[str] | None, typer.Option("--case-id", help="Explain this case (repeatable).")] = None,
    split: Annotated[str, typer.Option(help="Split to select cases from.")] = "test",
    group_by: Annotated[str | None, typer.Option(help="Select cases per subgroup, e.g. sex or site.")] = None,
) -> None:
    """Saliency maps with sanity and faithfulness scores for selected cases; writes RUN_DIR/saliency/."""
    from medtransfer.explain.run import explain_run

    index = explain_run(run_dir, method=method, cases=cases, case_ids=case_id, split=split, group_by=group_by,
                        progress=not quiet())
    say(f"wrote {index} and overlays in {index.parent / method}")


@app.command()
@user_errors
def report(
    run_dir: Annotated[Path, typer.Argument(help="A run directory (after 'medtransfer evaluate').")],
    format: Annotated[list[str] | None, typer.Option("--format", "-f", help="html and/or pdf (repeatable); default both.")] = None,
    out: Annotated[Path | None, typer.Option(help="Folder for report.html / report.pdf; default RUN_DIR.")] = None,
    site: Annotated[str | None, typer.Option(
        help="Describe the model as site profile NAME adapts it, with that site's latest 'evaluate --site' "
        "(written to RUN/sites/NAME unless --out).")] = None,
) -> None:
    """Render the clinician-facing report (HTML + PDF) from a run's saved files; no model is loaded."""
    from medtransfer.reports.render import PdfUnavailable, render_report

    source: Any = run_dir
    if site is not None and (run_dir / "model_card.json").is_file():
        from medtransfer.evaluation.result import EvaluationResult

        done = sorted((run_dir / "sites" / site / "evaluation").rglob("evaluation.json"),
                      key=lambda p: p.stat().st_mtime)
        if done:
            source = EvaluationResult.load(done[-1].parent)
        out = out or run_dir / "sites" / site
    try:
        outputs = render_report(source, out, formats=format or ("html", "pdf"), site=site)
    except PdfUnavailable as exc:
        say(f"wrote {exc.outputs['html']}")
        err_console.print(f"[yellow]PDF not written:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None
    for path in outputs.values():
        say(f"wrote {path}")


@app.command()
@user_errors
def audit(
    data: Annotated[Path, typer.Argument(help="A scan folder, or a run directory (its data, splits and config).")],
    labels: Annotated[Path | None, typer.Option(help="Labels CSV ('path' relative to DATA).")] = None,
    config: Annotated[str | None, typer.Option(help="YAML config or preset (default: the run's, else quickstart).")
                      ] = None,
    out: Annotated[Path | None, typer.Option(help="Audit folder (default RUN/audit, else runs/audit).")] = None,
    run: Annotated[Path | None, typer.Option(help="Trained run for the shortcut audit (default: DATA if a run).")
                   ] = None,
    strategy: Annotated[list[str] | None, typer.Option(
        help="scratch, linear-probe, gradual, fine-tune (repeatable).")] = None,
    fraction: Annotated[list[float] | None, typer.Option(help="Training-patient fractions (repeatable).")] = None,
    seeds: Annotated[int, typer.Option(help="Seeds per cell.")] = 3,
    epochs: Annotated[int, typer.Option(help="Epoch budget of every cell.")] = 6,
    shortcuts: Annotated[bool, typer.Option(help="Also run the shortcut / domain-shift audit.")] = True,
    transfer: Annotated[bool, typer.Option(help="Run the transfer (pretrained vs scratch) audit.")] = True,
    source: Annotated[list[str] | None, typer.Option(help=(
        "Another starting point to compare, NAME=SPEC (repeatable): a 'medtransfer pretrain' folder "
        "(ssl=runs/pt), a weights file, or a backbone (convnext=timm:convnext_tiny)."))] = None,
) -> None:
    """Does pretraining help on this data, and is the model learning the hospital? Resumable."""
    from medtransfer.audit.run import DEFAULT_FRACTIONS, DEFAULT_STRATEGIES
    from medtransfer.audit.run import audit as audit_run

    result = audit_run(data, labels=labels, config=config, out=out, run=run,
                       strategies=strategy or DEFAULT_STRATEGIES, fractions=fraction or DEFAULT_FRACTIONS,
                       seeds=seeds, budget_epochs=epochs, transfer=transfer, shortcuts=shortcuts,
                       progress=not quiet(), sources=_named_sources(source or []))
    if result.transfer is not None:
        console.print(_audit_table(result.transfer), highlight=False)
        for w in result.transfer.warnings:
            err_console.print(f"warning: {w}", highlight=False, soft_wrap=True)
        say(f"wrote {result.out / 'transfer.json'}")
    for note in result.skipped:
        say(note)
    if result.shortcuts is not None:
        for r in result.shortcuts.probe.to_dict("records"):
            if r.get("balanced_accuracy") is not None:
                say(f"{r['attribute']} probe: balanced accuracy {r['balanced_accuracy']:.2f} (chance {r['chance']:.2f})")
        for w in result.shortcuts.warnings:
            err_console.print(f"warning: {w}", highlight=False, soft_wrap=True)
        say(f"wrote {result.out / 'shortcuts.json'}; re-render the report to include the audit")


def _named_sources(given: list[str]) -> dict[str, str]:
    """``NAME=SPEC`` options as a dict; a malformed one is a usage error naming the form."""
    out: dict[str, str] = {}
    for item in given:
        name, sep, spec = item.partition("=")
        if not sep or not name.strip() or not spec.strip():
            raise typer.BadParameter(f"--source {item!r}: expected NAME=SPEC, e.g. ssl=runs/pretrain1")
        out[name.strip()] = spec.strip()
    return out


def _audit_table(result: Any) -> str:
    lines = ["strategy       " + "  ".join(f"{f:>6g}" for f in sorted(result.curve["fraction"].unique()))]
    for s, rows in result.curve.groupby("strategy", sort=False):
        vals = dict(zip(rows["fraction"], rows["test_auroc"], strict=True))
        lines.append(f"{s:<14} " + "  ".join(f"{vals.get(f, float('nan')):6.3f}"
                                             for f in sorted(result.curve["fraction"].unique())))
    for s, d in result.summary.get("data_efficiency", {}).items():
        frac = d.get("fraction_to_match")
        bound = d.get("reached_at_smallest")  # matched at the smallest fraction tried: only a bound is known
        lines.append(f"{s}: matches scratch@100% with " + (f"{'<=' if bound else ''}{frac:.0%} of the data "
                                                           f"(gain {'>=' if bound else ''}{d['gain']:.1f}x)"
                                                           if frac else "no fraction tried"))
    return "test AUROC (mean over seeds) by training fraction\n" + "\n".join(lines)


@app.command()
@user_errors
def export(
    run_dir: Annotated[Path, typer.Argument(help="A finished run directory written by 'medtransfer train'.")],
    format: Annotated[str, typer.Option(
        "--format", "-f", help="Comma-separated: torchscript, onnx, bundle (a MONAI bundle).")
    ] = "torchscript,onnx,bundle",
    out: Annotated[Path | None, typer.Option(help="Output folder [default: RUN_DIR/export].")] = None,
) -> None:
    """Export a run for other stacks: TorchScript, ONNX and a MONAI bundle, each outputting calibrated
    probabilities, with a model.json sidecar (classes, operating points, preprocessing)."""
    from medtransfer.deploy.export import export as export_run

    for fmt, path in export_run(run_dir, format, out=out).items():
        say(f"{fmt}: wrote {path}")


@app.command()
@user_errors
def demo(
    out: Annotated[Path | None, typer.Option(
        help="Run directory for the demo [default: runs/demo, or runs/demo-volumes with --volumes].")] = None,
    fast: Annotated[bool, typer.Option(help="Fewer epochs and saliency maps (about half the time).")] = False,
    data: Annotated[Path | None, typer.Option(
        help="Where the synthetic sample scans are, made if missing [default: sample_data/generated, or "
             "sample_data/volumes with --volumes].")] = None,
    volumes: Annotated[bool, typer.Option(help="The volume pipeline: synthetic chest CT series (DICOM), a 2.5D "
                                          "model on ImageNet weights, 3-plane saliency montages.")] = False,
) -> None:
    """The whole pipeline offline on bundled synthetic scans: train, evaluate, explain, audit, report."""
    from medtransfer.demo import run_demo

    result = run_demo(out, fast=fast, data_dir=data, progress=not quiet(), volumes=volumes)
    console.print(result.summary(), highlight=False, soft_wrap=True)


datasets_app = typer.Typer(help="Public chest X-ray datasets: list them; turn one's official files into a labels "
                            "CSV that index/train use.", no_args_is_help=True)
app.add_typer(datasets_app, name="datasets")


@datasets_app.command("list")
@user_errors
def datasets_list() -> None:
    """The public datasets 'datasets prepare' reads: name, licence and the files it expects under ROOT."""
    from rich import box
    from rich.table import Table

    from medtransfer.datasets import list_datasets

    table = Table(box=box.SIMPLE_HEAD, show_edge=False, title="public datasets (medtransfer datasets prepare NAME "
                  "ROOT)", title_justify="left")
    for col in ("name", "title", "licence", "expected under ROOT"):
        table.add_column(col, overflow="fold")
    for info in list_datasets():
        table.add_row(info.name, escape(info.title), escape(info.licence),
                      escape("\n".join(info.expected) + f"\nget it: {info.url}"))
    console.print(table)


@datasets_app.command("prepare")
@user_errors
def datasets_prepare(
    name: Annotated[str, typer.Argument(help="Dataset: nih, chexpert, mimic, rsna, kermany, vindr, padchest, covid.")],
    root: Annotated[Path, typer.Argument(help="The dataset's folder as downloaded and extracted.")],
    out: Annotated[Path | None, typer.Option(help="Labels CSV to write [default: ./NAME_labels.csv]; the summary "
                                                  "goes beside it (NAME_labels.summary.json).")] = None,
    findings: Annotated[str, typer.Option(help="native (the dataset's finding names) or harmonised (the 18 "
                                               "torchxrayvision names; never-labelled ones blank).")] = "native",
    uncertain: Annotated[str, typer.Option(help="CheXpert/MIMIC -1: ignore (blank, masked), ones, zeros.")
                         ] = "ignore",
    views: Annotated[str | None, typer.Option(help="Keep only these views, comma-separated: PA,AP (or FRONTAL, "
                                                   "LATERAL).")] = None,
    allow_missing: Annotated[bool, typer.Option("--allow-missing", help=(
        "Leave out listed images missing on disk (counted in the summary) instead of failing."))] = False,
    val_fraction: Annotated[float, typer.Option(min=0.0, max=0.99, help=(
        "Share of patients carved from an official train split into val where the dataset has none."))] = 0.1,
    seed: Annotated[int, typer.Option(help="Salts that carve (deterministic per patient).")] = 0,
) -> None:
    """Read a public dataset's official files and write a labels CSV (path, findings, patient, study, sex, age,
    view, split) plus a summary; prints the 'medtransfer train' command that uses it."""
    import warnings

    from medtransfer.datasets import prepare

    view_list = [v.strip() for v in views.split(",") if v.strip()] if views else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # printed below from the summary, one line each
        result = prepare(name, root, out=out, findings=findings, uncertain=uncertain, views=view_list,
                         allow_missing=allow_missing, val_fraction=val_fraction, seed=seed)
    console.print(_datasets_table(result.summary))
    for note in result.summary.get("warnings", []):
        err_console.print(f"warning: {note}", highlight=False, soft_wrap=True, markup=False)
    say(f"wrote {result.csv_path} and {result.summary_path}")
    say(f"train: {result.train_command}")


def _datasets_table(summary: dict[str, Any]) -> Any:
    """Per finding and split: positives / negatives / unknown; the title gives rows, patients, studies."""
    from rich import box
    from rich.table import Table

    splits = summary["splits"] or {"all": summary["all"]}
    missing = summary["missing_files"]["count"]
    views = ", ".join(f"{k} {v}" for k, v in summary["views"].items())
    title = (f"{summary['title']}: {summary['rows']} images, {summary['patients']} patients, {summary['studies']} "
             f"studies; " + ", ".join(f"{s} {c['rows']} ({c['patients']} patients)" for s, c in splits.items()))
    table = Table(title=escape(title), title_justify="left", box=box.SIMPLE_HEAD, show_edge=False,
                  caption=escape(f"views: {views}; missing files left out: {missing}; cells: positive/negative/"
                                 "unknown"), caption_justify="left")
    table.add_column("finding")
    for split in splits:
        table.add_column(split, justify="right", no_wrap=True)
    for finding in summary["finding_columns"]:
        cells = [splits[s]["findings"][finding] for s in splits]
        table.add_row(escape(finding), *(f"{c['positive']}/{c['negative']}/{c['unknown']}" for c in cells))
    return table


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
