"""Tools that write things rather than measure them: make_flags.py (docs/flags.md from the
parsers) and inspection_data.py (the generated inspection-like image set)."""
