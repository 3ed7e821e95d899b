"""lmpipe: an auditable language-model pipeline (DVC stages + MLflow tracking)."""

__version__ = "0.1.0"
