"""Studies: questions answered by many runs of the pipeline's own code (not part of `dvc repro`)."""
