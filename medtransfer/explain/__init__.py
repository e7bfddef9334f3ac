"""Where does the model look, and can the answer be trusted (DESIGN.md §3: explain/).

- :func:`explain` (saliency.py): Grad-CAM, Integrated Gradients, gradients (via Captum), occlusion;
- :func:`sanity_check` (sanity.py): cascading model-parameter randomisation (Adebayo et al. 2018);
- :func:`deletion_scores` (faithfulness.py): deletion / insertion curves against random pixel orders;
- :func:`region_hint` (regions.py): saliency mass outside the body, in the border and the corners;
- :func:`save_overlay` (overlay.py): PHI-free PNG overlays;
- :func:`select_cases` (selection.py): most confident TP / FP / worst FN per class and subgroup;
- :func:`explain_run` (run.py): all of the above for a run directory, cached (``medtransfer explain``).

Importing this package imports torch (not Captum, which loads on first use).
"""

from __future__ import annotations

from medtransfer._callable import make_callable
from medtransfer.explain.faithfulness import deletion_scores
from medtransfer.explain.overlay import save_overlay
from medtransfer.explain.regions import body_mask, region_hint
from medtransfer.explain.run import explain_run
from medtransfer.explain.saliency import METHODS, SaliencyMaps, explain
from medtransfer.explain.sanity import SanityResult, sanity_check
from medtransfer.explain.selection import select_cases

__all__ = [
    "METHODS",
    "SaliencyMaps",
    "SanityResult",
    "body_mask",
    "deletion_scores",
    "explain",
    "explain_run",
    "region_hint",
    "sanity_check",
    "save_overlay",
    "select_cases",
]


# ``import medtransfer.explain`` sets the attribute ``medtransfer.explain`` to this package, shadowing the public
# function ``mt.explain``; a callable package keeps ``mt.explain(run, images)`` working (medtransfer._callable).
make_callable(__name__, "medtransfer.explain.saliency:explain")
