"""Self-supervised pretraining on unlabelled scans (``medtransfer pretrain``; issue 21): :mod:`.run` (the
command), :mod:`.methods` (SimCLR, BYOL, DINO on lightly), :mod:`.views` (medical-safe augmentations) and
:mod:`.source` (a pretraining folder as a weights source for ``train --weights``)."""
