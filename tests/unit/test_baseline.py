"""lmpipe.baseline.baseline and stages/baseline.py: TF-IDF + logistic regression stored as JSON."""

from __future__ import annotations

import json
import os

import numpy as np
import pandas as pd
import pytest
import yaml

from lmpipe.baseline import baseline
from lmpipe.core.errors import LmpipeError
from lmpipe.core.params import BaselineParams

POSITIVE = ["good", "great", "wonderful", "superb", "loved"]
NEGATIVE = ["bad", "awful", "boring", "terrible", "hated"]
NEUTRAL = ["movie", "film", "plot", "actor", "scene", "story", "ending", "music", "cast", "script"]


def reviews(n: int, seed: int, n_labels: int = 2) -> tuple[list[str], np.ndarray]:
    """Toy reviews: one or two cue words among neutral ones (label noise-free, but overlapping)."""
    rng = np.random.default_rng(seed)
    cues = [NEGATIVE, POSITIVE, NEUTRAL[:3]][:n_labels]
    texts, labels = [], []
    for _ in range(n):
        label = int(rng.integers(0, n_labels))
        words = [*rng.choice(cues[label], size=int(rng.integers(1, 3))), *rng.choice(NEUTRAL, size=8)]
        texts.append(" ".join(rng.permutation(words)))
        labels.append(label)
    return texts, np.array(labels, dtype=np.int64)


SMALL = BaselineParams(max_features=500, ngram_max=2, min_df=1, C=2.0, max_iter=200)


@pytest.mark.parametrize("n_labels", [2, 3])
def test_json_round_trip_gives_the_sklearn_probabilities(tmp_path, n_labels):
    texts, labels = reviews(200, seed=0, n_labels=n_labels)
    names = ["negative", "positive", "other"][:n_labels]
    pipeline, blob = baseline.fit(texts, labels, SMALL, seed=1, label_names=names)
    baseline.save(blob, tmp_path)
    loaded = baseline.load(tmp_path)
    test_texts, _ = reviews(50, seed=9, n_labels=n_labels)
    test_texts.append("an unseen text with no known word at all")
    expected = pipeline.predict_proba(test_texts)
    got = loaded.predict_proba(test_texts)
    assert got.shape == (51, n_labels)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-9)
    assert loaded.labels == names
    assert b"pickle" not in (tmp_path / "model.json").read_bytes()


def test_model_file_bytes_repeat_and_vocabulary_is_sorted(tmp_path):
    texts, labels = reviews(200, seed=0)
    for run in ("a", "b"):
        baseline.save(baseline.fit(texts, labels, SMALL, 1, ["negative", "positive"])[1], tmp_path / run)
    first = (tmp_path / "a" / "model.json").read_bytes()
    assert first == (tmp_path / "b" / "model.json").read_bytes()
    blob = json.loads(first)
    assert blob["vocabulary"] == sorted(blob["vocabulary"])
    assert len(blob["vocabulary"]) == len(blob["idf"]) == len(blob["coef"][0])
    assert blob["params"]["C"] == 2.0 and blob["params"]["seed"] == 1


def test_baseline_beats_chance_on_separable_reviews():
    texts, labels = reviews(300, seed=0)
    val_texts, val_labels = reviews(200, seed=1)
    pipeline, _ = baseline.fit(texts, labels, SMALL, 1, ["negative", "positive"])
    metrics = baseline.evaluate(pipeline, val_texts, val_labels)
    assert metrics["val_accuracy"] > 0.9 and metrics["val_f1"] > 0.9
    assert metrics["val_loss"] < np.log(2)


def test_load_rejects_a_file_that_is_not_a_baseline(tmp_path):
    (tmp_path / "model.json").write_text('{"format": "something-else"}')
    with pytest.raises(LmpipeError, match="model.json: not a baseline model"):
        baseline.load(tmp_path)
    with pytest.raises(LmpipeError, match="nowhere/model.json: file not found"):
        baseline.load(tmp_path / "nowhere")


def test_a_label_without_train_examples_is_named():
    texts, labels = reviews(50, seed=0)
    with pytest.raises(LmpipeError, match=r"no example of label\(s\) \['other'\]"):
        baseline.fit(texts, labels, SMALL, 1, ["negative", "positive", "other"])


@pytest.fixture
def project(tmp_path, monkeypatch, project_root):
    params = yaml.safe_load((project_root / "params.yaml").read_text())
    params["baseline"].update(min_df=1, max_features=1000)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    processed = tmp_path / "data" / "processed"
    processed.mkdir(parents=True)
    for split, n, seed in [("train", 200, 0), ("val", 100, 1)]:
        texts, labels = reviews(n, seed)
        pd.DataFrame({"text": texts, "label": labels}).to_parquet(processed / f"{split}.parquet")
    (processed / "labels.json").write_text(json.dumps({"labels": ["negative", "positive"]}))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # unreachable: runs untracked
    return tmp_path


def test_stage_writes_the_model_and_metrics(project):
    from stages.baseline import main

    with pytest.warns(UserWarning, match="not reachable"):
        main()
    metrics = json.loads((project / "reports/baseline/metrics.json").read_text())
    assert metrics["train_examples"] == 200 and metrics["val_examples"] == 100
    assert metrics["val_accuracy"] > 0.9
    model = baseline.load(project / "models/baseline")
    texts, labels = reviews(100, seed=1)
    assert baseline.evaluate(model, texts, labels)["val_accuracy"] == metrics["val_accuracy"]


def test_stage_names_a_missing_processed_file(project):
    from stages.baseline import main

    os.remove(project / "data/processed/train.parquet")
    with pytest.raises(LmpipeError, match="data/processed/train.parquet: file not found"):
        main()
    assert not (project / "models").exists()


def test_stage_names_a_label_id_outside_labels_json(project):
    from stages.baseline import main

    path = project / "data/processed/val.parquet"
    frame = pd.read_parquet(path)
    frame.loc[7, "label"] = 5
    frame.to_parquet(path)
    with pytest.raises(LmpipeError, match=r"val.parquet row 7: label id 5 is outside 0..1"):
        with pytest.warns(UserWarning):
            main()
