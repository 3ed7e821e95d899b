"""`lmpipe audit`: how exactly was this model made, checked against dvc.lock, the DVC cache and MLflow."""
