"""See DESIGN.md §3 for what this package owns."""
