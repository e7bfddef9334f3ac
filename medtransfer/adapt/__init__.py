"""``adapt``: a trained run at a new hospital: detect the shift with unlabelled scans (:mod:`.shift`), adapt the
model with or without a few labels (:mod:`.adaptation`), and keep the result as a site profile (:mod:`.profile`)."""
