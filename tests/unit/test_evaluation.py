"""lmpipe.evaluate.evaluation + lmpipe.evaluate.plots + stages/evaluate.py on a tiny stand-in project.

The project is built once per module: a synthetic sentiment test split, the real TF-IDF
baseline (lmpipe.baseline.baseline), a 1-layer BertForSequenceClassification saved by
lmpipe.inference.classifier.save_classifier, a 1-layer BertForMaskedLM, and fake training curves.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pandas as pd
import pytest

from lmpipe.core.errors import LmpipeError
from lmpipe.core.lineage import find_producer_run
from lmpipe.evaluate import evaluation as E
from lmpipe.task import metrics as M

LABELS = ["negative", "positive"]
WORDS = {0: ["bad", "awful", "poor", "hate", "boring"], 1: ["good", "great", "fine", "love", "fun"]}
FILLER = ["the", "movie", "plot", "actor", "was", "and", "a", "film", "story", "scene"]
SETTINGS = SimpleNamespace(
    bootstrap_samples=200, confidence=0.95, ece_bins=10, batch_size=4, mlm_mask_prob=0.15, mlm_windows=None
)


def _texts(n: int, seed: int) -> tuple[list[str], np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    texts = []
    for label in labels:
        cue = label if rng.random() > 0.2 else 1 - label  # 20% misleading cues: no model is perfect
        words = list(rng.choice(FILLER, rng.integers(3, 30)))
        for _ in range(rng.integers(1, 3)):
            words.insert(int(rng.integers(0, len(words) + 1)), str(rng.choice(WORDS[cue])))
        texts.append(" ".join(words))
    return texts, labels.astype(np.int64)


def _tokenizer(folder: Path):
    from transformers import BertTokenizerFast

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *FILLER, *WORDS[0], *WORDS[1]]
    tokenizer = BertTokenizerFast(vocab={token: i for i, token in enumerate(vocab)}, do_lower_case=True)
    assert tokenizer("the movie", add_special_tokens=False)["input_ids"] == [5, 6]
    return tokenizer


def _bert_config(vocab_size: int, **extra):
    from transformers import BertConfig

    return BertConfig(
        vocab_size=vocab_size,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
        **extra,
    )


def _classifier(folder: Path, label_names: list[str], seed: int, **info_extra) -> None:
    import torch
    from transformers import BertForSequenceClassification

    from lmpipe.inference.classifier import save_classifier

    tokenizer = _tokenizer(folder)
    torch.manual_seed(seed)
    config = _bert_config(
        tokenizer.vocab_size,
        num_labels=len(label_names),
        id2label=dict(enumerate(label_names)),
        label2id={n: i for i, n in enumerate(label_names)},
    )
    info = {
        "backbone": "tiny",
        "mode": "full",
        "max_length": 12,
        "truncation": "head_tail",
        "best_step": 0,
        "val_metrics": {},
        **info_extra,
    }
    save_classifier(BertForSequenceClassification(config).eval(), tokenizer, folder, info)


def _build_project(root: Path) -> Path:
    import torch
    from transformers import BertForMaskedLM

    from lmpipe.baseline import baseline
    from lmpipe.core.params import BaselineParams

    processed = root / "data/processed"
    processed.mkdir(parents=True)
    test_texts, test_labels = _texts(60, seed=1)
    pd.DataFrame({"text": test_texts, "label": test_labels}).to_parquet(processed / "test.parquet")
    (processed / "labels.json").write_text(json.dumps({"labels": LABELS}), encoding="utf-8")
    val_texts, val_labels = _texts(80, seed=6)  # calibrates ensembles (tests/unit/test_ensemble.py)
    pd.DataFrame({"text": val_texts, "label": val_labels}).to_parquet(processed / "val.parquet")

    train_texts, train_labels = _texts(200, seed=2)
    _, blob = baseline.fit(train_texts, train_labels, BaselineParams(), 0, LABELS)
    baseline.save(blob, root / "models/baseline")

    _classifier(root / "models/finetuned/tiny", LABELS, seed=3, init="pretrained", source="models/pretrained")
    _classifier(root / "models/finetuned/tiny_random", LABELS, seed=5, init="random", source="models/pretrained")

    pretrained = root / "models/pretrained"
    tokenizer = _tokenizer(pretrained)
    tokenizer.save_pretrained(pretrained)
    torch.manual_seed(4)
    BertForMaskedLM(_bert_config(tokenizer.vocab_size)).save_pretrained(pretrained)

    curves = root / "reports/pretrain"
    curves.mkdir(parents=True)
    (curves / "train_curve.csv").write_text("step,loss,lr\n10,9.1,0.001\n20,8.2,0.0009\n30,7.5,0.0005\n")
    (curves / "eval_curve.csv").write_text("step,val_loss,val_perplexity\n15,8.8,6634.2\n30,7.9,2697.3\n")
    for name, accuracy in (("tiny", 0.9), ("tiny_random", 0.6)):  # validation: what export selects on
        (root / "reports/finetune" / name).mkdir(parents=True)
        (root / "reports/finetune" / name / "metrics.json").write_text(json.dumps({"val_accuracy": accuracy}))
    return root


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    return _build_project(tmp_path_factory.mktemp("project"))


@pytest.fixture(scope="module")
def result(project):
    test = E.load_test_set(project / "data/processed")
    models = E.find_models(project / "models/baseline", project / "models/finetuned")
    return E.evaluate(test, models, pretrained=project / "models/pretrained", settings=SETTINGS, seed=0)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """One SQLite MLflow store for the module's MLflow tests (creating one costs ~5 s);
    each test uses its own experiment."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


def write_params(root: Path, **evaluate: Any) -> None:
    """The shipped params.yaml into `root`, with `tiny`/`tiny_random` as backbones and `evaluate` keys set."""
    import yaml

    params = yaml.safe_load((Path(__file__).resolve().parents[2] / "params.yaml").read_text(encoding="utf-8"))
    backbones = params["finetune"]["backbones"]
    params["finetune"]["backbones"] = {"tiny": backbones["scratch"], "tiny_random": backbones["random"]}
    params["evaluate"].update(evaluate)
    (root / "params.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_evaluation_writes_every_report_with_the_contracted_columns(result, project, tmp_path):
    head = E.write_reports(result, tmp_path, curves_root=project / "reports")
    files = _files(tmp_path)
    for name in (
        "metrics.json",
        "comparison.md",
        "predictions/baseline.csv",
        "predictions/tiny.csv",
        "roc/baseline.csv",
        "roc/tiny.csv",
        "plots/confusion_baseline.png",
        "plots/confusion_tiny.png",
        "plots/roc.png",
        "plots/calibration.png",
        "plots/curves_pretrain.png",
    ):
        assert name in files, name
    assert all(files[n].startswith(b"\x89PNG") for n in files if n.endswith(".png"))

    written = json.loads(files["metrics.json"])
    assert written == head and written["n_test"] == 60
    for model in ("baseline", "tiny"):
        for metric in M.METRICS:
            value, low, high = (written[model][k] for k in (metric, f"{metric}_ci_low", f"{metric}_ci_high"))
            assert low <= value <= high, (model, metric)
    assert "mcnemar_p" not in written["baseline"]
    assert 0 <= written["tiny"]["mcnemar_p"] <= 1
    assert written["pretrained"]["test_mlm_perplexity"] > 1

    predictions = pd.read_csv(tmp_path / "predictions/tiny.csv")
    assert list(predictions.columns) == ["actual", "predicted", "prob_negative", "prob_positive"]
    assert len(predictions) == 60 and set(predictions["actual"]) <= set(LABELS)
    probs = predictions[["prob_negative", "prob_positive"]].to_numpy()
    assert np.allclose(probs.sum(axis=1), 1, atol=1e-5)
    assert (predictions["predicted"] == np.array(LABELS)[probs.argmax(axis=1)]).all()
    roc = pd.read_csv(tmp_path / "roc/baseline.csv")
    assert list(roc.columns) == ["fpr", "tpr"] and roc.iloc[0].tolist() == [0, 0] and roc.iloc[-1].tolist() == [1, 1]


def test_comparison_table_has_a_row_per_model_with_intervals_and_mcnemar(result):
    table = E.comparison_table(result)
    header = next(line for line in table.splitlines() if line.startswith("| model"))
    for column in ("accuracy [95% CI]", "macro-F1 [95% CI]", "ROC-AUC", "ECE", "McNemar p vs baseline", "n test"):
        assert column in header
    main = table.split("\n\n")[1]  # the first table; the control table comes later
    rows = {
        line.split("|")[1].strip(): line for line in main.splitlines() if line.startswith("| ") and "---" not in line
    }
    assert set(rows) == {"model", "baseline", "tiny", "tiny_random"}
    tiny = result.models[1]
    assert (
        f"{tiny.metrics['accuracy']:.4f} [{tiny.ci['accuracy'][0]:.4f}, {tiny.ci['accuracy'][1]:.4f}]" in rows["tiny"]
    )
    assert f"{tiny.mcnemar['b']} / {tiny.mcnemar['c']}" in rows["tiny"]
    assert "(reference)" in rows["baseline"] and "| 60 |" in rows["baseline"]
    assert "pretrained.test_mlm_perplexity" in table


def test_mcnemar_compares_each_transformer_with_the_baseline(result, project):
    test = E.load_test_set(project / "data/processed")
    base, tiny = result.models[:2]
    assert base.mcnemar is None
    expected = M.mcnemar(tiny.probs.argmax(1) == test.labels, base.probs.argmax(1) == test.labels)
    assert tiny.mcnemar == expected


def test_same_inputs_give_byte_identical_reports_and_plots(project, result, tmp_path):
    test = E.load_test_set(project / "data/processed")
    models = E.find_models(project / "models/baseline", project / "models/finetuned")
    again = E.evaluate(test, models, pretrained=project / "models/pretrained", settings=SETTINGS, seed=0)
    E.write_reports(result, tmp_path / "a", curves_root=project / "reports")
    E.write_reports(again, tmp_path / "b", curves_root=project / "reports")
    a, b = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert a.keys() == b.keys() and any(k.endswith(".png") for k in a)
    assert [k for k in a if a[k] != b[k]] == []


def test_length_sorted_batches_give_the_same_probabilities_as_one_batch(project, result):
    test = E.load_test_set(project / "data/processed")
    one_batch = E.predict_transformer(project / "models/finetuned/tiny", test.texts, LABELS, 1000, "cpu")
    assert np.allclose(result.models[1].probs, one_batch, atol=1e-6)


def test_baseline_probabilities_are_the_saved_models(project, result):
    from lmpipe.baseline import baseline

    test = E.load_test_set(project / "data/processed")
    direct = baseline.load(project / "models/baseline").predict_proba(test.texts)
    assert np.array_equal(result.models[0].probs, direct)


def test_mlm_perplexity_scores_only_masked_tokens_like_the_full_head(project):
    import torch
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    from lmpipe.inference.encoding import collate

    path = project / "models/pretrained"
    texts = E.load_test_set(project / "data/processed").texts[:10]
    got = E.mlm_perplexity(path, texts, mask_prob=0.15, seed=7, batch_size=3, device="cpu")
    assert got == E.mlm_perplexity(path, texts, mask_prob=0.15, seed=7, batch_size=3, device="cpu")

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForMaskedLM.from_pretrained(path).eval()
    tokens = tokenizer(texts, add_special_tokens=False)["input_ids"]
    windows = E.mlm_windows(tokens, 16, tokenizer.cls_token_id, tokenizer.sep_token_id, None)
    positions = E.mask_positions([len(w) for w in windows], 0.15, seed=7)
    nll, count = 0.0, 0
    with torch.no_grad():
        for window, where in zip(windows, positions):  # one window at a time, full-vocabulary head
            ids = collate([window], None, tokenizer.pad_token_id)["input_ids"]
            targets = ids[0, where].clone()
            ids[0, where] = tokenizer.mask_token_id
            logits = model(input_ids=ids).logits[0, where]
            nll += float(torch.nn.functional.cross_entropy(logits, targets, reduction="sum"))
            count += len(where)
    assert got["test_mlm_masked_tokens"] == count and got["test_mlm_windows"] == len(windows)
    assert got["test_mlm_perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-5)


def test_masking_is_seeded_and_never_touches_cls_or_sep():
    lengths = [16, 16, 5, 3]
    positions = E.mask_positions(lengths, 0.15, seed=1)
    assert all(np.array_equal(a, b) for a, b in zip(positions, E.mask_positions(lengths, 0.15, seed=1)))
    for length, where in zip(lengths, positions):
        assert len(where) == max(1, round(0.15 * (length - 2)))
        assert where.min() >= 1 and where.max() <= length - 2 and len(set(where)) == len(where)


def test_windows_cover_every_token_in_order():
    windows = E.mlm_windows([[5, 6, 7, 8, 9], [10]], window=5, cls_id=1, sep_id=2, max_windows=None)
    assert windows == [[1, 5, 6, 7, 2], [1, 8, 9, 2], [1, 10, 2]]
    assert E.mlm_windows([[5, 6, 7, 8, 9], [10]], 5, 1, 2, max_windows=2) == windows[:2]


def test_a_model_trained_for_other_labels_is_an_error_naming_its_config(project, tmp_path):
    _classifier(tmp_path / "other", ["neg", "pos"], seed=5)
    with pytest.raises(LmpipeError, match=r"other/config.json: id2label \['neg', 'pos'\]"):
        E.predict_transformer(tmp_path / "other", ["a film"], LABELS, 4, "cpu")


def test_find_models_lists_baseline_first_and_skips_temporary_folders(tmp_path):
    (tmp_path / "baseline").mkdir()
    for name in ("zeta", "alpha", ".alpha.x.tmp"):
        (tmp_path / "finetuned" / name).mkdir(parents=True)
    names = [m.name for m in E.find_models(tmp_path / "baseline", tmp_path / "finetuned")]
    assert names == ["baseline", "alpha", "zeta"]
    (tmp_path / "finetuned" / "pretrained").mkdir()
    with pytest.raises(LmpipeError, match="may not be named 'pretrained'"):
        E.find_models(tmp_path / "baseline", tmp_path / "finetuned")
    with pytest.raises(LmpipeError, match="missing: folder not found"):
        E.find_models(tmp_path / "missing", tmp_path / "finetuned")


def test_multiclass_reports_write_one_vs_rest_roc_per_class(tmp_path):
    rng = np.random.default_rng(0)
    labels = np.array([0, 1, 2] * 10)
    probs = rng.dirichlet([1, 1, 1], size=30)
    test = E.TestSet(["x"] * 30, labels, ["a", "b", "c d"])
    result = E.score_model("m", "baseline", test, probs, bootstrap_samples=50, confidence=0.9, ece_bins=5, seed=0)
    evaluation = E.Evaluation(test, [result], None, 0.9, 5)
    E.write_reports(evaluation, tmp_path)
    assert sorted(p.name for p in (tmp_path / "roc/m").iterdir()) == ["a.csv", "b.csv", "c_d.csv"]
    assert "one-vs-rest" in (tmp_path / "comparison.md").read_text()
    assert (tmp_path / "plots/roc.png").is_file()


def test_find_producer_run_takes_the_latest_finished_run_with_that_hash(store):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(store)
    exp = client.create_experiment("lineage")
    tag = "dvc.out.models/finetuned/tiny"

    def make(md5: str, status: str, start: int) -> str:
        run = client.create_run(exp, start_time=start, tags={tag: md5, "lmpipe.stage": "finetune@tiny"})
        client.set_terminated(run.info.run_id, status)
        return run.info.run_id

    make("aaa.dir", "FINISHED", 1000)
    latest = make("aaa.dir", "FINISHED", 2000)
    make("aaa.dir", "FAILED", 3000)
    make("bbb.dir", "FINISHED", 4000)
    assert find_producer_run(client, exp, "models/finetuned/tiny", "aaa.dir").info.run_id == latest
    assert find_producer_run(client, exp, "models/finetuned/tiny", "ccc.dir") is None
    assert find_producer_run(client, exp, "models/other", "aaa.dir") is None


def test_stage_logs_all_params_flat_metrics_artifacts_and_upstream_runs(project, tmp_path, store, monkeypatch):
    from mlflow.tracking import MlflowClient

    from lmpipe.core.lineage import dvc_md5
    from stages import evaluate as stage

    root = tmp_path / "proj"
    shutil.copytree(project, root)
    write_params(root, ensembles={})  # the shipped ensemble names backbones this project lacks
    monkeypatch.chdir(root)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    client = MlflowClient(store)
    exp = client.create_experiment("lmpipe")
    producers = {}
    for stage_name, path in (("preprocess", "data/processed"), ("finetune@tiny", "models/finetuned/tiny")):
        run = client.create_run(exp, tags={"lmpipe.stage": stage_name, f"dvc.out.{path}": dvc_md5(path)})
        client.set_terminated(run.info.run_id, "FINISHED")
        producers[stage_name] = run.info.run_id

    head = stage.main()

    assert json.loads((root / "reports/evaluate/metrics.json").read_text()) == head
    headline = json.loads((root / "reports/evaluate/headline.json").read_text())
    assert headline["model"] == "tiny"  # the best on validation, as export picks it
    assert headline["acc"] == head["tiny"]["accuracy"] and headline["tfidf_acc"] == head["baseline"]["accuracy"]
    tiny = head["tiny"]
    assert (headline["acc_lo"], headline["acc_hi"]) == (tiny["accuracy_ci_low"], tiny["accuracy_ci_high"])
    assert headline["gain"] == head["tiny"]["vs_random_accuracy_diff"]
    assert not list((root / "reports").glob(".evaluate*"))  # no temporary folder left behind
    run = next(r for r in client.search_runs([exp]) if r.data.tags.get("lmpipe.stage") == "evaluate")
    assert run.info.status == "FINISHED"
    assert run.data.params["pretrain.optim.lr"] == "0.002" and run.data.params["evaluate.ece_bins"] == "10"
    assert run.data.metrics["tiny.vs_random_accuracy_diff"] == pytest.approx(head["tiny"]["vs_random_accuracy_diff"])
    assert run.data.metrics["tiny.accuracy"] == pytest.approx(head["tiny"]["accuracy"])
    assert run.data.metrics["headline.acc"] == pytest.approx(headline["acc"])
    assert run.data.tags["lmpipe.headline.model"] == "tiny"
    assert run.data.metrics["baseline.accuracy"] == pytest.approx(head["baseline"]["accuracy"])
    assert run.data.metrics["pretrained.test_mlm_perplexity"] == pytest.approx(
        head["pretrained"]["test_mlm_perplexity"]
    )
    assert run.data.tags["upstream.preprocess.run_id"] == producers["preprocess"]
    assert run.data.tags["upstream.finetune.tiny.run_id"] == producers["finetune@tiny"]
    assert run.data.tags["dvc.out.reports/evaluate/metrics.json"] == dvc_md5("reports/evaluate/metrics.json")
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"comparison.md", "metrics.json", "plots"} <= artifacts
    plots = {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    assert "plots/confusion_tiny.png" in plots and "plots/curves_pretrain.png" in plots


def test_pretrained_model_is_compared_with_its_random_init_twin(result, project):
    by_name = {r.name: r for r in result.models}
    assert set(by_name) == {"baseline", "tiny", "tiny_random"}
    assert by_name["tiny_random"].control is None and by_name["baseline"].control is None
    control = by_name["tiny"].control
    labels = result.test.labels
    tiny_ok = by_name["tiny"].probs.argmax(1) == labels
    random_ok = by_name["tiny_random"].probs.argmax(1) == labels
    assert control["name"] == "tiny_random"
    assert control["accuracy_diff"] == pytest.approx(tiny_ok.mean() - random_ok.mean())
    assert control["ci_low"] <= control["accuracy_diff"] <= control["ci_high"]
    assert (control["b"], control["c"]) == (int(np.sum(tiny_ok & ~random_ok)), int(np.sum(~tiny_ok & random_ok)))
    head = E.headline(result)
    assert head["tiny"]["vs_random_accuracy_diff"] == pytest.approx(control["accuracy_diff"])
    assert head["tiny"]["vs_random_mcnemar_p"] == control["p_value"]
    table = E.comparison_table(result)
    assert "What pretraining adds" in table and "| tiny | tiny_random |" in table


def test_no_control_section_without_a_random_init_model(project):
    test = E.load_test_set(project / "data/processed")
    models = [
        m for m in E.find_models(project / "models/baseline", project / "models/finetuned") if m.name != "tiny_random"
    ]
    got = E.evaluate(test, models, pretrained=None, settings=SETTINGS, seed=0)
    assert all(r.control is None for r in got.models)
    assert "What pretraining adds" not in E.comparison_table(got)


def test_a_causal_lm_pretrained_adds_prompted_rows_and_its_perplexity(project, tmp_path):
    """With a LlamaForCausalLM as models/pretrained: zero- and few-shot rows scored like any model
    (CIs, McNemar against the baseline), next-token perplexity instead of the masked-LM one."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from lmpipe.core.params import PromptingParams
    from lmpipe.evaluate import prompted

    causal = tmp_path / "pretrained"
    tokenizer = _tokenizer(causal)
    tokenizer.save_pretrained(causal)
    torch.manual_seed(4)
    config = LlamaConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=48,
        pad_token_id=0,
        tie_word_embeddings=True,
    )
    LlamaForCausalLM(config).save_pretrained(causal)
    assert prompted.is_causal_lm(causal) and not prompted.is_causal_lm(project / "models/pretrained")

    cfg = PromptingParams(template="{text} was", label_words=[" bad", " good"], shots=2)  # words in its vocabulary
    settings = SimpleNamespace(**vars(SETTINGS), prompting=cfg)
    test = E.load_test_set(project / "data/processed")
    models = E.find_models(project / "models/baseline", project / "models/finetuned")
    pool = (["good fun", "bad boring", "great", "awful"], np.asarray([1, 0, 1, 0]))
    got = E.evaluate(test, models, pretrained=causal, settings=settings, seed=0, shot_pool=lambda: pool)
    rows = {r.name: r for r in got.models}
    for name in (prompted.ZERO_SHOT, prompted.FEW_SHOT):
        row = rows[name]
        assert row.kind == "prompt" and row.probs.shape == (len(test.texts), 2)
        assert np.allclose(row.probs.sum(axis=1), 1.0)
        assert row.mcnemar is not None and row.ci["accuracy"][0] <= row.metrics["accuracy"] <= row.ci["accuracy"][1]
    assert rows[prompted.ZERO_SHOT].probs.tolist() != rows[prompted.FEW_SHOT].probs.tolist()  # the shots matter
    assert got.lm["test_clm_perplexity"] > 1 and "test_mlm_perplexity" not in got.lm
    assert "next-token perplexity" in E.comparison_table(got)
    unknown = SimpleNamespace(**vars(SETTINGS), prompting=PromptingParams(template="{text} was"))  # " negative"
    with pytest.raises(LmpipeError, match="label_words: ' negative' is not in the tokenizer's vocabulary"):
        E.evaluate(test, models, pretrained=causal, settings=unknown, seed=0)
