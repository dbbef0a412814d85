"""Disaggregated serving: decode routing (ELDR and baselines) and its offline fitting."""
