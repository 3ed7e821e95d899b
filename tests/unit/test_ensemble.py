"""Ensembles: lmpipe.inference.ensemble (temperatures, the mean, serving), lmpipe.evaluate.ensembles
(the ensemble's row in evaluate) and `lmpipe predict --ensemble`, on the tiny stand-in project of
tests/unit/test_evaluation.py (a TF-IDF baseline and two 1-layer BERT classifiers)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from lmpipe.cli.main import main as cli_main
from lmpipe.core.errors import LmpipeError
from lmpipe.core.params import EnsembleParams
from lmpipe.evaluate import ensembles as ENS
from lmpipe.evaluate import evaluation as EV
from lmpipe.inference import ensemble as E
from lmpipe.task import metrics as M
from tests.unit.test_evaluation import LABELS, _build_project, write_params

ENSEMBLES = {
    "duo": EnsembleParams(members=["tiny", "baseline"]),
    "raw": EnsembleParams(members=["baseline", "tiny", "tiny_random"], calibration="none"),
}
SETTINGS = SimpleNamespace(bootstrap_samples=200, confidence=0.95, ece_bins=10, batch_size=4, ensembles=ENSEMBLES)


# --------------------------------------------------------------------------- the maths
def _sampled(temperature: float, n: int = 20000, k: int = 3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Logits, and labels drawn from softmax(logits / temperature): the NLL's minimiser is ~temperature."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 3, (n, k))
    probs = M.softmax(logits / temperature)
    labels = (rng.random(n)[:, None] > np.cumsum(probs, axis=1)).sum(axis=1)
    return logits, labels


@pytest.mark.parametrize("true_temperature", [0.5, 1.0, 2.5])
def test_fit_temperature_recovers_the_temperature_that_drew_the_labels(true_temperature):
    logits, labels = _sampled(true_temperature)
    fitted = E.fit_temperature(logits, labels)
    assert fitted == pytest.approx(true_temperature, rel=0.05)
    assert fitted == E.fit_temperature(logits, labels)  # deterministic
    best = E.nll(logits, labels, fitted)
    assert best <= E.nll(logits, labels, fitted * 1.01) and best <= E.nll(logits, labels, fitted / 1.01)


def test_fit_temperature_stops_at_its_bounds_on_separable_data():
    logits = np.array([[2.0, -2.0], [-1.0, 1.0]])
    # all right: sharper is better until the NLL rounds to 0; of those equal fits, the mildest is kept
    sharp = E.fit_temperature(logits, np.array([0, 1]))
    assert sharp < 0.06 and E.nll(logits, np.array([0, 1]), sharp) < 1e-15
    assert E.fit_temperature(logits, np.array([1, 0])) == pytest.approx(E.MAX_TEMPERATURE)


def test_baseline_log_probabilities_calibrate_like_its_logits():
    z = np.random.default_rng(1).normal(0, 2, (50, 2))
    probs = M.softmax(z)
    np.testing.assert_allclose(E.calibrate(E.baseline_logits(probs), 1.0), probs, atol=1e-12)
    np.testing.assert_allclose(E.calibrate(E.baseline_logits(probs), 1.7), M.softmax(z / 1.7), atol=1e-12)


def test_combine_is_the_mean_of_the_members():
    a, b = np.array([[0.9, 0.1]]), np.array([[0.3, 0.7]])
    np.testing.assert_allclose(E.combine([a, b]), [[0.6, 0.4]])


# --------------------------------------------------------------------------- evaluate
@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    return _build_project(tmp_path_factory.mktemp("project"))


@pytest.fixture(scope="module")
def scored(project):
    """(evaluation with the ensemble rows, the ensemble files, the model specs)."""
    test = EV.load_test_set(project / "data/processed")
    val = EV.load_test_set(project / "data/processed", "val")
    specs = EV.find_models(project / "models/baseline", project / "models/finetuned")
    result = EV.evaluate(test, specs, pretrained=None, settings=SETTINGS, seed=0)
    files = ENS.add_ensembles(
        result, specs, val, out_dir=project / "models/ensembles", settings=SETTINGS, seed=0, device="cpu"
    )
    ENS.write_files(files, project / "models/ensembles")
    return result, files, specs


def test_ensemble_is_the_mean_of_members_calibrated_on_val(scored, project):
    result, files, _ = scored
    by_name = {r.name: r for r in result.models}
    val = EV.load_test_set(project / "data/processed", "val")
    tiny_val = EV.transformer_logits(project / "models/finetuned/tiny", val.texts, LABELS, 4, "cpu")
    base_val = E.baseline_logits(EV.predict_baseline(project / "models/baseline", val.texts, LABELS))
    t_tiny, t_base = E.fit_temperature(tiny_val, val.labels), E.fit_temperature(base_val, val.labels)
    expected = (
        E.calibrate(by_name["tiny"].logits, t_tiny) + E.calibrate(E.baseline_logits(by_name["baseline"].probs), t_base)
    ) / 2
    np.testing.assert_allclose(by_name["duo"].probs, expected, atol=1e-12)
    members = {m["name"]: m for m in files["duo"]["members"]}
    assert (members["tiny"]["temperature"], members["baseline"]["temperature"]) == (t_tiny, t_base)
    assert members["tiny"]["path"] == "../finetuned/tiny" and members["baseline"]["kind"] == "baseline"
    assert members["baseline"]["val_nll_calibrated"] <= members["baseline"]["val_nll"]
    raw = {m["name"]: m["temperature"] for m in files["raw"]["members"]}
    assert raw == {"baseline": 1.0, "tiny": 1.0, "tiny_random": 1.0}  # calibration: none


def test_ensemble_row_has_ci_mcnemar_temperatures_and_best_member(scored, project, tmp_path):
    result, _, _ = scored
    head = EV.write_reports(result, tmp_path)
    row, labels = head["duo"], result.test.labels
    for metric in M.METRICS:
        assert row[f"{metric}_ci_low"] <= row[metric] <= row[f"{metric}_ci_high"], metric
    duo = next(r for r in result.models if r.name == "duo")
    base = result.models[0]
    assert row["mcnemar_p"] == M.mcnemar(duo.probs.argmax(1) == labels, base.probs.argmax(1) == labels)["p_value"]
    assert row["n_members"] == 2 and {"temperature_tiny", "temperature_baseline"} <= set(row)
    assert row["vs_best_member"] in ("tiny", "baseline") and 0 <= row["vs_best_member_mcnemar_p"] <= 1
    assert row["vs_best_member_ci_low"] <= row["vs_best_member_accuracy_diff"] <= row["vs_best_member_ci_high"]
    assert json.loads((tmp_path / "metrics.json").read_text()) == head
    assert (tmp_path / "predictions/duo.csv").is_file() and (tmp_path / "plots/confusion_duo.png").is_file()
    table = (tmp_path / "comparison.md").read_text()
    assert "| duo | " in table and "## Ensembles" in table and "tiny (" in table
    flat = EV.flat_metrics(head)
    assert flat["duo.accuracy"] == row["accuracy"] and "duo.vs_best_member" not in flat


def test_ensemble_files_are_byte_identical_on_a_rerun(scored, project, tmp_path):
    result, files, specs = scored
    again = EV.evaluate(result.test, specs, pretrained=None, settings=SETTINGS, seed=0)
    val = EV.load_test_set(project / "data/processed", "val")
    files2 = ENS.add_ensembles(again, specs, val, out_dir=tmp_path / "e", settings=SETTINGS, seed=0)
    ENS.write_files(files2, tmp_path / "e")
    for name in ENSEMBLES:
        assert (tmp_path / "e" / f"{name}.json").read_bytes() != b""
    EV.write_reports(result, tmp_path / "a")
    EV.write_reports(again, tmp_path / "b")
    assert (tmp_path / "a/metrics.json").read_bytes() == (tmp_path / "b/metrics.json").read_bytes()


def test_a_member_evaluate_did_not_find_is_an_error_naming_the_key(scored):
    _, _, specs = scored
    with pytest.raises(LmpipeError, match=r"^params.yaml: evaluate.ensembles.trio.members: no model 'scratch'"):
        ENS.check_ensembles({"trio": EnsembleParams(members=["tiny", "scratch"])}, specs)
    with pytest.raises(LmpipeError, match=r"evaluate.ensembles.tiny: the name is taken by a model"):
        ENS.check_ensembles({"tiny": EnsembleParams(members=["tiny", "baseline"])}, specs)


@pytest.mark.parametrize(
    "ensembles, message",
    [
        ({"e": {"members": ["scratch"]}}, "evaluate.ensembles.e.members: List should have at least 2 items"),
        ({"e": {"members": ["scratch", "scratch"]}}, "evaluate.ensembles.e.members: a model is listed twice"),
        ({"e": {"members": ["scratch", "baseline"], "calibration": "platt"}}, "evaluate.ensembles.e.calibration"),
        ({"e": {"members": ["scratch", "baseline"], "weights": [1, 2]}}, "evaluate.ensembles.e.weights is not"),
        ({"baseline": {"members": ["scratch", "minilm"]}}, "evaluate.ensembles: ensemble name 'baseline'"),
        ({"a/b": {"members": ["scratch", "minilm"]}}, "evaluate.ensembles: ensemble name 'a/b'"),
    ],
)
def test_bad_ensemble_params_are_one_line_errors_naming_the_key(ensembles, message):
    from lmpipe.core.io import load_yaml
    from lmpipe.core.params import parse_params

    raw = load_yaml((Path(__file__).resolve().parents[2] / "params.yaml").read_text(encoding="utf-8"))
    raw["evaluate"]["ensembles"] = ensembles
    with pytest.raises(LmpipeError, match=f"^params.yaml: {message}") as info:
        parse_params(raw)
    assert "\n" not in str(info.value)


# --------------------------------------------------------------------------- serving
def test_predict_serves_the_probabilities_evaluate_scored(scored, project):
    result, _, _ = scored
    by_name = {r.name: r for r in result.models}
    for name in ENSEMBLES:
        served = E.EnsemblePredictor(project / "models/ensembles" / f"{name}.json", threads=1)
        np.testing.assert_allclose(served.probs(result.test.texts, batch_size=7), by_name[name].probs, atol=1e-6)


def test_cli_predict_ensemble_writes_the_ensemble_probabilities(scored, project, tmp_path, capsys):
    result, _, _ = scored
    texts = result.test.texts[:9]
    pd.DataFrame({"text": texts}).to_csv(tmp_path / "in.csv", index=False)
    spec = str(project / "models/ensembles/duo.json")
    assert cli_main(["predict", "--ensemble", spec, "-i", str(tmp_path / "in.csv"), "-o", str(tmp_path / "o.csv")]) == 0
    assert "with ensemble" in capsys.readouterr().out
    out = pd.read_csv(tmp_path / "o.csv")
    duo = next(r for r in result.models if r.name == "duo")
    np.testing.assert_allclose(out[["prob_negative", "prob_positive"]].to_numpy(), duo.probs[:9], atol=2e-6)
    assert list(out["label"]) == [LABELS[i] for i in duo.probs[:9].argmax(1)]


def test_cli_predict_ensemble_refuses_other_backends_and_model(project, capsys):
    spec = str(project / "models/ensembles/duo.json")
    assert cli_main(["predict", "a", "--ensemble", spec, "--backend", "onnx"]) == 2
    assert cli_main(["predict", "a", "--ensemble", spec, "--model", "models/x"]) == 2
    assert cli_main(["predict", "a", "--ensemble", str(project / "nothing.json")]) == 2
    err = capsys.readouterr().err
    assert "--backend onnx: an ensemble's members run on torch only" in err
    assert "give either --model or --ensemble" in err and "nothing.json: ensemble file not found" in err


def test_a_member_changed_since_calibration_is_refused(scored, project, tmp_path):
    copy = tmp_path / "models"
    shutil.copytree(project / "models", copy)
    blob = copy / "baseline/model.json"
    blob.write_text(blob.read_text() + " ")  # still valid JSON, other bytes
    with pytest.raises(LmpipeError, match="baseline: changed since its temperature was fit"):
        E.EnsemblePredictor(copy / "ensembles/duo.json")
    E.EnsemblePredictor(copy / "ensembles/duo.json", verify=False)  # a deliberate override still loads


# --------------------------------------------------------------------------- the stage
def test_stage_scores_the_ensemble_writes_its_file_and_logs_it(project, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    from stages import evaluate as stage

    root = tmp_path / "proj"
    shutil.copytree(project, root, ignore=shutil.ignore_patterns("ensembles"))
    write_params(root, ensembles={"duo": {"members": ["tiny", "baseline"], "calibration": "temperature"}})
    monkeypatch.chdir(root)
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    head = stage.main()
    assert "duo" in head and head["duo"]["n_members"] == 2
    spec = json.loads((root / "models/ensembles/duo.json").read_text())
    assert [m["name"] for m in spec["members"]] == ["tiny", "baseline"] and spec["format"] == E.FORMAT
    client = MlflowClient(store)
    run = client.search_runs([client.get_experiment_by_name("lmpipe").experiment_id])[0]
    assert run.data.params["evaluate.ensembles.duo.members"] == "['tiny', 'baseline']"
    assert run.data.metrics["duo.accuracy"] == pytest.approx(head["duo"]["accuracy"])
    assert "ensembles" in {a.path for a in client.list_artifacts(run.info.run_id)}


def test_stage_with_an_ensemble_of_a_missing_model_stops_before_work(project, tmp_path, monkeypatch):
    from stages import evaluate as stage

    root = tmp_path / "proj"
    shutil.copytree(project, root, ignore=shutil.ignore_patterns("ensembles"))
    write_params(root, ensembles={"trio": {"members": ["tiny", "tiny_random", "baseline"]}})
    shutil.rmtree(root / "models/finetuned/tiny_random")  # named in params, absent on disk
    monkeypatch.chdir(root)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    with pytest.raises(LmpipeError, match=r"^params.yaml: evaluate.ensembles.trio.members: no model 'tiny_random'"):
        stage.main()
    assert not (root / "reports/evaluate").exists() and not (root / "models/ensembles").exists()
