"""`lmpipe predict` (lmpipe/cli/predict.py) on the export of the tiny stand-in classifier."""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from lmpipe.cli.main import main as cli_main
from lmpipe.cli.predict import add_predict_parser
from lmpipe.core.errors import LmpipeError
from lmpipe.inference.predictor import Predictor
from tests.unit.test_export import LABELS, MAX_LENGTH, ROOT, make_classifier, make_project, make_reviews


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    """models/export of a tiny project, written by the real export stage."""
    root = tmp_path_factory.mktemp("project")
    classifier = make_classifier(tmp_path_factory.mktemp("tiny") / "classifier")
    make_project(root, classifier, ROOT)
    from stages.export import main as export_main

    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # unreachable: untracked
        with pytest.warns(UserWarning):
            export_main()
    return root / "models" / "export"


def main(argv: list[str]) -> int:
    """`lmpipe predict ARGV...` in process."""
    return cli_main(["predict", *argv])


def reference_probs(hf, texts) -> np.ndarray:
    """Probabilities computed without lmpipe.cli.predict: HF model, shared encoding, one text at a time."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from lmpipe.inference.encoding import encode_texts

    model = AutoModelForSequenceClassification.from_pretrained(hf).eval()
    tokenizer = AutoTokenizer.from_pretrained(hf)
    ids = encode_texts(tokenizer, texts, MAX_LENGTH, "head_tail")["input_ids"]
    with torch.no_grad():
        logits = torch.cat([model(input_ids=torch.tensor([x])).logits for x in ids])
    return torch.softmax(logits.double(), dim=1).numpy()


def texts_of_mixed_length(n: int = 10) -> list[str]:
    texts, _ = make_reviews(n, seed=11, max_filler=40)  # some longer than MAX_LENGTH tokens
    return texts


def test_text_arguments_print_labels_and_probabilities_in_input_order(export_dir, capsys):
    texts = texts_of_mixed_length()
    assert main([*texts, "--model", str(export_dir), "--threads", "1"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].split("\t") == ["label", "score", "prob_negative", "prob_positive", "text"]
    expected = reference_probs(export_dir / "hf", texts)
    assert len(lines) == len(texts) + 1
    for line, probs, text in zip(lines[1:], expected, texts):
        label, score, p_neg, p_pos, shown = line.split("\t")
        assert label == LABELS[int(probs.argmax())]
        assert abs(float(p_neg) - probs[0]) < 1e-3 and abs(float(p_pos) - probs[1]) < 1e-3
        assert float(score) == max(float(p_neg), float(p_pos))
        assert text.startswith(shown.removesuffix("..."))
    assert len({line.split("\t")[0] for line in lines[1:]}) == 2


@pytest.mark.parametrize("backend, atol", [("torch", 1e-5), ("onnx", 1e-4), ("onnx-int8", 0.05)])
def test_csv_in_csv_out_keeps_columns_and_matches_torch(export_dir, tmp_path, backend, atol, capsys):
    texts = texts_of_mixed_length(12)
    source = tmp_path / "reviews.csv"
    pd.DataFrame({"id": range(12), "review": texts}).to_csv(source, index=False)
    out = tmp_path / "preds.csv"
    args = [
        "--input",
        str(source),
        "--output",
        str(out),
        "--text-column",
        "review",
        "--model",
        str(export_dir),
        "--backend",
        backend,
        "--batch-size",
        "5",
        "--threads",
        "1",
    ]
    assert main(args) == 0
    assert f"{out}: 12 predictions" in capsys.readouterr().out
    preds = pd.read_csv(out)
    assert list(preds.columns) == ["id", "review", "label", "score", "prob_negative", "prob_positive"]
    assert preds["id"].tolist() == list(range(12)) and preds["review"].tolist() == texts
    expected = reference_probs(export_dir / "hf", texts)
    np.testing.assert_allclose(preds[["prob_negative", "prob_positive"]].to_numpy(), expected, atol=atol)
    assert preds["label"].tolist() == [LABELS[i] for i in expected.argmax(axis=1)]


def test_csv_without_output_goes_to_stdout(export_dir, tmp_path, capsys):
    source = tmp_path / "in.csv"
    pd.DataFrame({"text": ["the film was great good", "the movie was awful bad"]}).to_csv(source, index=False)
    assert main(["-i", str(source), "--model", str(export_dir), "--backend", "onnx"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "text,label,score,prob_negative,prob_positive" and len(out) == 3


def test_csv_without_the_text_column_is_named(export_dir, tmp_path, capsys):
    source = tmp_path / "in.csv"
    pd.DataFrame({"review": ["good"], "stars": [5]}).to_csv(source, index=False)
    assert main(["-i", str(source), "--model", str(export_dir)]) == 2
    assert f"error: {source}: no column 'text' (columns: review, stars)" in capsys.readouterr().err


def test_empty_text_is_named_by_row(export_dir, tmp_path, capsys):
    source = tmp_path / "in.csv"
    source.write_text('text\ngood film\n"  "\n')
    assert main(["-i", str(source), "--model", str(export_dir)]) == 2
    assert f"{source} row 2: column 'text' is empty" in capsys.readouterr().err


@pytest.mark.parametrize(
    "backend, missing",
    [
        ("torch", "hf/model.safetensors"),
        ("torch", "hf/lmpipe.json"),
        ("torch", "hf/tokenizer.json"),
        ("onnx", "onnx/model.onnx"),
        ("onnx-int8", "onnx/model.int8.onnx"),
    ],
)
def test_incomplete_model_folder_names_the_missing_file(export_dir, tmp_path, capsys, backend, missing):
    broken = tmp_path / "export"
    shutil.copytree(export_dir, broken)
    (broken / missing).unlink()
    assert main(["some text", "--model", str(broken), "--backend", backend]) == 2
    assert f"error: {broken}: incomplete model folder, missing {missing}" in capsys.readouterr().err


def test_missing_model_folder_is_named(tmp_path, capsys):
    assert main(["some text", "--model", str(tmp_path / "nowhere")]) == 2
    assert "nowhere: model folder not found" in capsys.readouterr().err


def test_a_plain_hf_folder_works_with_torch_only(export_dir):
    texts = texts_of_mixed_length(4)
    direct = Predictor(export_dir / "hf", "torch", threads=1).predict(texts)
    via_export = Predictor(export_dir, "torch", threads=1).predict(texts)
    pd.testing.assert_frame_equal(direct, via_export)
    with pytest.raises(LmpipeError, match="needs an export folder with onnx/model.onnx"):
        Predictor(export_dir / "hf", "onnx")


def test_batching_does_not_change_predictions(export_dir):
    texts = texts_of_mixed_length(9)
    predictor = Predictor(export_dir, "onnx", threads=1)
    one_by_one = np.concatenate([predictor.logits([t], batch_size=1) for t in texts])
    np.testing.assert_allclose(predictor.logits(texts, batch_size=4), one_by_one, atol=1e-5)


def test_bad_arguments_are_errors(export_dir, capsys):
    assert main(["--model", str(export_dir)]) == 2  # neither texts nor --input
    assert main(["a", "--output", "x.csv", "--model", str(export_dir)]) == 2
    assert main(["a", "--batch-size", "0", "--model", str(export_dir)]) == 2
    err = capsys.readouterr().err
    assert "give either TEXT arguments or --input" in err and "--output needs --input" in err
    assert "--batch-size must be >= 1 (got 0)" in err


def test_parser_plugs_into_a_cli_and_the_module_imports_no_heavy_package():
    parser = argparse.ArgumentParser(prog="lmpipe")
    add_predict_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["predict", "-i", "a.csv", "--backend", "onnx-int8"])
    assert (args.input, args.backend, args.model, args.text_column) == ("a.csv", "onnx-int8", "models/export", "text")
    heavy = "{'torch', 'transformers', 'mlflow', 'onnxruntime', 'pandas'}"
    code = f"import sys, lmpipe.cli.main; print(sorted({heavy} & set(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert done.stdout.strip() == "[]"
