"""The exported model's lineage (`lineage.json`) and its model card (`README.md`).

Lineage: every stage upstream of the export in `dvc.lock` (the stages whose outputs the export read,
followed back to the raw data) with its command, params and the md5 of each dep and out; the md5 of
the export's own inputs now, and whether each still equals what dvc.lock recorded; the last commit
that changed the pipeline's sources (code, params, dvc.yaml) and whether they had uncommitted edits
(lmpipe.core.lineage.code_state: not HEAD, so committing the lock keeps it); the versions of the
packages that shape the model; the md5 of every exported file. Only project-relative paths, no
environment, no times, no MLflow run ids (they would make two identical exports differ; `lmpipe
audit` finds the runs by hash tags), and keys sorted: the same export gives the same bytes.

Card: Hugging Face model-card front matter (YAML) and a body a reader can act on: intended use,
limits, the evaluation table, the ONNX parity gates it passed, how to run it, the numerics mode
and the lineage.
"""

from __future__ import annotations

import json
import platform
from collections.abc import Iterable
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import yaml

from lmpipe.core.lineage import code_state, dir_listing, upstream_stages
from lmpipe.core.reports import PERF_DIR

# Distributions whose versions decide what the exported files contain and how they run.
PACKAGES = (
    "torch",
    "transformers",
    "tokenizers",
    "safetensors",
    "peft",
    "onnx",
    "onnxscript",
    "onnxruntime",
    "mlflow",
    "dvc",
    "scikit-learn",
    "pandas",
    "numpy",
    "pyarrow",
)

# What each corpus is: fetch.source -> (name, language, domain, known biases).
SOURCES = {
    "imdb": (
        "IMDB 50K movie reviews",
        "en",
        "English movie reviews from IMDB",
        "who writes reviews, which films get reviewed, polar ratings only (no neutral reviews)",
    ),
    "rotten_tomatoes": (
        "Rotten Tomatoes review snippets",
        "en",
        "English movie-review snippets from Rotten Tomatoes",
        "professional critics only, one-sentence snippets, fresh/rotten as the source labelled them",
    ),
    "bbc_news": (
        "BBC News articles (5 topics)",
        "en",
        "English BBC news articles from 2004-2005",
        "one British outlet, two years, five topics: any other topic is forced into one of them",
    ),
    "file": ("a user-supplied labelled file", None, "the user's own texts", "those of the file and its labelling"),
}
UNKNOWN_SOURCE = ("unrecorded data", None, "the training texts", "unknown: the data source is not in dvc.lock")
METRIC_NAMES = ("accuracy", "f1", "precision", "recall", "roc_auc", "ece")


# --------------------------------------------------------------------------- lineage
def package_versions(names: Iterable[str] = PACKAGES) -> dict[str, str | None]:
    """{distribution: installed version, None when not installed}."""
    out: dict[str, str | None] = {}
    for name in names:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def _entry_hash(item: dict[str, Any]) -> str | None:
    """The md5 of one dvc.lock dep or out."""
    return item.get("md5")  # DVC 3 lock entries: {path, hash: md5, md5, size[, nfiles]}


def _stage_record(entry: dict[str, Any]) -> dict[str, Any]:
    """A stage's dvc.lock entry reduced to its command, params and the path and md5 of each dep and out."""

    def files(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """[{path, md5}] of lock entries; timings (reports/perf/) say nothing of how the model was made."""
        return [{"path": i["path"], "md5": _entry_hash(i)} for i in items if not _is_perf(i["path"])]

    return {
        "cmd": entry.get("cmd", ""),
        "params": entry.get("params", {}),
        "deps": files(entry.get("deps", [])),
        "outs": files(entry.get("outs", [])),
    }


def _is_perf(path: str) -> bool:
    return Path(path).as_posix().startswith(PERF_DIR.as_posix() + "/")


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
    numerics: dict[str, Any] | None = None,
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
        "git": code_state(root),  # the sources' last commit: a later commit of only outputs or docs keeps it
        "packages": package_versions(),
        "python": platform.python_version(),
        "numerics": numerics,  # lmpipe.core.numerics.contract: what decides the bytes
        "files": files,
    }


def lineage_json(lineage: dict[str, Any]) -> str:
    """lineage.json's text: indented, keys sorted, one trailing newline."""
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
        provenance = (
            f"{package.get('member')} in the {package.get('name')}=={package.get('version')} wheel "
            f"(sha256 {package.get('sha256')})"
        )
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
        how = (
            "the architecture of the encoder pretrained by this pipeline, at random init"
            if isinstance(run, dict) and run.get("init") == "random"
            else "encoder pretrained from scratch by this pipeline"
        )
        what = f"{family} {how} ({shape.get('num_layers', '?')} layers, hidden {shape.get('hidden_size', '?')})"
    else:
        what = f"backbone {backbone!r}"
    return f"local:{source} ({what}; fine-tuning mode: {mode})"


def _fmt(value: Any, digits: int = 4) -> str:
    """A metric for a table cell: `n/a` for None, floats to `digits` decimals."""
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _front_matter(card: dict[str, Any]) -> str:
    """The YAML header block between `---` lines."""
    return "---\n" + yaml.safe_dump(card, sort_keys=False, allow_unicode=True, width=1000) + "---\n"


@dataclass(frozen=True)
class _Card:
    """What the card sections read: the arguments of `render_card` and the facts derived from the lineage."""

    lineage: dict[str, Any]
    registered_name: str
    labels: list[str]
    encoding: dict[str, Any]
    parity: dict[str, Any]
    test_metrics: dict[str, Any] | None
    baseline_metrics: dict[str, Any] | None
    val_metrics: dict[str, Any]
    trimming: dict[str, Any]
    dataset: str
    language: str | None
    domain: str
    biases: str
    provenance: str
    packaged: bool  # the data came from a package without a stated licence (not a user's file)
    base: str

    @property
    def model(self) -> dict[str, Any]:
        """The exported model's record in the lineage."""
        return self.lineage["model"]

    @property
    def on_test(self) -> bool:
        """Whether test metrics exist (else the card falls back to validation metrics)."""
        return self.test_metrics is not None

    @property
    def split(self) -> str:
        """The split the headline metrics come from."""
        return "test" if self.on_test else "validation"

    @property
    def quantized(self) -> bool:
        """Whether the export holds an int8 ONNX model."""
        return "onnx/model.int8.onnx" in self.lineage["files"]


def _card_facts(lineage: dict[str, Any], **arguments: Any) -> _Card:
    """Bundle `render_card`'s arguments with the data source and backbone descriptions of the lineage."""
    stages = lineage["stages"]
    dataset, language, domain, biases, provenance = describe_source(stages)
    packaged = _param(stages, "fetch", "fetch.source") in set(SOURCES) - {"file"}
    base = describe_base(stages, lineage["model"]["name"], str(arguments["encoding"].get("mode", "?")))
    return _Card(
        lineage,
        **arguments,
        dataset=dataset,
        language=language,
        domain=domain,
        biases=biases,
        provenance=provenance,
        packaged=packaged,
        base=base,
    )


def _headline_results(c: _Card) -> list[dict[str, Any]]:
    """The model-index metrics: test metrics if evaluated, else validation ones without the `val_` prefix."""
    shown = c.test_metrics if c.on_test else {k.removeprefix("val_"): v for k, v in c.val_metrics.items()}
    return [
        {"type": m, "value": round(float(shown[m]), 4), "name": f"{c.split} {m}"}
        for m in METRIC_NAMES
        if isinstance(shown.get(m), (int, float))
    ]


def _front_matter_fields(c: _Card) -> dict[str, Any]:
    """The Hugging Face front matter as a dict, in the order it is written."""
    results = _headline_results(c)
    tags = [
        "text-classification",
        "onnx",
        "lmpipe",
        f"backbone-{c.model['name']}",
        f"finetune-{c.encoding.get('mode', 'unknown')}",
    ]
    front: dict[str, Any] = {"language": [c.language]} if c.language else {}
    front.update(
        {
            "license": "other",
            "license_name": "unknown-training-data-licence",
            "library_name": "transformers",
            "pipeline_tag": "text-classification",
            "tags": tags,
            "datasets": [f"local:{c.dataset} ({c.provenance})"],
            "metrics": [r["type"] for r in results],
            "base_model": c.base,
            "model-index": [
                {
                    "name": c.registered_name,
                    "results": [
                        {
                            "task": {"type": "text-classification", "name": "Text Classification"},
                            "dataset": {"name": c.dataset, "type": "local", "split": c.split},
                            "metrics": results,
                        }
                    ],
                }
            ],
        }
    )
    return front


def _header_section(c: _Card) -> list[str]:
    """Front matter, title and the one-paragraph summary of what the folder holds."""
    int8 = "and an int8 dynamically quantized ONNX model (`onnx/model.int8.onnx`), " if c.quantized else ""
    summary = (
        f"A {len(c.labels)}-class text classifier ({', '.join(c.labels)}) fine-tuned by the lmpipe pipeline "
        f"from `{c.model['source']}` (backbone `{c.model['name']}`, chosen by {c.model['selected_by']}). "
        "This folder holds the transformers model (`hf/`), its ONNX export (`onnx/model.onnx`) "
        + int8
        + "this card and `lineage.json`.\n"
    )
    return [_front_matter(_front_matter_fields(c)), f"# {c.registered_name}\n", summary]


def _intended_use_section(c: _Card) -> list[str]:
    """What the model is for, and what it is not for."""
    return [
        "## Intended use\n",
        f"Labelling {c.domain} as {' / '.join(c.labels)}: batch scoring of such texts, comparing "
        "pipeline runs, and as a reproducible, auditable example of the workflow. It is not meant "
        "for decisions about people, content moderation, or text unlike its training data.\n",
    ]


def _limits_section(c: _Card) -> list[str]:
    """Budget, truncation, data and calibration limits."""
    head_tail = c.encoding.get("truncation") == "head_tail"
    kept = "the first and the last tokens (head + tail)" if head_tail else "the first tokens"
    return [
        "## Limits\n",
        f"- Trained on a CPU budget (2 cores, minutes): a small model and few optimizer steps "
        f"(best step {c.encoding.get('best_step', 'n/a')}); a GPU budget would do better.\n"
        f"- Each text is cut to {c.encoding.get('max_length')} tokens keeping {kept}; the middle of a long "
        "text is never seen. `transformers.pipeline` cuts head-only (with `truncation=True`), so it "
        "can differ from `lmpipe predict` on long texts.\n"
        f"- Data: {c.domain}. Other domains and languages, sarcasm, mixed or neutral texts are out of "
        f"distribution; the labels are the source's own and carry its biases ({c.biases}).\n"
        "- Probabilities are not guaranteed to be calibrated (see ECE below).\n",
    ]


def _licence_section(c: _Card) -> list[str]:
    """The licence the weights inherit from the training data."""
    if c.packaged:
        text = (
            f"`license: other`: the training data ({c.provenance}) is redistributed by its package "
            "without a stated licence, so the weights inherit an unknown licence. Check the "
            "data's terms before any use beyond research.\n"
        )
    else:
        text = (
            f"`license: other`: the licence of the training data ({c.provenance}) is not recorded; "
            "the weights inherit it. State it here before sharing the model.\n"
        )
    return ["## Licence\n", text]


def _metric_cell(row: dict[str, Any], metric: str) -> str:
    """`value [low, high]`, or the bare value when the row has no interval for `metric`."""
    low, high = row.get(f"{metric}_ci_low"), row.get(f"{metric}_ci_high")
    interval = f" [{_fmt(low, 3)}, {_fmt(high, 3)}]" if low is not None and high is not None else ""
    return f"{_fmt(row.get(metric))}{interval}"


def _test_table(c: _Card) -> list[str]:
    """This model (and the baseline, if evaluated) on the test split, with bootstrap intervals."""
    rows = [("this model", c.test_metrics)]
    if c.baseline_metrics:
        rows.append(("TF-IDF + logistic regression baseline", c.baseline_metrics))
    return [
        "On the held-out test split (`reports/evaluate/metrics.json`), 95% bootstrap intervals:\n",
        "| model | " + " | ".join(METRIC_NAMES) + " |",
        "|---|" + "---|" * len(METRIC_NAMES),
        *(f"| {label} | " + " | ".join(_metric_cell(row, m) for m in METRIC_NAMES) + " |" for label, row in rows),
        "",
    ]


def _validation_table(c: _Card) -> list[str]:
    """The validation metrics, for an export made before any test evaluation."""
    return [
        "No test evaluation was found (`reports/evaluate/metrics.json`); validation metrics:\n",
        "| metric | value |\n|---|---|",
        *(f"| {k} | {_fmt(v)} |" for k, v in sorted(c.val_metrics.items())),
        "",
    ]


def _evaluation_section(c: _Card) -> list[str]:
    """The metrics table and how the model was selected."""
    candidates = ", ".join(f"`{k}` {_fmt(v)}" for k, v in sorted(c.model["candidates"].items()))
    selection = f"Model selection (validation {c.model['selected_by']}, never the test split): {candidates}.\n"
    return ["## Evaluation\n", *(_test_table(c) if c.on_test else _validation_table(c)), selection]


def _size_mb(files: dict[str, dict[str, Any]], rel: str) -> str:
    """An exported file's size in MB, `n/a` when it was not exported."""
    return f"{files[rel]['size'] / 1e6:.1f}" if rel in files else "n/a"


def _parity_section(c: _Card) -> list[str]:
    """The parity gates each backend passed against torch, with file sizes (the figures are perf)."""
    gates = c.lineage["export"]["params"]
    files = c.lineage["files"]
    rows = [
        ("torch fp32", f"reference: accuracy {_fmt(c.parity['torch_accuracy'])}", "hf/model.safetensors"),
        ("onnx fp32", f"max abs logit diff <= {gates['max_logit_diff']:g}", "onnx/model.onnx"),
    ]
    if c.quantized:
        rows.append(("onnx int8", f"accuracy drop <= {gates['max_int8_accuracy_drop']:g}", "onnx/model.int8.onnx"))
    return [
        "### ONNX parity\n",
        f"{c.parity['samples']} test examples through torch and onnxruntime (same encoding and batches); "
        "the export stops unless every gate holds:\n",
        "| backend | gate against torch | file | MB |",
        "|---|---|---|---|",
        *(f"| {backend} | {gate} | {file} | {_size_mb(files, file)} |" for backend, gate, file in rows),
        "\nonnxruntime picks its kernels by CPU (AVX2, AVX-512, VNNI for int8) and has no setting to pin them, so "
        "what it measured (logit differences, agreement, int8 accuracy) changes in its last digits from machine "
        "to machine: those figures are in `reports/perf/export.json`, with the machine's numeric environment and "
        "the latency per backend, and in the export's MLflow run. The files above are the same bytes on every "
        "machine in portable numerics.\n",
    ]


def _trimming_section(c: _Card) -> list[str]:
    """Accuracy, parameters and size of each layer drop measured before quantization."""
    if not c.trimming:
        return []
    lines = [
        "### Trimming before quantization\n",
        f"Top encoder layers dropped (no retraining), torch fp32 on the same {c.parity['samples']} test examples:\n",
        "| layers dropped | layers | parameters (M) | safetensors MB | accuracy | accuracy drop |",
        "|---|---|---|---|---|---|",
    ]
    for row in c.trimming.values():
        lines.append(
            f"| {row['drop_layers']} | {row['layers']} | {row['params_m']} | {row['size_mb']} | "
            f"{_fmt(row['accuracy'])} | {_fmt(row['accuracy_drop'])} |"
        )
    shipped = c.encoding.get("trimmed_top_layers", 0)
    lines.append(f"\nShipped: {shipped} layers dropped. Latencies are in `reports/perf/export.json`.\n")
    return lines


def _usage_section(c: _Card) -> list[str]:
    """Command-line, serving and transformers snippets, and the ONNX signature."""
    snippets = (
        "```bash\n"
        'lmpipe predict "A tender, funny film."                      # torch\n'
        "lmpipe predict --input reviews.csv --output preds.csv --backend onnx-int8\n"
        f"mlflow models serve -m models:/{c.registered_name}/<version> --env-manager local\n"
        "```\n\n"
        "```python\n"
        "from transformers import pipeline\n"
        'clf = pipeline("text-classification", model="models/export/hf")\n'
        f'clf("A tender, funny film.", truncation=True)  # cut at {c.encoding.get("max_length")} tokens, head only\n'
        "```\n"
    )
    signature = (
        "ONNX inputs: `" + "`, `".join(c.model["onnx_inputs"]) + "` (int64, [batch, sequence]); output "
        f"`logits` [batch, {len(c.labels)}]; label i = `{c.labels}`[i].\n"
    )
    return ["## How to use\n", snippets, signature]


def _match_word(match: bool | None) -> str:
    """How an input's md5 compares with dvc.lock: ok, not recorded (None) or DIFFERENT."""
    return "ok" if match else ("not recorded" if match is None else "DIFFERENT")


def _numerics_line(numerics: dict[str, Any] | None) -> str:
    """How the numbers were computed: the numerics mode and what it guarantees."""
    if not numerics:
        return "- numerics: not recorded"
    if numerics["mode"] == "portable":
        return (
            "- numerics `portable` (AVX2 kernels of torch, MKL, numpy and OpenBLAS, fixed thread counts: "
            f"`{' '.join(f'{k}={v}' for k, v in numerics['pinned'].items())}`): any x86-64 machine with AVX2 "
            "rebuilds these bytes; `lmpipe audit --rebuild` checks it"
        )
    return (
        f"- numerics `{numerics['mode']}`: this CPU's own kernels ({numerics.get('cpu')}, torch "
        f"{numerics.get('torch_isa')}); another CPU makes other bytes (`lmpipe audit --rebuild` says how far)"
    )


def _lineage_summary(lineage: dict[str, Any]) -> list[str]:
    """Git state, interpreter and package versions, and the export inputs against dvc.lock."""
    git = lineage["git"]
    packages = ", ".join(f"{k} {v}" for k, v in sorted(lineage["packages"].items()) if v)
    return [
        "## Lineage\n",
        f"- code revision `{git.get('rev')}`: the last commit that changed the pipeline's code or params "
        f"(uncommitted changes: {git.get('dirty')})",
        f"- python {lineage['python']}; {packages}",
        _numerics_line(lineage.get("numerics")),
        "- `lmpipe audit models/export` re-checks every hash below against the disk.\n",
        "Export inputs (md5 now; `ok` = equal to what `dvc.lock` recorded):\n",
        "| path | md5 | matches dvc.lock |\n|---|---|---|",
        *(
            f"| `{path}` | `{md5}` | {_match_word(lineage['inputs_match_lock'].get(path))} |"
            for path, md5 in lineage["inputs"].items()
        ),
        "",
    ]


def _stage_section(name: str, stage: dict[str, Any]) -> list[str]:
    """One upstream stage: its command, params and the md5 of each dep and out."""
    lines = [f"### stage `{name}`\n", f"`{stage['cmd']}`\n"]
    params = stage["params"].get("params.yaml", {})
    if params:
        lines += ["params:\n", "```yaml\n" + yaml.safe_dump(params, sort_keys=True, width=1000) + "```\n"]
    lines.append("| kind | path | md5 |\n|---|---|---|")
    lines += [f"| dep | `{d['path']}` | `{d['md5']}` |" for d in stage["deps"]]
    lines += [f"| out | `{o['path']}` | `{o['md5']}` |" for o in stage["outs"]]
    return lines + [""]


def _files_section(files: dict[str, dict[str, Any]]) -> list[str]:
    """The md5 and size of every exported file."""
    return [
        "### exported files\n",
        "| file | md5 | bytes |\n|---|---|---|",
        *(f"| `{rel}` | `{f['md5']}` | {f['size']} |" for rel, f in files.items()),
    ]


def _lineage_section(lineage: dict[str, Any]) -> list[str]:
    """The whole lineage: summary, every upstream stage, the exported files."""
    stages = [line for name, stage in lineage["stages"].items() for line in _stage_section(name, stage)]
    return [*_lineage_summary(lineage), *stages, *_files_section(lineage["files"])]


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
    trimming: dict[str, Any] | None = None,
) -> str:
    """The model card: YAML front matter + markdown body, deterministic for a given lineage."""
    c = _card_facts(
        lineage,
        registered_name=registered_name,
        labels=labels,
        encoding=encoding,
        parity=parity,
        test_metrics=test_metrics,
        baseline_metrics=baseline_metrics,
        val_metrics=val_metrics,
        trimming=trimming or {},
    )
    sections = (
        _header_section,
        _intended_use_section,
        _limits_section,
        _licence_section,
        _evaluation_section,
        _parity_section,
        _trimming_section,
        _usage_section,
    )
    lines = [line for section in sections for line in section(c)] + _lineage_section(lineage)
    return "\n".join(lines) + "\n"
