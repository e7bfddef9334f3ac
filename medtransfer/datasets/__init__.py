"""Data sets medtransfer can build or fetch: ``public`` reads the public chest X-ray datasets as distributed and
writes an ordinary labels CSV (:func:`prepare`, :func:`list_datasets`; ``medtransfer datasets prepare``);
``synthetic`` makes the sample data (chest radiographs: ``generate_sample_data``; chest CT volumes:
``generate_sample_volumes``).

Neither import needs torch.
"""

from __future__ import annotations

from medtransfer.datasets.public import list_datasets, prepare

__all__ = ["list_datasets", "prepare"]
