"""Statistics with no model in them (numpy/scipy only): metrics, patient-level intervals, calibration, thresholds.

A leaf package: training (calibration and operating points at the end of training), evaluation, the audits
and explainability all use it, and it imports nothing of theirs.
"""
