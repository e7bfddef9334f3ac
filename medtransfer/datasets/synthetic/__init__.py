"""Synthetic chest radiographs written as real DICOM files: the offline sample data set.

``generate_sample_data`` draws frontal chest X-rays (body, lungs, heart, mediastinum, diaphragm, spine,
clavicles, ribs, vessels) with pneumonia-like opacities in the positives, and writes them as DICOM from three
simulated sites that differ the way real scanners do (noise, gamma, bit depth, polarity, vendor tags,
prevalence). It plants two things an evaluation should find: a *shortcut* (the burned-in laterality marker
sits top-left more often in positives) and a *weak site* (fainter opacities, more noise). Everything is drawn
from ``seed`` with vectorised numpy, so the same arguments give byte-identical files, in seconds.

The data set is built in a hidden sibling folder and renamed into place at the end, so an interrupted run never
leaves a half data set under the final name. Ground truth (marker corner, opacity size/position) is kept in
``.truth/truth.csv``, a hidden folder that scan indexing ignores; read it with :func:`sample_truth`.

Modules, one concern each: ``plan`` (the knobs and who is scanned where), ``anatomy`` (the phantom drawing),
``sites`` (how each simulated hospital acquires and stores an image), ``writers`` (DICOM and NIfTI files),
``generate`` (the data set folder), ``preview`` (a contact sheet to look at).

``generate_sample_volumes`` does the same for chest CT: volumes in Hounsfield units with lung nodules in the
positives, three simulated CT scanners, a planted skin-marker shortcut and a noisier site, written as DICOM
CT series and as NIfTI (``volumes``: knobs, sites, plan and folder; ``volume_anatomy``: the phantom;
``volume_writers``: the files).
"""

from __future__ import annotations

from medtransfer.datasets.synthetic.generate import generate_sample_data, sample_truth
from medtransfer.datasets.synthetic.plan import GENERATOR_VERSION, SampleDataConfig
from medtransfer.datasets.synthetic.preview import render_preview
from medtransfer.datasets.synthetic.sites import SITES, SiteProfile
from medtransfer.datasets.synthetic.volumes import (
    CT_SITES,
    VOLUME_GENERATOR_VERSION,
    CTSiteProfile,
    VolumeDataConfig,
    generate_sample_volumes,
    sample_volume_truth,
)

__all__ = [
    "CT_SITES",
    "GENERATOR_VERSION",
    "SITES",
    "VOLUME_GENERATOR_VERSION",
    "CTSiteProfile",
    "SampleDataConfig",
    "SiteProfile",
    "VolumeDataConfig",
    "generate_sample_data",
    "generate_sample_volumes",
    "render_preview",
    "sample_truth",
    "sample_volume_truth",
]
