"""The classification task: the processed splits and how predictions are scored."""
