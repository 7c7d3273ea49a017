"""Analysis: evaluation, per-sample gradient statistics and experiment reports."""
