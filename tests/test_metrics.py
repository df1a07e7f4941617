"""fastlm.metrics against values worked out by hand and against scikit-learn's."""

import numpy as np
import pytest

from fastlm import metrics


def test_hand_computed_with_a_class_never_predicted_and_one_never_present():
    # classes a, b, c, d: c is present but never predicted, d is never present nor predicted.
    y_true = [0, 0, 0, 1, 1, 2, 2]
    y_pred = [0, 0, 1, 1, 0, 0, 1]
    rep = metrics.report(y_true, y_pred, ["a", "b", "c", "d"])
    assert rep["confusion"] == [[2, 1, 0, 0], [1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0]]
    assert rep["accuracy"] == pytest.approx(3 / 7)
    a, b, c, d = rep["per_class"]
    # a: tp 2 of 4 predicted, of 3 present; b: tp 1 of 3 predicted, of 2 present.
    assert (a["precision"], a["recall"], a["support"]) == (pytest.approx(2 / 4), pytest.approx(2 / 3), 3)
    assert a["f1"] == pytest.approx(2 * 0.5 * (2 / 3) / (0.5 + 2 / 3))
    assert (b["precision"], b["recall"], b["f1"]) == (pytest.approx(1 / 3), pytest.approx(1 / 2), pytest.approx(0.4))
    assert (c["precision"], c["recall"], c["f1"], c["support"]) == (0.0, 0.0, 0.0, 2)
    assert (d["precision"], d["recall"], d["f1"], d["support"]) == (0.0, 0.0, 0.0, 0)
    assert rep["macro_precision"] == pytest.approx((0.5 + 1 / 3) / 4)
    assert rep["macro_recall"] == pytest.approx((2 / 3 + 1 / 2) / 4)
    assert rep["macro_f1"] == pytest.approx((a["f1"] + 0.4) / 4)


def test_perfect_and_all_wrong():
    rep = metrics.report([0, 1, 2], [0, 1, 2], list("xyz"))
    assert rep["accuracy"] == rep["macro_f1"] == 1.0
    rep = metrics.report([0, 0, 1], [1, 1, 0], ["x", "y"])
    assert rep["accuracy"] == rep["macro_f1"] == rep["macro_precision"] == 0.0


@pytest.mark.parametrize("seed", range(5))
def test_matches_scikit_learn(seed):
    skm = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(seed)
    n_classes = int(rng.integers(2, 8))
    y_true = rng.integers(0, n_classes, size=int(rng.integers(1, 60)))
    # A skewed predictor that leaves some classes out, so empty columns and rows occur.
    y_pred = np.where(rng.random(y_true.size) < 0.6, y_true, rng.integers(0, max(1, n_classes - 2), y_true.size))
    labels = list(range(n_classes))
    rep = metrics.report(y_true, y_pred, [str(i) for i in labels])
    assert np.array_equal(rep["confusion"], skm.confusion_matrix(y_true, y_pred, labels=labels))
    assert rep["accuracy"] == pytest.approx(skm.accuracy_score(y_true, y_pred))
    p, r, f, s = skm.precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    assert [c["precision"] for c in rep["per_class"]] == pytest.approx(p)
    assert [c["recall"] for c in rep["per_class"]] == pytest.approx(r)
    assert [c["f1"] for c in rep["per_class"]] == pytest.approx(f)
    assert [c["support"] for c in rep["per_class"]] == list(s)
    for avg in ("precision", "recall", "f1"):
        want = getattr(skm, f"{avg}_score" if avg != "f1" else "f1_score")(
            y_true, y_pred, labels=labels, average="macro", zero_division=0)
        assert rep[f"macro_{avg}"] == pytest.approx(want), avg


@pytest.mark.parametrize("y_true, y_pred, n, match", [
    ([0, 1], [0], 2, "as long"),
    ([0, 2], [0, 1], 2, "y_true holds class 2"),
    ([0, 1], [0, -1], 2, "y_pred holds class -1"),
    ([0.5, 1], [0, 1], 2, "class indices"),
    ([[0]], [[0]], 2, "1-D"),
])
def test_bad_input_is_a_clear_error(y_true, y_pred, n, match):
    with pytest.raises(ValueError, match=match):
        metrics.confusion_matrix(y_true, y_pred, n)


def test_bad_class_count_and_no_examples():
    with pytest.raises(ValueError, match="n_classes"):
        metrics.confusion_matrix([0], [0], 0)
    with pytest.raises(ValueError, match="no examples"):
        metrics.report([], [], ["a"])


def test_format_and_png(tmp_path):
    pytest.importorskip("matplotlib")
    labels = [f"class.{i}" for i in range(20)]
    rng = np.random.default_rng(0)
    y = rng.integers(0, 20, 300)
    rep = metrics.report(y, np.where(rng.random(300) < 0.7, y, 0), labels)
    text = metrics.format_report(rep)
    assert "class.19" in text and "macro avg" in text and f"accuracy {rep['accuracy']:.4f}" in text
    png = metrics.plot_confusion(rep["confusion"], labels, tmp_path / "cm.png", title="test")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
