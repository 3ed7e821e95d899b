"""Take docs/mlflow-runs.png: the MLflow UI's runs table, pipeline runs with the newest one's stages unfolded.

Optional, for refreshing the README's image; needs Chromium and Playwright, which the project does
not depend on (`apt-get install chromium`, `pip install playwright` in any Python). With an MLflow
UI serving the store (`make ui PORT=5055`, or `mlflow ui` on a copy of mlflow.db):

    python docs/mlflow_screenshot.py http://127.0.0.1:5055 1 docs/mlflow-runs.png

It sets the table's state the way the UI keeps it (localStorage): the `headline.*` columns and the
model tag shown, the newest pipeline run unfolded, the assistant panel closed.
"""

import json
import sys
import urllib.request

from playwright.sync_api import sync_playwright

HEADLINE = ["acc", "acc_lo", "acc_hi", "f1", "tfidf_acc", "gain"]


def main(base: str, experiment: str, out: str, unfold: int = 1) -> None:
    query = {
        "experiment_ids": [experiment],
        "filter": "tags.`lmpipe.kind` = 'pipeline'",
        "order_by": ["attributes.start_time DESC"],
        "max_results": 50,
    }
    request = urllib.request.Request(
        f"{base}/api/2.0/mlflow/runs/search", json.dumps(query).encode(), {"Content-Type": "application/json"}
    )
    parents = [r["info"]["run_id"] for r in json.load(urllib.request.urlopen(request)).get("runs", [])]
    state = {
        "selectedColumns": ["tags.`lmpipe.headline.model`", *(f"metrics.`headline.{k}`" for k in HEADLINE)],
        "runsExpanded": {run: True for run in parents[:unfold]},
    }
    key = f'MLflowLocalStorage-1.1-ExperimentPage-["{experiment}"]-ReactComponentState'
    init = f"""
        const old = JSON.parse(localStorage.getItem({json.dumps(key)}) || "{{}}");
        localStorage.setItem({json.dumps(key)}, JSON.stringify({{...old, ...{json.dumps(state)}}}));
        localStorage.setItem("mlflow.assistant.panelOpen_v1", "false");
        localStorage.setItem("mlflow.assistant.fab.autoOpenedOnFirstLoad_v1", "true");
    """
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path="/usr/bin/chromium", args=["--no-sandbox", "--disable-gpu", "--disable-quic"]
        )
        page = browser.new_page(viewport={"width": 1600, "height": 860})
        page.add_init_script(init)
        page.goto(f"{base}/#/experiments/{experiment}/runs?workflowType=machine_learning")
        page.wait_for_selector("text=evaluate", timeout=60_000)  # an unfolded stage run
        page.wait_for_timeout(2000)  # the metric cells fill in after the rows
        page.screenshot(path=out)
        browser.close()


if __name__ == "__main__":
    main(*sys.argv[1:4], *map(int, sys.argv[4:5]))
