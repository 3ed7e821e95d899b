"""The exported model's lineage (`lineage.json`) and its model card (`README.md`).

Lineage: every stage upstream of the export in `dvc.lock` (the stages whose outputs the export
read, followed back to the raw data) with its command, params and the md5 of each dep and out;
the md5 of the export's own inputs now, and whether each still equals what dvc.lock recorded;
the git revision and dirty flag; the versions of the packages that shape the model; the md5 of
every exported file. Only project-relative paths, no environment, no times, no MLflow run ids
(they would make two identical exports differ; `lmpipe audit` finds the runs by hash tags), and
keys sorted: the same export gives the same bytes.

Card: Hugging Face model-card front matter (YAML) and a body a reader can act on: intended use,
limits, the evaluation table, the ONNX parity figures, how to run it, and the lineage.
"""

from __future__ import annotations

import json
import platform
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Iterable

import yaml

from lmpipe.lineage import dir_listing, file_md5, git_state, upstream_stages

# Distributions whose versions decide what the exported files contain and how they run.
PACKAGES = (
    "torch", "transformers", "tokenizers", "safetensors", "peft", "onnx", "onnxscript",
    "onnxruntime", "mlflow", "dvc", "scikit-learn", "pandas", "numpy", "pyarrow",
)

# What each corpus is: fetch.source -> (name, language, domain, known biases).
SOURCES = {
    "imdb": ("IMDB 50K movie reviews", "en", "English movie reviews from IMDB",
             "who writes reviews, which films get reviewed, polar ratings only (no neutral reviews)"),
    "rotten_tomatoes": ("Rotten Tomatoes review snippets", "en", "English movie-review snippets from Rotten Tomatoes",
                        "professional critics only, one-sentence snippets, fresh/rotten as the source labelled them"),
    "bbc_news": ("BBC News articles (5 topics)", "en", "English BBC news articles from 2004-2005",
                 "one British outlet, two years, five topics: any other topic is forced into one of them"),
    "file": ("a user-supplied labelled file", None, "the user's own texts", "those of the file and its labelling"),
}
UNKNOWN_SOURCE = ("unrecorded data", None, "the training texts", "unknown: the data source is not in dvc.lock")
METRIC_NAMES = ("accuracy", "f1", "precision", "recall", "roc_auc", "ece")


# --------------------------------------------------------------------------- lineage
def package_versions(names: Iterable[str] = PACKAGES) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in names:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def _entry_hash(item: dict[str, Any]) -> str | None:
    return item.get("md5")  # DVC 3 lock entries: {path, hash: md5, md5, size[, nfiles]}


def _stage_record(entry: dict[str, Any]) -> dict[str, Any]:
    def files(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [{"path": i["path"], "md5": _entry_hash(i)} for i in items]

    return {
        "cmd": entry.get("cmd", ""),
        "params": entry.get("params", {}),
        "deps": files(entry.get("deps", [])),
        "outs": files(entry.get("outs", [])),
    }


def recorded_md5(lock: dict[str, Any], path: str) -> str | None:
    """The md5 dvc.lock records for `path` as some stage's output (None when not recorded)."""
    for entry in lock.values():
        for out in entry.get("outs", []):
            if out["path"].rstrip("/") == path.rstrip("/"):
                return _entry_hash(out)
    return None


def file_table(folder: Path, skip: Iterable[str] = ()) -> dict[str, dict[str, Any]]:
    """{relpath: {md5, size}} of every file under `folder` except `skip`."""
    skipped = set(skip)
    return {
        e["relpath"]: {"md5": e["md5"], "size": (folder / e["relpath"]).stat().st_size}
        for e in dir_listing(folder)
        if e["relpath"] not in skipped
    }


def build_lineage(
    root: str | Path,
    lock: dict[str, Any],
    inputs: dict[str, str],
    *,
    model: dict[str, Any],
    export: dict[str, Any],
    files: dict[str, dict[str, Any]],
) -> dict[str, Any]:
    """The machine-readable lineage of one export (see the module docstring).

    `inputs` maps each project-relative path the export read to its DVC md5 now.
    """
    stages = upstream_stages(lock, inputs)
    matches = {}
    for path, md5 in sorted(inputs.items()):
        recorded = recorded_md5(lock, path)
        matches[path] = None if recorded is None else recorded == md5
    return {
        "format": 1,
        "model": model,
        "export": export,
        "inputs": dict(sorted(inputs.items())),
        "inputs_match_lock": matches,
        "stages": {name: _stage_record(lock[name]) for name in stages},
        "git": git_state(root),
        "packages": package_versions(),
        "python": platform.python_version(),
        "files": files,
    }


def lineage_json(lineage: dict[str, Any]) -> str:
    return json.dumps(lineage, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


# --------------------------------------------------------------------------- card
def _param(stages: dict[str, Any], stage: str, key: str) -> Any:
    """A param value from a stage's lock record (`fetch.source`, or inside `fetch.packages.imdb`)."""
    params = (stages.get(stage) or {}).get("params", {}).get("params.yaml", {})
    if key in params:
        return params[key]
    for prefix, value in params.items():
        if key.startswith(prefix + ".") and isinstance(value, dict):
            for part in key[len(prefix) + 1 :].split("."):
                value = value.get(part) if isinstance(value, dict) else None
            return value
    return None


def describe_source(stages: dict[str, Any]) -> tuple[str, str | None, str, str, str]:
    """(name, language, domain, biases, provenance) of the training data, from the fetch stage."""
    source = _param(stages, "fetch", "fetch.source")
    name, language, domain, biases = SOURCES.get(source, UNKNOWN_SOURCE)
    package = _param(stages, "fetch", f"fetch.packages.{source}") if source else None
    if source == "file":
        where = _param(stages, "fetch", "fetch.file") or {}
        provenance = f"file {where.get('path', '?')}"
    elif isinstance(package, dict):
        provenance = f"{package.get('member')} in the {package.get('name')}=={package.get('version')} wheel (sha256 {package.get('sha256')})"
    else:
        provenance = "provenance not recorded"
    return name, language, domain, biases, provenance


def describe_base(stages: dict[str, Any], backbone: str, mode: str) -> str:
    """A local description of the backbone (never a hub id: nothing was downloaded from a hub)."""
    run = _param(stages, f"finetune@{backbone}", f"finetune.backbones.{backbone}") or {}
    source = run.get("source", "?") if isinstance(run, dict) else "?"
    if "fetch_backbone" in stages and source == "models/minilm":
        pkg = _param(stages, "fetch_backbone", "fetch.packages.minilm") or {}
        what = f"MiniLM-L6 from the {pkg.get('name')}=={pkg.get('version')} wheel"
    elif source == "models/pretrained":
        shape = _param(stages, "pretrain", "pretrain.model") or {}
        family = shape.get("family", "bert") if isinstance(shape, dict) else "bert"
        how = ("the architecture of the encoder pretrained by this pipeline, at random init"
               if isinstance(run, dict) and run.get("init") == "random"
               else "encoder pretrained from scratch by this pipeline")
        what = f"{family} {how} ({shape.get('num_layers', '?')} layers, hidden {shape.get('hidden_size', '?')})"
    else:
        what = f"backbone {backbone!r}"
    return f"local:{source} ({what}; fine-tuning mode: {mode})"


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _front_matter(card: dict[str, Any]) -> str:
    return "---\n" + yaml.safe_dump(card, sort_keys=False, allow_unicode=True, width=1000) + "---\n"


def render_card(
    lineage: dict[str, Any],
    *,
    registered_name: str,
    labels: list[str],
    encoding: dict[str, Any],
    parity: dict[str, Any],
    test_metrics: dict[str, Any] | None,
    baseline_metrics: dict[str, Any] | None,
    val_metrics: dict[str, Any],
) -> str:
    """The model card: YAML front matter + markdown body, deterministic for a given lineage."""
    stages = lineage["stages"]
    model = lineage["model"]
    dataset, language, domain, biases, provenance = describe_source(stages)
    packaged = _param(stages, "fetch", "fetch.source") in set(SOURCES) - {"file"}
    base = describe_base(stages, model["name"], str(encoding.get("mode", "?")))
    on_test = test_metrics is not None
    shown = test_metrics if on_test else {k.removeprefix("val_"): v for k, v in val_metrics.items()}
    split = "test" if on_test else "validation"
    results = [
        {"type": m, "value": round(float(shown[m]), 4), "name": f"{split} {m}"}
        for m in METRIC_NAMES
        if isinstance(shown.get(m), (int, float))
    ]
    front: dict[str, Any] = {}
    if language:
        front["language"] = [language]
    front.update({
        "license": "other",
        "license_name": "unknown-training-data-licence",
        "library_name": "transformers",
        "pipeline_tag": "text-classification",
        "tags": ["text-classification", "onnx", "lmpipe", f"backbone-{model['name']}", f"finetune-{encoding.get('mode', 'unknown')}"],
        "datasets": [f"local:{dataset} ({provenance})"],
        "metrics": [r["type"] for r in results],
        "base_model": base,
        "model-index": [{
            "name": registered_name,
            "results": [{
                "task": {"type": "text-classification", "name": "Text Classification"},
                "dataset": {"name": dataset, "type": "local", "split": split},
                "metrics": results,
            }],
        }],
    })

    out = [_front_matter(front), f"# {registered_name}\n"]
    out.append(
        f"A {len(labels)}-class text classifier ({', '.join(labels)}) fine-tuned by the lmpipe pipeline "
        f"from `{model['source']}` (backbone `{model['name']}`, chosen by {model['selected_by']}). "
        "This folder holds the transformers model (`hf/`), its ONNX export (`onnx/model.onnx`) "
        + ("and an int8 dynamically quantized ONNX model (`onnx/model.int8.onnx`), " if "int8_accuracy" in parity else "")
        + "this card and `lineage.json`.\n"
    )
    out.append("## Intended use\n")
    out.append(
        f"Labelling {domain} as {' / '.join(labels)}: batch scoring of such texts, comparing "
        "pipeline runs, and as a reproducible, auditable example of the workflow. It is not meant "
        "for decisions about people, content moderation, or text unlike its training data.\n"
    )
    out.append("## Limits\n")
    trunc = encoding.get("truncation")
    how = "the first and the last tokens (head + tail)" if trunc == "head_tail" else "the first tokens"
    out.append(
        f"- Trained on a CPU budget (2 cores, minutes): a small model and few optimizer steps "
        f"(best step {encoding.get('best_step', 'n/a')}); a GPU budget would do better.\n"
        f"- Each text is cut to {encoding.get('max_length')} tokens keeping {how}; the middle of a long "
        "text is never seen. `transformers.pipeline` cuts head-only (with `truncation=True`), so it "
        "can differ from `lmpipe predict` on long texts.\n"
        f"- Data: {domain}. Other domains and languages, sarcasm, mixed or neutral texts are out of "
        f"distribution; the labels are the source's own and carry its biases ({biases}).\n"
        "- Probabilities are not guaranteed to be calibrated (see ECE below).\n"
    )
    out.append("## Licence\n")
    if packaged:
        out.append(
            f"`license: other`: the training data ({provenance}) is redistributed by its package "
            "without a stated licence, so the weights inherit an unknown licence. Check the "
            "data's terms before any use beyond research.\n"
        )
    else:
        out.append(
            f"`license: other`: the licence of the training data ({provenance}) is not recorded; "
            "the weights inherit it. State it here before sharing the model.\n"
        )
    out.append("## Evaluation\n")
    if on_test:
        out.append(f"On the held-out test split (`reports/evaluate/metrics.json`), 95% bootstrap intervals:\n")
        rows = [("this model", test_metrics)] + ([("TF-IDF + logistic regression baseline", baseline_metrics)] if baseline_metrics else [])
        out.append("| model | " + " | ".join(METRIC_NAMES) + " |")
        out.append("|---|" + "---|" * len(METRIC_NAMES))
        for label, row in rows:
            cells = []
            for m in METRIC_NAMES:
                lo, hi = row.get(f"{m}_ci_low"), row.get(f"{m}_ci_high")
                ci = f" [{_fmt(lo, 3)}, {_fmt(hi, 3)}]" if lo is not None and hi is not None else ""
                cells.append(f"{_fmt(row.get(m))}{ci}")
            out.append(f"| {label} | " + " | ".join(cells) + " |")
        out.append("")
    else:
        out.append("No test evaluation was found (`reports/evaluate/metrics.json`); validation metrics:\n")
        out.append("| metric | value |\n|---|---|")
        out.extend(f"| {k} | {_fmt(v)} |" for k, v in sorted(val_metrics.items()))
        out.append("")
    out.append(f"Model selection (validation {model['selected_by']}, never the test split): "
               + ", ".join(f"`{k}` {_fmt(v)}" for k, v in sorted(model["candidates"].items())) + ".\n")
    out.append("### ONNX parity\n")
    out.append(f"{parity['samples']} test examples through torch and onnxruntime (same encoding and batches):\n")
    out.append("| backend | accuracy | max abs logit diff vs torch | agreement with torch | file | MB |")
    out.append("|---|---|---|---|---|---|")
    files = lineage["files"]

    def mb(rel: str) -> str:
        return f"{files[rel]['size'] / 1e6:.1f}" if rel in files else "n/a"

    out.append(f"| torch fp32 | {_fmt(parity['torch_accuracy'])} | 0 | 1 | hf/model.safetensors | {mb('hf/model.safetensors')} |")
    out.append(
        f"| onnx fp32 | {_fmt(parity['onnx_accuracy'])} | {parity['onnx_max_abs_logit_diff']:.2e} | "
        f"{_fmt(parity['onnx_agreement'])} | onnx/model.onnx | {mb('onnx/model.onnx')} |"
    )
    if "int8_accuracy" in parity:
        out.append(
            f"| onnx int8 | {_fmt(parity['int8_accuracy'])} | {parity['int8_max_abs_logit_diff']:.2e} | "
            f"{_fmt(parity['int8_agreement'])} | onnx/model.int8.onnx | {mb('onnx/model.int8.onnx')} |"
        )
    out.append("\nLatency per backend is in `reports/export/metrics.json` (it varies run to run, so it stays out of this card).\n")
    out.append("## How to use\n")
    out.append(
        "```bash\n"
        'lmpipe predict "A tender, funny film."                      # torch\n'
        "lmpipe predict --input reviews.csv --output preds.csv --backend onnx-int8\n"
        f"mlflow models serve -m models:/{registered_name}/<version> --env-manager local\n"
        "```\n\n"
        "```python\n"
        "from transformers import pipeline\n"
        'clf = pipeline("text-classification", model="models/export/hf")\n'
        f'clf("A tender, funny film.", truncation=True)  # cut at {encoding.get("max_length")} tokens, head only\n'
        "```\n"
    )
    out.append("ONNX inputs: `" + "`, `".join(model["onnx_inputs"]) + "` (int64, [batch, sequence]); output `logits` [batch, "
               f"{len(labels)}]; label i = `{labels}`[i].\n")
    out.append("## Lineage\n")
    git = lineage["git"]
    out.append(f"- git revision `{git.get('rev')}` (uncommitted changes: {git.get('dirty')})")
    out.append(f"- python {lineage['python']}; " + ", ".join(f"{k} {v}" for k, v in sorted(lineage["packages"].items()) if v))
    out.append(f"- `lmpipe audit models/export` re-checks every hash below against the disk.\n")
    out.append("Export inputs (md5 now; `ok` = equal to what `dvc.lock` recorded):\n")
    out.append("| path | md5 | matches dvc.lock |\n|---|---|---|")
    for path, md5 in lineage["inputs"].items():
        match = lineage["inputs_match_lock"].get(path)
        out.append(f"| `{path}` | `{md5}` | {'ok' if match else ('not recorded' if match is None else 'DIFFERENT')} |")
    out.append("")
    for name, stage in lineage["stages"].items():
        out.append(f"### stage `{name}`\n")
        out.append(f"`{stage['cmd']}`\n")
        params = stage["params"].get("params.yaml", {})
        if params:
            out.append("params:\n")
            out.append("```yaml\n" + yaml.safe_dump(params, sort_keys=True, width=1000) + "```\n")
        out.append("| kind | path | md5 |\n|---|---|---|")
        out.extend(f"| dep | `{d['path']}` | `{d['md5']}` |" for d in stage["deps"])
        out.extend(f"| out | `{o['path']}` | `{o['md5']}` |" for o in stage["outs"])
        out.append("")
    out.append("### exported files\n")
    out.append("| file | md5 | bytes |\n|---|---|---|")
    out.extend(f"| `{rel}` | `{f['md5']}` | {f['size']} |" for rel, f in files.items())
    return "\n".join(out) + "\n"
