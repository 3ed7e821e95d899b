"""The `evaluate` stage: every model on the test split, with CIs, paired tests, plots and the comparison."""
