"""lmpipe.finetune.augmentation: seeded EDA deletion and swap of the fine-tuning train split."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import numpy as np
import pytest
import yaml

from lmpipe.core.errors import LmpipeError
from lmpipe.core.params import Augmentation, parse_params
from lmpipe.finetune import augmentation as aug
from tests.unit import test_finetuning as tiny

backbone, project = tiny.backbone, tiny.project  # its fixtures, shared

TEXTS = ["the movie was good great w1 w2 w3", "bad awful film", "fine", "the film was poor w4 w5 w6 w7 w8 w9"]
LABELS = np.array([1, 0, 1, 0])


def test_same_seed_same_copies_and_another_seed_others():
    cfg = Augmentation(copies=2, deletion_prob=0.2, swap_prob=0.2)
    first, _ = aug.augment(TEXTS, LABELS, cfg, seed=42)
    assert aug.augment(TEXTS, LABELS, cfg, seed=42)[0] == first
    assert aug.augment(TEXTS, LABELS, cfg, seed=43)[0] != first
    # copy c of example i depends on (seed, i, c) only, not on the other examples
    assert aug.augment(TEXTS[:2], LABELS[:2], cfg, seed=42)[0][2:4] == [first[4], first[5]]


def test_originals_stay_first_and_every_copy_keeps_its_label():
    cfg = Augmentation(copies=2, deletion_prob=0.3, swap_prob=0.1)
    texts, labels = aug.augment(TEXTS, LABELS, cfg, seed=0)
    assert texts[:4] == TEXTS and len(texts) == 12
    assert labels.tolist() == LABELS.tolist() * 3
    for i, text in enumerate(texts[4:]):
        assert set(text.split()) <= set(TEXTS[i % 4].split())  # words of its own original only


def test_copies_zero_is_the_input_unchanged():
    texts, labels = aug.augment(TEXTS, LABELS, Augmentation(copies=0), seed=0)
    assert texts == TEXTS and labels is LABELS
    assert aug.augment_train(TEXTS, LABELS, Augmentation(copies=0), seed=0)[2] == {}


def test_deletion_never_empties_a_text_and_swap_keeps_every_word():
    rng = np.random.default_rng(0)
    words = "a b c d e f g h".split()
    for _ in range(50):
        assert len(aug.random_deletion(words, 0.99, rng)) >= 1
        assert sorted(aug.random_swap(words, 0.5, rng)) == sorted(words)
    assert aug.random_deletion(words, 0.0, rng) == words
    assert aug.random_swap(["one"], 1.0, rng) == ["one"]
    deleted = [len(aug.random_deletion(words * 100, 0.1, rng)) for _ in range(20)]
    assert 0.85 < np.mean(deleted) / 800 < 0.95  # about one word in ten dropped


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"copies": -1}, r"finetune.augmentation.copies must be >= 0 \(got -1\)"),
        ({"deletion_prob": 1.0}, r"finetune.augmentation.deletion_prob must be < 1"),
        ({"swap_prob": 2}, r"finetune.augmentation.swap_prob must be <= 1"),
        ({"synonym_prob": 0.1}, r"finetune.augmentation.synonym_prob is not a known key"),
        (
            {"copies": 1, "deletion_prob": 0, "swap_prob": 0},
            r"^params.yaml: finetune.augmentation: copies is 1 but deletion_prob and swap_prob are both 0",
        ),
    ],
)
def test_bad_augmentation_params_name_the_key(project_root, changes, expected):
    raw = yaml.safe_load((project_root / "params.yaml").read_text())
    raw["finetune"]["augmentation"].update(changes)
    with pytest.raises(LmpipeError, match=expected):
        parse_params(raw)


def test_stage_augments_the_train_split_only_and_records_it(project, monkeypatch, one_thread):
    """A tiny fine-tune with copies 1, tracked in a real (SQLite) MLflow store."""
    import mlflow

    from stages.finetune import main

    uri = f"sqlite:///{project / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    raw = yaml.safe_load((project / "params.yaml").read_text())
    raw["finetune"]["augmentation"] = {"copies": 1, "deletion_prob": 0.1, "swap_prob": 0.1}
    raw["finetune"]["adversarial"] = {"method": "fgm", "epsilon": 0.5}
    (project / "params.yaml").write_text(yaml.safe_dump(raw))
    main(["tiny"])
    metrics = json.loads((project / "reports/finetune/tiny/metrics.json").read_text())
    assert metrics["train_examples"] == 40 and metrics["train_examples_augmented"] == 80
    assert metrics["val_examples"] == 16  # validation untouched
    run = mlflow.MlflowClient(uri).search_runs(_experiments(uri))[0]
    assert run.data.params["finetune.augmentation.copies"] == "1"
    assert run.data.params["finetune.adversarial.method"] == "fgm"
    assert run.data.params["finetune.adversarial.epsilon"] == "0.5"
    assert run.data.metrics["train_examples_augmented"] == 80


def _experiments(uri: str) -> list[str]:
    import mlflow

    return [e.experiment_id for e in mlflow.MlflowClient(uri).search_experiments()]


def test_augmented_texts_are_the_same_bytes_in_another_process():
    """No hash-seeded set or dict order in the draws: a fresh interpreter gives the same bytes."""
    code = (
        "import hashlib, numpy as np; from lmpipe.core.params import Augmentation;"
        "from lmpipe.finetune.augmentation import augment;"
        f"out, _ = augment({TEXTS!r} * 5, np.zeros(20, dtype=int), Augmentation(copies=2), seed=7);"
        "print(hashlib.sha256('|'.join(out).encode()).hexdigest())"
    )
    got = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    out, _ = aug.augment(TEXTS * 5, np.zeros(20, dtype=int), Augmentation(copies=2), seed=7)
    assert got == hashlib.sha256("|".join(out).encode()).hexdigest()
