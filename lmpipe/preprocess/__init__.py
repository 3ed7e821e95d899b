"""The `preprocess` stage: raw files to clean, deduplicated, leak-free splits in data/processed."""
