"""kdjax.detection.evaluate.coco_map on hand-made cases whose COCO AP is known in closed form.

COCO AP interpolates precision at 101 recall points r = 0, 0.01, ..., 1 (precision 0 past the
largest recall reached) and averages over IoU thresholds 0.50, 0.55, ..., 0.95.
"""
import numpy as np
import pytest

pytest.importorskip("pycocotools")

from kdjax.detection.evaluate import coco_map  # noqa: E402

GT = [
    {"boxes": np.array([[10.0, 10.0, 50.0, 60.0], [60.0, 5.0, 90.0, 40.0]]), "labels": np.array([0, 1])},
    {"boxes": np.array([[0.0, 0.0, 30.0, 30.0]]), "labels": np.array([0])},
]


def dets(boxes, labels, scores):
    return {"boxes": np.asarray(boxes, np.float64).reshape(-1, 4), "labels": np.asarray(labels, np.int64),
            "scores": np.asarray(scores, np.float64)}


def perfect():
    return [dets(g["boxes"], g["labels"], [0.9] * len(g["labels"])) for g in GT]


def test_perfect_detections_score_one(capsys):
    out = coco_map(GT, perfect(), num_classes=3)
    assert (out["map"], out["map50"], out["map75"]) == pytest.approx((1.0, 1.0, 1.0))
    np.testing.assert_allclose(out["ap_per_class"][:2], 1.0)
    assert np.isnan(out["ap_per_class"][2]) and np.isnan(out["ap50_per_class"][2])  # class 2 has no ground truth
    assert capsys.readouterr().out == ""  # pycocotools' prints are silenced


def test_one_of_two_missed():
    # class 0 has two objects; detecting only one gives recall 0.5 at precision 1: 51 of the 101
    # recall points (0, ..., 0.50) have precision 1.
    d = perfect()
    d[1] = dets(np.zeros((0, 4)), [], [])
    out = coco_map(GT, d, num_classes=2)
    np.testing.assert_allclose(out["ap_per_class"], [51 / 101, 1.0])
    assert out["map"] == pytest.approx((51 / 101 + 1) / 2)
    assert out["map50"] == pytest.approx((51 / 101 + 1) / 2)


def test_wrong_class_scores_zero_for_that_class():
    # image 0: the class-0 object is detected as class 1 (lower score than the true class-1 box).
    d = perfect()
    d[0] = dets(GT[0]["boxes"], [1, 1], [0.5, 0.9])
    out = coco_map(GT[:1], d[:1], num_classes=2)
    np.testing.assert_allclose(out["ap_per_class"], [0.0, 1.0])   # the false positive ranks below the true one
    assert out["map"] == pytest.approx(0.5)
    # ranked above it instead: class 1 precision is 1/2 at its only recall point
    d[0] = dets(GT[0]["boxes"], [1, 1], [0.95, 0.9])
    out = coco_map(GT[:1], d[:1], num_classes=2)
    np.testing.assert_allclose(out["ap_per_class"], [0.0, 0.5])


def test_localisation_quality_across_iou_thresholds():
    # IoU 0.62 (intersection 62, union 100): a match at thresholds 0.50, 0.55, 0.60 only.
    gt = [{"boxes": np.array([[0.0, 0.0, 10.0, 10.0]]), "labels": np.array([0])}]
    out = coco_map(gt, [dets([[0.0, 0.0, 10.0, 6.2]], [0], [0.8])], num_classes=1)
    assert out["map50"] == pytest.approx(1.0)
    assert out["map75"] == pytest.approx(0.0)
    assert out["map"] == pytest.approx(0.3)


def test_valid_masks_max_detections_and_empty():
    d = perfect()
    # padded output: an extra row masked out does not count (unmasked it would be a false positive first)
    d[0] = {**dets(np.concatenate([GT[0]["boxes"], [[0.0, 0.0, 5.0, 5.0]]]), [0, 1, 0], [0.9, 0.9, 0.99]),
            "valid": np.array([True, True, False])}
    assert coco_map(GT, d, num_classes=2)["map"] == pytest.approx(1.0)
    d[0]["valid"] = np.array([True, True, True])
    assert coco_map(GT, d, num_classes=2)["ap_per_class"][0] < 1.0
    # max_detections=1: only the top-scoring detection of each image and class counts (pycocotools'
    # rule). Image 0 gets a class-0 false positive scored above its true class-0 box.
    d = perfect()
    d[0] = dets(np.concatenate([[[100.0, 100.0, 120.0, 120.0]], GT[0]["boxes"]]), [0, 0, 1], [0.95, 0.9, 0.9])
    # all count: FP, TP, TP -> precision 2/3 at recall 1, interpolated back to recall 0
    np.testing.assert_allclose(coco_map(GT, d, num_classes=2)["ap_per_class"], [2 / 3, 1.0])
    # one per image and class: image 0's TP is dropped, its FP kept -> FP, TP: precision 1/2 up to recall 0.5
    np.testing.assert_allclose(coco_map(GT, d, num_classes=2, max_detections=1)["ap_per_class"],
                               [0.5 * 51 / 101, 1.0])
    # no detections at all: 0; no ground truth at all: NaN
    none = [dets(np.zeros((0, 4)), [], []) for _ in GT]
    assert coco_map(GT, none, num_classes=2)["map"] == 0.0
    assert np.isnan(coco_map([{"boxes": np.zeros((0, 4)), "labels": np.zeros(0, int)}], none[:1], 2)["map"])


def test_errors():
    with pytest.raises(ValueError, match="one detection entry"):
        coco_map(GT, perfect()[:1], num_classes=2)
    with pytest.raises(ValueError, match="max_detections"):
        coco_map(GT, perfect(), num_classes=2, max_detections=0)
    with pytest.raises(ValueError, match="outside"):
        coco_map(GT, perfect(), num_classes=1)
    bad = perfect()
    bad[0] = dets([[10.0, 10.0, 5.0, 60.0]], [0], [0.5])
    with pytest.raises(ValueError, match="x2 < x1"):
        coco_map(GT, bad, num_classes=2)
    bad[0] = dets([[10.0, 10.0, 50.0, 60.0]], [0], [np.nan])
    with pytest.raises(ValueError, match="non-finite score"):
        coco_map(GT, bad, num_classes=2)
    bad[0] = {"boxes": np.zeros((1, 4)), "labels": np.zeros(1, int)}
    with pytest.raises(ValueError, match="lacks"):
        coco_map(GT, bad, num_classes=2)
    with pytest.raises(ValueError, match="shape"):
        coco_map(GT, [dets(GT[0]["boxes"], [0], [0.5, 0.5]), perfect()[1]], num_classes=2)
