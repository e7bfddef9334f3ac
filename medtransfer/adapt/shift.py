"""Has the new site shifted? ``check_shift(run, site)``: the site's scans against the run's own data, no labels needed.

Three views of the same question, one verdict:

- **Feature space** (the evidence the verdict rests on). The model's pooled features (2.5D volume models: the
  per-slice features pooled with the model's own attention, what its linear layer sees) of a reference split of
  the run (``val`` by default: held out from fitting the weights, and the split the operating point and the
  temperature were chosen on) and of the site, standardised on the two pooled (label-free, so that the
  permutation test stays exact; :func:`_standardise` says why not on the reference alone). Two tests:

  * a *domain classifier*: an L2 logistic regression told reference from site, scored out of fold
    (stratified K-fold grouped by patient, so one patient's images never sit on both sides of a fold). Its
    AUROC (0.5 = cannot tell them apart) comes with a patient-bootstrap CI; its p-value is from the AUROC's
    null distribution (Mann-Whitney normal approximation counted in *patients*, conservative for patients
    with several images; out-of-fold AUROCs are biased below 0.5 under the null, which is conservative too);
  * an *MMD* two-sample test: RBF kernel (median-heuristic bandwidth) on PCA-reduced features, with a
    permutation p-value (patients, not images, are permuted: images of one patient are not exchangeable).

  ``p_value`` = Bonferroni of the two, ``min(1, 2 * min(p_mmd, p_domain))``: either test may find the shift
  (MMD sees global changes, the classifier a few informative directions) and the false-alarm rate stays at or
  below :data:`ALPHA`. ``shift`` = ``p_value < ALPHA``.
- **Input side** (what differs, for a person to read): intensity distributions of the model's input per
  channel (Wasserstein distance in reference standard deviations, KS statistic, histograms), image size and
  pixel spacing, and tag tables (modality, manufacturer, view, ...) from the manifests.
- **Output side**: the predicted-positive rate per class at the card's operating point (site vs reference,
  patient-clustered Wilson CIs) and a KS test of the score distribution against the reference.

Cost is bounded for any size of site: each side is subsampled (seeded, whole patients) to at most
:data:`MAX_PER_SIDE` cases, and the intensity check reads at most :data:`INTENSITY_CASES` of them; the report
says how many were used.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch

from medtransfer.data.dataset import ScanDataset
from medtransfer.data.manifest import Manifest
from medtransfer.errors import ConfigError, ManifestError, RunDirError
from medtransfer.inference import run_model
from medtransfer.models.outputs import decisions, probabilities, scored_classes
from medtransfer.run_dir import Run
from medtransfer.stats.bootstrap import cluster_codes, metric_intervals
from medtransfer.stats.intervals import clustered_wilson

logger = logging.getLogger(__name__)

#: Significance level of the verdict: ``shift`` when ``p_value < ALPHA``.
ALPHA = 0.01
#: At most this many cases per side (whole patients, seeded) enter the feature tests.
MAX_PER_SIDE = 2000
#: PCA dimensions for the MMD test.
PCA_DIMS = 32
#: A reference split smaller than this is pooled with the other held-out split (val + test).
MIN_REFERENCE = 30
#: Fewest decoded cases per side for the tests to mean anything.
MIN_CASES = 10
#: How many of the site's cases most unlike the training data are listed.
N_UNLIKE = 10
#: At most this many cases per side are read again for the intensity check, and pixels sampled per case.
INTENSITY_CASES = 200
PIXELS_PER_CASE = 4096
#: Acquisition columns summarised (median, quartiles) and tag columns tabulated, where the manifests have them.
SIZE_COLUMNS = ("rows", "cols", "frames", "spacing_row", "spacing_col")
TAG_COLUMNS = ("modality", "manufacturer", "view", "photometric", "site")
_NAN = float("nan")


@dataclass
class ShiftReport:
    """What :func:`check_shift` found (``shift.json`` via :meth:`to_json`).

    Attributes:
        shift: ``p_value < ALPHA``.
        p_value: Bonferroni-combined p-value of the MMD and domain-classifier tests.
        domain_auroc: out-of-fold AUROC of the reference-vs-site classifier (0.5: indistinguishable).
        domain_auroc_ci: its 95% patient-bootstrap CI ``(lo, hi)``.
        domain_p_value: the classifier's p-value (AUROC null distribution, counted in patients).
        mmd: unbiased squared MMD between reference and site features (RBF kernel, PCA-reduced).
        mmd_p_value: its permutation p-value (patients permuted).
        input: intensity distances and histograms per channel, size/spacing summaries, tag tables.
        output: predicted-positive rate per class (site vs reference, CIs) and score KS tests.
        verdict: one line: ``no shift detected (...)`` or ``shift: ... (evidence)``.
        unlike: case_ids of the site cases the domain classifier found most unlike the reference.
        method: how it was measured: reference split(s), cases per side (and whether subsampled), n_perm, seed,
            PCA dimensions, kernel bandwidth, folds, alpha, the p-value combination.
    """

    shift: bool
    p_value: float
    domain_auroc: float
    domain_auroc_ci: tuple[float, float]
    domain_p_value: float
    mmd: float
    mmd_p_value: float
    input: dict[str, Any] = field(default_factory=dict)
    output: dict[str, Any] = field(default_factory=dict)
    verdict: str = ""
    unlike: list[str] = field(default_factory=list)
    method: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """Plain JSON types (NaN as null): ``{"shift", "p_value", "domain_auroc", "domain_auroc_ci", ...}``."""
        return _plain(asdict(self))

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ShiftReport:
        """The report :meth:`to_json` wrote (null numbers back to NaN)."""
        num = {k: _NAN if data.get(k) is None else float(data[k])
               for k in ("p_value", "domain_auroc", "domain_p_value", "mmd", "mmd_p_value")}
        lo, hi = (data.get("domain_auroc_ci") or [None, None])[:2]
        return cls(shift=bool(data["shift"]), domain_auroc_ci=(_NAN if lo is None else float(lo),
                                                               _NAN if hi is None else float(hi)),
                   input=dict(data.get("input") or {}), output=dict(data.get("output") or {}),
                   verdict=str(data.get("verdict", "")), unlike=[str(c) for c in data.get("unlike") or []],
                   method=dict(data.get("method") or {}), **num)


def check_shift(run: Run, site: Manifest, *, reference: str = "val", n_perm: int = 1000, seed: int = 0,
                progress: bool = False) -> ShiftReport:
    """Compare a new site's scans with the run's own data in the model's feature space, input and output.

    No labels are needed; a labelled site's labels are ignored. Module docstring: the method.

    Args:
        run: a loaded run (:func:`medtransfer.load_run`) with its ``manifest.csv``.
        site: the site's cases (``index_scans(folder, require_labels=False)`` for a folder without labels).
        reference: the run's split(s) to compare with, ``+``-joined (``val``, ``test``, ``val+test``, ``train``).
            ``val`` (the default) was never used to fit the model's weights, so its features are what new
            scans of the training distribution look like; one with fewer than ``MIN_REFERENCE`` cases is pooled
            with the other held-out split.
        n_perm: MMD permutations (at least ``2 / ALPHA``, so that the combined p-value can fall below ALPHA).
        seed: seed of the subsampling, the folds, the PCA, the permutations and the bootstrap.
        progress: progress bars for the feature passes.

    Returns:
        :class:`ShiftReport`.

    Raises:
        RunDirError: the run has no manifest. ManifestError: an empty reference split or too few decodable
        cases on a side. ConfigError: ``n_perm`` too small.

    Examples:
        >>> run = mt.load_run("runs/cxr1")  # doctest: +SKIP
        >>> report = check_shift(run, mt.index_scans("hospital_b/", require_labels=False))  # doctest: +SKIP
        >>> report.verdict  # doctest: +SKIP
        'shift: the site's scans differ from the training data in the model's features (p=0.002; ...)'
    """
    if n_perm < math.ceil(2 / ALPHA):
        raise ConfigError(f"n_perm={n_perm}: the MMD permutation test needs at least {math.ceil(2 / ALPHA)} "
                          f"permutations for the Bonferroni-combined p-value to be able to fall below {ALPHA}")
    if run.manifest is None:
        raise RunDirError(f"{run.path}: no manifest.csv; the shift check compares the site with the run's own "
                          "cases. Give a run directory written by 'medtransfer train'.")
    ref_manifest, splits = _reference(run.manifest, reference)
    site_manifest = _inventory(site)
    rng = np.random.default_rng(seed)
    ref_rows, ref_full = _subsample(ref_manifest.df, MAX_PER_SIDE, rng), len(ref_manifest)
    site_rows, site_full = _subsample(site_manifest.df, MAX_PER_SIDE, rng), len(site_manifest)
    ref_m, site_m = _take(ref_manifest, ref_rows), _take(site_manifest, site_rows)
    ref_f, ref_logits, ref_ok = _features(run, ref_m, progress, "features (shift, reference)")
    site_f, site_logits, site_ok = _features(run, site_m, progress, "features (shift, site)")
    ref_m, site_m = _take(ref_m, np.flatnonzero(ref_ok)), _take(site_m, np.flatnonzero(site_ok))
    ref_f, site_f = ref_f[ref_ok], site_f[site_ok]
    for name, m in (("reference", ref_m), ("site", site_m)):
        if len(m) < MIN_CASES:
            raise ManifestError(f"the {name} has {len(m)} decodable case(s); the shift check needs at least "
                                f"{MIN_CASES} on each side. Give more scans (or a larger reference split).")

    x = _standardise(ref_f, site_f)
    side = np.r_[np.zeros(len(ref_f)), np.ones(len(site_f))].astype(int)
    patients = np.r_[ref_m.df["patient_key"].astype(str).to_numpy(), site_m.df["patient_key"].astype(str).to_numpy()]
    domain = _domain_classifier(x, side, patients, seed)
    z = _pca(x, seed)
    mmd, mmd_p, bandwidth = _mmd_test(z, side, patients, n_perm, seed)
    p_value = min(1.0, 2 * min(mmd_p, domain["p_value"]))
    site_ids = site_m.df["case_id"].astype(str).to_numpy()
    order = np.argsort(-domain["scores"][side == 1], kind="stable")[:N_UNLIKE]
    inputs = _input_side(run, ref_m, site_m, rng)
    outputs = _output_side(run, ref_logits[ref_ok], site_logits[site_ok], ref_m, site_m)
    method = {"reference": splits, "alpha": ALPHA, "seed": seed, "n_perm": n_perm,
              "n_reference": len(ref_m), "n_site": len(site_m),
              "n_reference_available": ref_full, "n_site_available": site_full,
              "subsampled": bool(ref_full > len(ref_rows) or site_full > len(site_rows)),
              "max_per_side": MAX_PER_SIDE, "undecodable": {"reference": int((~ref_ok).sum()),
                                                            "site": int((~site_ok).sum())},
              "features": int(x.shape[1]), "pca_dims": int(z.shape[1]), "kernel_bandwidth": bandwidth,
              "folds": domain["folds"], "domain_p_value_method": "AUROC null (Mann-Whitney, patients)",
              "combination": "Bonferroni: min(1, 2 * min(mmd_p_value, domain_p_value))"}
    report = ShiftReport(shift=bool(p_value < ALPHA), p_value=float(p_value), domain_auroc=domain["auroc"],
                         domain_auroc_ci=domain["ci"], domain_p_value=domain["p_value"], mmd=mmd,
                         mmd_p_value=mmd_p, input=inputs, output=outputs,
                         unlike=[str(c) for c in site_ids[order]], method=method)
    report.verdict = _verdict(report)
    logger.info("%s", report.verdict)
    return report


# -- data ---------------------------------------------------------------------------------------------------
def _reference(manifest: Manifest, reference: str) -> tuple[Manifest, list[str]]:
    """The run's reference cases and the split names used (a small held-out split is pooled with the other)."""
    splits = [s.strip() for s in reference.split("+") if s.strip()]
    present = set(manifest.df["split"].astype(str)) if "split" in manifest.df else set()
    unknown = [s for s in splits if s not in present]
    if not splits or unknown:
        raise ManifestError(f"reference split {reference!r}: the run has no split {unknown or reference!r}; "
                            f"choose from {sorted(present)} (e.g. 'val' or 'val+test')")
    m = manifest.split(splits)
    if len(m) < MIN_REFERENCE:
        extra = [s for s in ("val", "test") if s in present and s not in splits and set(splits) <= {"val", "test"}]
        if extra:
            logger.info("the %s split has %d cases (< %d): the reference is %s", "+".join(splits), len(m),
                        MIN_REFERENCE, "+".join([*splits, *extra]))
            splits = [*splits, *extra]
            m = manifest.split(splits)
    return m, splits


def _inventory(site: Manifest) -> Manifest:
    """The site's cases without labels (nothing here may learn from them, and its classes need not be the run's)."""
    if not len(site):
        raise ManifestError("the site has no cases; give a folder with scans (or its manifest)")
    drop = [c for c in (*site.label_columns, "split") if c in site.df.columns]
    return Manifest(site.df.drop(columns=drop), [], "unlabelled", site.data_dir, list(site.warnings))


def _subsample(df: pd.DataFrame, max_cases: int, rng: np.random.Generator) -> np.ndarray:
    """Row positions of whole patients, drawn in a seeded order until ``max_cases`` rows (all when fewer)."""
    if len(df) <= max_cases:
        return np.arange(len(df))
    codes, n = cluster_codes(df["patient_key"].astype(str).to_numpy(), len(df))
    counts = np.bincount(codes, minlength=n)
    order = rng.permutation(n)
    keep = order[np.cumsum(counts[order]) <= max_cases]
    return np.flatnonzero(np.isin(codes, keep))


def _take(m: Manifest, rows: np.ndarray) -> Manifest:
    return Manifest(m.df.iloc[rows].copy(), list(m.classes), m.task, m.data_dir, list(m.warnings))


def _features(run: Run, m: Manifest, progress: bool, description: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pooled features (N, F), logits (N, K) from the same pass, and the decoded-case mask (N,)."""
    tc = run.config.train
    result = run_model(run.model, m, run.card.input, output="features", batch_size=tc.batch_size, device=tc.device,
                       amp=tc.amp, cpu_bf16=tc.cpu_bf16, num_workers=tc.num_workers, cache_dir=run.cache_dir,
                       progress=progress, description=description, shard=False)
    feats = result.outputs.astype(np.float32)
    head = run.model.head
    with torch.no_grad():
        h = torch.from_numpy(np.ascontiguousarray(feats)).to(next(head.parameters()).device)
        head.eval()
        logits = head(h).float().cpu().numpy().reshape(len(feats), -1)
        pooled = _pool(head, h) if feats.ndim == 3 else feats.reshape(len(feats), -1)
    return np.asarray(pooled, dtype=np.float64), logits, result.ok


def _pool(head: torch.nn.Module, h: torch.Tensor) -> np.ndarray:
    """Per-slice features (N, S, F) of a 2.5D model pooled with its own attention (what its linear layer sees);
    a head without attention gets the mean over slices."""
    attention = getattr(head, "attention", None)
    if callable(attention):
        a = attention(h)
        return torch.bmm(a.unsqueeze(1).to(h.dtype), h).squeeze(1).float().cpu().numpy()
    return h.mean(dim=1).float().cpu().numpy()


# -- feature-space tests ----------------------------------------------------------------------------------
def _standardise(ref: np.ndarray, site: np.ndarray) -> np.ndarray:
    """Both sides scaled by the mean and SD of the two pooled (an SD floor keeps dead units from exploding).

    Pooled, not the reference's own: a scaling fitted to one side is label-dependent. With more features
    than reference cases it shrinks exactly the directions in which the reference sample happens to vary
    little, so the site looks more spread out even when it is drawn from the same distribution, and the
    permutation test (which assumes the two sides exchangeable) fires: 4 of 5 same-distribution sites were
    flagged on tiny data when the reference alone set the scale.
    """
    both = np.vstack([ref, site])
    mu, sd = both.mean(axis=0), both.std(axis=0)
    floor = max(float(np.median(sd)) * 1e-2, 1e-8)
    return (both - mu) / np.maximum(sd, floor)


def _domain_classifier(x: np.ndarray, side: np.ndarray, patients: np.ndarray, seed: int) -> dict[str, Any]:
    """Out-of-fold reference-vs-site scores, AUROC with a patient-bootstrap CI, and its p-value."""
    from scipy.stats import norm
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedGroupKFold

    codes, _ = cluster_codes(patients, len(patients))
    n_ref, n_site = (len(np.unique(codes[side == s])) for s in (0, 1))
    folds = int(min(5, n_ref, n_site))
    scores = np.zeros(len(side))
    cv = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    for fit, held in cv.split(x, side, groups=codes):
        if len(np.unique(side[fit])) < 2:  # a fold without one side: cannot fit (tiny data only)
            scores[held] = 0.5
            continue
        clf = LogisticRegression(C=0.1, max_iter=2000, class_weight="balanced")
        clf.fit(x[fit], side[fit])
        scores[held] = clf.decision_function(x[held])
    res = metric_intervals(side, scores, 0.0, clusters=codes, n_boot=1000, seed=seed, metrics=("auroc",))["auroc"]
    # the null AUROC's SD in patients (Mann-Whitney): images of one patient are not independent evidence
    sd0 = math.sqrt((n_ref + n_site + 1) / (12 * n_ref * n_site))
    p = float(norm.sf((res.point - 0.5) / sd0))
    return {"scores": scores, "auroc": float(res.point), "ci": (float(res.lo), float(res.hi)), "p_value": p,
            "folds": folds}


def _pca(x: np.ndarray, seed: int) -> np.ndarray:
    """PCA of both sides pooled (label-free, so the permutation test stays valid) to at most PCA_DIMS."""
    from sklearn.decomposition import PCA

    dims = int(min(PCA_DIMS, x.shape[1], len(x) - 1))
    return PCA(n_components=dims, random_state=seed).fit_transform(x)


def _mmd_test(z: np.ndarray, side: np.ndarray, patients: np.ndarray, n_perm: int, seed: int
              ) -> tuple[float, float, float]:
    """Unbiased MMD² (RBF, median heuristic), its permutation p-value (patients permuted), and the bandwidth."""
    sq = (z * z).sum(axis=1)
    d2 = np.maximum(sq[:, None] + sq[None, :] - 2 * z @ z.T, 0.0)
    off = d2[np.triu_indices(len(z), k=1)]
    gamma2 = float(np.median(off[off > 0])) if (off > 0).any() else 1.0
    k = np.exp(-d2 / gamma2).astype(np.float64)
    # permutation units: one patient on one side (a patient found on both sides counts as two units)
    unit, n_units = cluster_codes(np.char.add(side.astype(str), np.char.add(":", patients.astype(str))), len(side))
    unit_side = np.zeros(n_units, dtype=bool)
    unit_side[unit[side == 1]] = True
    rng = np.random.default_rng(seed + 1)
    assignments = [unit_side[unit]]
    assignments += [rng.permutation(unit_side)[unit] for _ in range(n_perm)]
    stats = np.concatenate([_mmd2(k, np.stack(assignments[i:i + 128], axis=1))
                            for i in range(0, len(assignments), 128)])
    observed = float(stats[0])
    p = float((1 + np.sum(stats[1:] >= observed - 1e-12)) / (1 + n_perm))
    return observed, p, float(math.sqrt(gamma2 / 2))


def _mmd2(k: np.ndarray, a: np.ndarray) -> np.ndarray:
    """Unbiased MMD² for B side assignments ``a`` (N, B) of bool (True = site) over one kernel matrix (N, N)."""
    a = a.astype(np.float64)
    ka = k @ a
    s_yy = (a * ka).sum(axis=0)
    s_xy = k.sum(axis=0) @ a - s_yy
    s_xx = k.sum() - 2 * s_xy - s_yy
    ny = a.sum(axis=0)
    nx = len(k) - ny
    diag = np.diag(k)
    return ((s_xx - (1 - a).T @ diag) / (nx * (nx - 1)) + (s_yy - a.T @ diag) / (ny * (ny - 1))
            - 2 * s_xy / (nx * ny))


# -- input and output sides -------------------------------------------------------------------------------
def _input_side(run: Run, ref: Manifest, site: Manifest, rng: np.random.Generator) -> dict[str, Any]:
    """Intensity distances per channel, size/spacing summaries and tag tables, site vs reference."""
    from scipy.stats import ks_2samp, wasserstein_distance

    read = [_pixels(run, m, rng) for m in (ref, site)]
    pix = [p for p, _ in read]
    channels = []
    for c in range(min(p.shape[0] for p in pix)):
        r, s = pix[0][c], pix[1][c]
        if not (r.size and s.size):
            continue
        sd = float(r.std()) or 1.0
        lo, hi = np.quantile(np.r_[r, s], [0.005, 0.995])
        edges = np.linspace(lo, hi if hi > lo else lo + 1, 33)
        channels.append({"channel": c, "wasserstein_sd": float(wasserstein_distance(r, s)) / sd,
                         "ks": float(ks_2samp(r, s).statistic), "mean_reference": float(r.mean()),
                         "mean_site": float(s.mean()), "sd_reference": sd, "sd_site": float(s.std()),
                         "edges": edges.tolist(), "hist_reference": np.histogram(r, edges, density=True)[0].tolist(),
                         "hist_site": np.histogram(s, edges, density=True)[0].tolist()})
    sizes = {}
    for col in SIZE_COLUMNS:
        vals = [pd.to_numeric(m.df[col], errors="coerce").dropna() if col in m.df else pd.Series(dtype=float)
                for m in (ref, site)]
        if all(len(v) == 0 for v in vals):
            continue
        sizes[col] = {name: ({"median": float(v.median()), "p25": float(v.quantile(0.25)),
                              "p75": float(v.quantile(0.75)), "n": len(v)} if len(v) else None)
                      for name, v in zip(("reference", "site"), vals, strict=True)}
    tags = {}
    for col in TAG_COLUMNS:
        if col not in ref.df and col not in site.df:
            continue
        tags[col] = {name: (m.df[col].astype("string").fillna("unknown").value_counts(normalize=True)
                            .head(10).round(4).to_dict() if col in m.df else {})
                     for name, m in (("reference", ref), ("site", site))}
    return {"intensity": channels, "cases_read": {"reference": read[0][1], "site": read[1][1]},
            "sizes": sizes, "tags": tags}


def _pixels(run: Run, m: Manifest, rng: np.random.Generator) -> tuple[np.ndarray, int]:
    """Sampled model-input intensities (C, M) of up to INTENSITY_CASES cases of ``m``, and how many were read."""
    ds = ScanDataset(m, run.card.input, train=False, cache_dir=run.cache_dir)
    chosen = np.sort(rng.choice(len(m), size=min(INTENSITY_CASES, len(m)), replace=False))
    out = []
    for i in chosen:
        try:
            img = ds[int(i)]["image"].numpy().reshape(run.card.input.channels, -1)
        except Exception as exc:  # noqa: BLE001 - an undecodable case is skipped here; the feature pass reports it
            logger.debug("intensity sample: case %d skipped (%s)", i, type(exc).__name__)
            continue
        take = rng.choice(img.shape[1], size=min(PIXELS_PER_CASE, img.shape[1]), replace=False)
        out.append(img[:, take])
    return (np.concatenate(out, axis=1) if out else np.zeros((run.card.input.channels, 0))), len(out)


def _output_side(run: Run, ref_logits: np.ndarray, site_logits: np.ndarray, ref: Manifest, site: Manifest
                 ) -> dict[str, Any]:
    """Predicted-positive rate per class at the card's operating point and score KS tests, site vs reference."""
    from scipy.stats import ks_2samp

    card = run.card
    out = []
    sides = []
    for logits, m in ((ref_logits, ref), (site_logits, site)):
        p = probabilities(logits, card)
        flags, _ = decisions(p, card)
        codes, _ = cluster_codes(m.df["patient_key"].astype(str).to_numpy(), len(m))
        sides.append((p, flags, codes))
    for j, c in enumerate(scored_classes(card)):
        row: dict[str, Any] = {"class": c}
        for name, (p, flags, codes) in zip(("reference", "site"), sides, strict=True):
            r = clustered_wilson(flags[:, j] == 1, np.ones(len(flags), dtype=bool), codes)
            row.update({f"positive_rate_{name}": r.point, f"positive_rate_{name}_lo": r.lo,
                        f"positive_rate_{name}_hi": r.hi, f"mean_score_{name}": float(p[:, j].mean())})
        ks = ks_2samp(sides[0][0][:, j], sides[1][0][:, j])
        row.update({"score_ks": float(ks.statistic), "score_ks_p_value": float(ks.pvalue)})
        out.append(row)
    return {"classes": out, "note": "rates at the card's operating point; the KS p-value counts images, not "
                                    "patients, and is descriptive"}


def _verdict(r: ShiftReport) -> str:
    """One line: the decision and the evidence behind it."""
    m = r.method
    lo, hi = r.domain_auroc_ci
    evidence = (f"p={r.p_value:.3g}; MMD p={r.mmd_p_value:.3g}, domain AUROC {r.domain_auroc:.2f} "
                f"[{lo:.2f}-{hi:.2f}]; {m['n_site']} site vs {m['n_reference']} reference cases "
                f"({'+'.join(m['reference'])})")
    if not r.shift:
        return f"no shift detected ({evidence})"
    extra = []
    worst = max(r.input.get("intensity", []), key=lambda ch: ch["wasserstein_sd"], default=None)
    if worst is not None and worst["wasserstein_sd"] >= 0.1:
        extra.append(f"intensities moved {worst['wasserstein_sd']:.2f} SD")
    for row in r.output.get("classes", []):
        if row["score_ks_p_value"] < ALPHA:
            extra.append(f"{row['class']} predicted positive {row['positive_rate_site']:.0%} vs "
                         f"{row['positive_rate_reference']:.0%}")
    tail = f"; {', '.join(extra)}" if extra else ""
    return f"shift: the site's scans differ from the training data in the model's features ({evidence}{tail})"


def _plain(obj: Any) -> Any:
    """JSON-ready: numpy scalars and arrays to Python, tuples to lists, NaN/inf to None."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _plain(obj.tolist())
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(float(obj)) else None
    return obj
