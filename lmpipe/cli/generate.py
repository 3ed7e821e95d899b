"""`lmpipe generate`: continue a prompt with the causal LM the pretrain stage made.

    lmpipe generate "this movie was"                                  # greedy, 40 new tokens
    lmpipe generate "the acting" --temperature 0.8 --top-p 0.9 --seed 3 --max-new-tokens 60

The model is `models/pretrained/` after `dvc exp run -S pretrain.objective=clm -S
pretrain.model.family=llama` (a LlamaForCausalLM folder), or any HF causal-LM folder with its
tokenizer. Decoding (lmpipe.clm.generation): greedy at temperature 0, else sampling with top-k and
top-p, seeded (same seed, same text), with a key/value cache. Heavy packages load on use.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from lmpipe.core.errors import LmpipeError

DEFAULT_MODEL = "models/pretrained"


def load_causal_lm(folder: str | Path) -> tuple[Any, Any]:
    """(model in eval mode, tokenizer) of an HF causal-LM folder; errors name the folder and what it holds."""
    import json

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lmpipe.inference.classifier import quiet_transformers

    path = Path(folder)
    if not (path / "config.json").is_file():
        raise LmpipeError(f"{path}: no config.json (run `dvc exp run -S pretrain.objective=clm ...` or pass --model)")
    architectures = json.loads((path / "config.json").read_text(encoding="utf-8")).get("architectures") or []
    if not any(name.endswith("ForCausalLM") for name in architectures):
        raise LmpipeError(
            f"{path}: a {', '.join(architectures) or 'model'} folder, not a causal LM "
            "(pretrain with pretrain.objective: clm and pretrain.model.family: llama)"
        )
    quiet_transformers()
    model = AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True).eval()
    return model, AutoTokenizer.from_pretrained(str(path))


def generate_command(args: argparse.Namespace) -> int:
    from lmpipe.clm.generation import generate_text

    if args.max_new_tokens < 1:
        raise LmpipeError(f"--max-new-tokens must be >= 1 (got {args.max_new_tokens})")
    if args.temperature < 0 or args.top_k < 0 or not 0 < args.top_p <= 1:
        raise LmpipeError("--temperature and --top-k must be >= 0, --top-p in (0, 1]")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    model, tokenizer = load_causal_lm(args.model)
    text = generate_text(
        model,
        tokenizer,
        args.prompt,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        eos_id=tokenizer.sep_token_id,
        use_cache=not args.no_cache,
    )
    print(f"{args.prompt} {text}".strip())
    return 0


def add_generate_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add `generate` to an `add_subparsers()` object; the parser's func is `generate_command`."""
    parser = subparsers.add_parser(
        "generate",
        help="continue a prompt with the pretrained causal LM (greedy or sampled)",
        description="Continue PROMPT with a causal LM (models/pretrained under pretrain.objective: clm).",
    )
    parser.add_argument("prompt", help="the text to continue")
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"causal-LM folder (default: {DEFAULT_MODEL})")
    parser.add_argument("--max-new-tokens", type=int, default=40, help="tokens to add (default: 40)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    parser.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest tokens; 0 = all")
    parser.add_argument("--top-p", type=float, default=1.0, help="sample within the nucleus of mass p (default 1)")
    parser.add_argument("--seed", type=int, default=0, help="the sampling seed: same seed, same text (default 0)")
    parser.add_argument("--no-cache", action="store_true", help="recompute every position each step (slower)")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads; 0 = the library default")
    parser.set_defaults(func=generate_command)
    return parser
