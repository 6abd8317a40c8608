"""Stage 6: the evaluation protocol, the baselines, the run evaluation and its report."""
