"""Data sets medtransfer can build or fetch: public dataset adapters will live here; ``synthetic`` makes the sample
data (chest radiographs: ``generate_sample_data``; chest CT volumes: ``generate_sample_volumes``)."""
