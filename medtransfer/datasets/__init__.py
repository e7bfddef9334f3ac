"""Data sets medtransfer can build or fetch: public dataset adapters will live here; ``synthetic`` makes the sample data."""
