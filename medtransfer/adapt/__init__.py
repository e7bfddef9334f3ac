"""``adapt``: a trained run at a new hospital: detect the shift with unlabelled scans (:mod:`.shift`), adapt the
model with or without a few labels (:mod:`.adaptation`), and keep the result as a site profile (:mod:`.profile`)."""

from medtransfer._callable import make_callable

# the package shares its name with ``mt.adapt``: callable, so ``mt.adapt(...)`` works in any import order
make_callable(__name__, "medtransfer.adapt.site:adapt")
