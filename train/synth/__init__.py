"""A synthetic echocardiography archive whose labels are visible anatomy.

``echonode-train synth --out DIR --patients N [--seed S] [--renderer polar|raster] [--look standard|varied|...]``
writes DICOM Ultrasound Multi-frame objects (JPEG baseline, YBR_FULL_422)
that look like transthoracic echo cines, the sonographer's measurement SR of
every study (:mod:`train.synth_reports`), plus ``labels.csv`` (one row per
study), ``videos.csv`` (one row per video) and ``reports.csv`` (one row per
SR).  Real labelled echo cannot be shipped, so this archive stands in for
one (METHOD.md, "The synthetic archive").

The package, by concern:

* :mod:`~train.synth.truth`: the label-defining anatomy (walls, aortic valve)
  and its sampler, continuous across the thresholds, no giveaways;
* :mod:`~train.synth.anatomy`: label-free anatomy and the cardiac cycle;
* :mod:`~train.synth.acquisition`: scanner makes, views, per-video geometry
  and image quality (never reads a label);
* :mod:`~train.synth.views` and :mod:`~train.synth.render`: renderer A
  ("polar"), reflectivity on a beam grid, scatterers through a PSF, clutter,
  reverberation, dropout, log compression, scan conversion;
* :mod:`~train.synth.look`: a wide spread of looks for renderer A (grey map,
  speckle grain and filtering, edges, tissue contrast), one per video;
* :mod:`~train.synth.render_alt`: renderer B ("raster"), written apart with a
  different geometry model, speckle, grey map and sector shape, so that a
  model trained on one rendering can be tested on another;
* :mod:`~train.synth.overlay`, :mod:`~train.synth.geometry`,
  :mod:`~train.synth.dicom`: screen annotation, the DICOM region, the objects;
* :mod:`~train.synth.archive` and :mod:`~train.synth.cli`: the archive and
  the command.

Deterministic: all randomness comes from ``numpy.random.default_rng`` keyed
by ``(seed, purpose, patient, study, video)``, UIDs from
:func:`pydicom.uid.generate_uid` with seed-derived entropy, and no wall clock
is written into the files.  Same seed, same bytes.
"""

from __future__ import annotations

from train.synth.acquisition import VENDORS, VIEW_CODES, VIEWS, Vendor
from train.synth.anatomy import END_DIASTOLE_PHASE, MID_SYSTOLE_PHASE
from train.synth.archive import (
    LABEL_COLUMNS,
    RENDERERS,
    REPORT_COLUMNS,
    VIDEO_COLUMNS,
    ArchiveSummary,
    generate_archive,
)
from train.synth.cli import add_synth_arguments, run_synth
from train.synth.truth import (
    LVH_THRESHOLD_CM,
    SEVERE_AS_THRESHOLD_CM,
    StudyTruth,
    sample_study_truths,
    sample_truth,
)

__all__ = [
    "END_DIASTOLE_PHASE",
    "LABEL_COLUMNS",
    "LVH_THRESHOLD_CM",
    "MID_SYSTOLE_PHASE",
    "RENDERERS",
    "REPORT_COLUMNS",
    "SEVERE_AS_THRESHOLD_CM",
    "VENDORS",
    "VIDEO_COLUMNS",
    "VIEWS",
    "VIEW_CODES",
    "ArchiveSummary",
    "StudyTruth",
    "Vendor",
    "add_synth_arguments",
    "generate_archive",
    "run_synth",
    "sample_study_truths",
    "sample_truth",
]
