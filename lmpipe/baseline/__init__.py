"""The `baseline` stage: TF-IDF and logistic regression, the classical reference."""
