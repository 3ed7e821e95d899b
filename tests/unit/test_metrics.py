"""lmpipe.task.metrics: hand-computed values, scikit-learn agreement, bootstrap and McNemar."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lmpipe.task import metrics as M

# Six examples worked by hand. p(positive) = P1; prediction = p > 0.5.
#   y     0    0    0    0     1    1
#   p1   .1   .2   .3   .45   .9   .25
#   pred  0    0    0    0     1    0      -> confusion [[4, 0], [1, 1]]
Y = np.array([0, 0, 0, 0, 1, 1])
P1 = np.array([0.1, 0.2, 0.3, 0.45, 0.9, 0.25])
PROBS = np.stack([1 - P1, P1], axis=1)


def _random_task(n: int, k: int, seed: int, signal: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    logits = rng.normal(size=(n, k))
    logits[np.arange(n), y] += signal
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    probs = np.round(probs, 2)  # ties in the scores exercise the AUC's tie handling
    return y, probs / probs.sum(axis=1, keepdims=True)


def test_hand_computed_example_gives_worked_values():
    got = M.classification_metrics(Y, PROBS, ece_bins=10)
    assert got["accuracy"] == pytest.approx(5 / 6)
    # precision: class 0 = 4/5, class 1 = 1/1; recall: class 0 = 4/4, class 1 = 1/2
    assert got["precision"] == pytest.approx((0.8 + 1.0) / 2)
    assert got["recall"] == pytest.approx((1.0 + 0.5) / 2)
    # F1: class 0 = 8/9, class 1 = 2/3
    assert got["f1"] == pytest.approx(7 / 9)
    # positives 0.9 and 0.25 against negatives .1 .2 .3 .45: 4 + 2 of 8 pairs ordered right
    assert got["roc_auc"] == pytest.approx(6 / 8)
    # confidences .9 .8 .7 .55 .9 .75; bins 9: {.9 ok, .9 ok} 8: {.8 ok} 7: {.7 ok, .75 wrong}
    # 5: {.55 ok}: (|2 - 1.8| + |1 - .8| + |1 - 1.45| + |1 - .55|) / 6
    assert got["ece"] == pytest.approx(1.3 / 6)
    assert M.confusion_matrix(Y, PROBS.argmax(axis=1), 2).tolist() == [[4, 0], [1, 1]]


def test_single_metric_helpers_agree_with_the_combined_call():
    pred = PROBS.argmax(axis=1)
    assert M.accuracy(Y, pred) == pytest.approx(5 / 6)
    assert M.macro_precision_recall_f1(Y, pred, 2) == pytest.approx({"precision": 0.9, "recall": 0.75, "f1": 7 / 9})
    assert M.roc_auc(Y, PROBS) == pytest.approx(0.75)
    assert M.expected_calibration_error(Y, PROBS, 10) == pytest.approx(1.3 / 6)


@pytest.mark.parametrize("k", [2, 4])
def test_metrics_match_scikit_learn(k):
    from sklearn.metrics import f1_score, precision_score, recall_score, roc_auc_score

    y, probs = _random_task(500, k, seed=k)
    pred = probs.argmax(axis=1)
    got = M.classification_metrics(y, probs)
    auc = roc_auc_score(y, probs[:, 1]) if k == 2 else roc_auc_score(y, probs, multi_class="ovr")
    assert got["roc_auc"] == pytest.approx(auc, abs=1e-12)
    assert got["f1"] == pytest.approx(f1_score(y, pred, average="macro"), abs=1e-12)
    assert got["precision"] == pytest.approx(precision_score(y, pred, average="macro"), abs=1e-12)
    assert got["recall"] == pytest.approx(recall_score(y, pred, average="macro"), abs=1e-12)


def test_class_never_predicted_scores_zero_precision_like_sklearn():
    from sklearn.metrics import precision_score

    y = np.array([0, 1, 1, 0])
    probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.7, 0.3], [0.6, 0.4]])  # always class 0
    got = M.classification_metrics(y, probs)
    assert got["precision"] == pytest.approx(precision_score(y, [0] * 4, average="macro", zero_division=0))
    assert got["recall"] == pytest.approx(0.5)


def test_roc_auc_is_nan_when_only_one_class_is_present():
    assert math.isnan(M.roc_auc(np.array([1, 1, 1]), np.array([[0.2, 0.8], [0.6, 0.4], [0.1, 0.9]])))


def test_ece_is_zero_when_confidence_equals_accuracy_in_every_bin():
    # confidence 0.75 in one bin, 3 of 4 right
    y = np.array([0, 0, 0, 1])
    probs = np.tile([0.75, 0.25], (4, 1))
    assert M.expected_calibration_error(y, probs, 10) == pytest.approx(0.0)


def test_roc_curve_points_run_from_origin_to_corner():
    fpr, tpr = M.roc_curve_points(Y, P1)
    assert (fpr[0], tpr[0]) == (0.0, 0.0) and (fpr[-1], tpr[-1]) == (1.0, 1.0)
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
    # trapezoid area under the points is the AUC
    assert np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2) == pytest.approx(0.75)


def test_bootstrap_of_constant_correctness_is_degenerate():
    y = np.array([0, 1] * 50)
    probs = np.where(y[:, None] == np.arange(2), 0.8, 0.2)  # all right, all at confidence 0.8
    ci = M.bootstrap_ci(y, probs, n_samples=200, confidence=0.95, seed=0)
    assert ci["accuracy"] == (1.0, 1.0)
    assert ci["f1"] == (1.0, 1.0)
    assert ci["ece"] == pytest.approx((0.2, 0.2))


@pytest.mark.parametrize("k", [2, 3])
def test_bootstrap_interval_contains_the_point_estimate(k):
    y, probs = _random_task(400, k, seed=10 + k)
    point = M.classification_metrics(y, probs)
    ci = M.bootstrap_ci(y, probs, n_samples=300, confidence=0.9, seed=1)
    for name in M.METRICS:
        low, high = ci[name]
        assert low < point[name] < high, name
    wide = M.bootstrap_ci(y, probs, n_samples=300, confidence=0.99, seed=1)
    assert wide["accuracy"][0] <= ci["accuracy"][0] and wide["accuracy"][1] >= ci["accuracy"][1]


def test_vectorised_bootstrap_equals_metrics_on_explicit_resamples():
    y, probs = _random_task(120, 3, seed=3)
    weights = np.concatenate(M.bootstrap_resamples(len(y), 6, seed=9))
    vectorised = M._weighted_metrics(weights, y, probs, 10)
    for row in range(len(weights)):
        idx = np.repeat(np.arange(len(y)), weights[row])
        explicit = M.classification_metrics(y[idx], probs[idx])
        for name in M.METRICS:
            assert vectorised[name][row] == pytest.approx(explicit[name], abs=1e-12), name


def test_bootstrap_is_seeded_and_paired():
    y, probs = _random_task(300, 2, seed=4)
    a = M.bootstrap_ci(y, probs, n_samples=100, seed=5)
    assert M.bootstrap_ci(y, probs, n_samples=100, seed=5) == a
    assert M.bootstrap_ci(y, probs, n_samples=100, seed=6) != a
    first = np.concatenate(M.bootstrap_resamples(300, 50, seed=5))
    assert np.array_equal(first, np.concatenate(M.bootstrap_resamples(300, 50, seed=5)))
    assert first.shape == (50, 300) and np.all(first.sum(axis=1) == 300)


def test_mcnemar_exact_branch_matches_binomial_by_hand():
    # b = 10 (only A right), c = 2 (only B right), 30 both right: exact two-sided
    a = np.array([1] * 10 + [0] * 2 + [1] * 30, dtype=bool)
    b = np.array([0] * 10 + [1] * 2 + [1] * 30, dtype=bool)
    got = M.mcnemar(a, b)
    # 2 * P(X <= 2 | n = 12, p = 1/2) = 2 * (1 + 12 + 66) / 4096
    assert got["p_value"] == pytest.approx(2 * 79 / 4096)
    assert round(got["p_value"], 4) == 0.0386
    assert (got["b"], got["c"], got["method"], got["better"]) == (10, 2, "exact", "a")


def test_mcnemar_chi_square_branch_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    a = np.array([1] * 30 + [0] * 12, dtype=bool)
    b = ~a
    got = M.mcnemar(a, b)
    expected = stats.chi2.sf((abs(30 - 12) - 1) ** 2 / 42, df=1)
    assert got["method"] == "chi2" and got["p_value"] == pytest.approx(expected, rel=1e-12)
    exact = stats.binomtest(2, 12, 0.5).pvalue  # and the exact branch against scipy's binomtest
    assert M.mcnemar([1] * 10 + [0] * 2, [0] * 10 + [1] * 2)["p_value"] == pytest.approx(exact)


def test_mcnemar_without_disagreement_is_a_tie_with_p_one():
    same = np.array([1, 0, 1, 1], dtype=bool)
    got = M.mcnemar(same, same)
    assert (got["b"], got["c"], got["p_value"], got["better"]) == (0, 0, 1.0, "tie")
    balanced = M.mcnemar([1] * 20 + [0] * 20, [0] * 20 + [1] * 20)
    assert balanced["method"] == "chi2" and balanced["p_value"] == 1.0 and balanced["better"] == "tie"


def test_perplexity_is_exp_of_mean_nll():
    assert M.perplexity(math.log(20.0)) == pytest.approx(20.0)
    assert M.perplexity(0.0) == 1.0


def test_bad_shapes_are_rejected():
    with pytest.raises(ValueError, match="probs must be"):
        M.classification_metrics([0, 1], [0.2, 0.8])
    with pytest.raises(ValueError, match="integer ids"):
        M.classification_metrics([0, 2], PROBS[:2])
    with pytest.raises(ValueError, match="equal length"):
        M.mcnemar([1, 0], [1])


def test_accuracy_difference_interval_is_the_paired_bootstrap_of_the_difference():
    a = np.array([1, 1, 1, 0, 1, 0, 1, 1, 0, 1], dtype=bool)
    b = np.array([1, 0, 1, 0, 0, 0, 1, 0, 0, 1], dtype=bool)
    diff, low, high = M.accuracy_difference_ci(a, b, n_samples=500, confidence=0.9, seed=3)
    assert diff == pytest.approx(0.3)
    per_resample = np.concatenate([w @ (a.astype(float) - b) / len(a) for w in M.bootstrap_resamples(len(a), 500, 3)])
    assert (low, high) == pytest.approx(tuple(np.percentile(per_resample, [5, 95])))
    assert 0 <= low <= diff <= high  # b is never right where a is wrong: no resample goes below 0


def test_accuracy_difference_of_a_model_with_itself_is_exactly_zero():
    a = np.array([1, 0, 1, 1, 0], dtype=bool)
    assert M.accuracy_difference_ci(a, a, n_samples=50) == (0.0, 0.0, 0.0)
