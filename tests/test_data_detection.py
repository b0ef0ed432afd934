"""kdjax.data.detection_digits: the digits detection set (exact boxes, classes, determinism, errors,
the pipeline's source interface) and the TFDS voc/coco mapping (hand-made records, and voc/2007 through
tfds.data_source under tfds.testing.mock_data)."""
import numpy as np
import pytest

from kdjax import data
from kdjax.data import detection_digits as DD
from kdjax.detection.targets import check_ground_truth

CLEAN = dict(clutter=0, noise=0.0)


def small_set(**kwargs):
    return DD.digits_detection_arrays(num_train=kwargs.pop("num_train", 40), num_test=10, **kwargs)


def test_layout_and_ground_truth():
    arrays = small_set()
    for split, n in (("train", 40), ("test", 10)):
        a = arrays[split]
        assert a["image"].shape == (n, 64, 64, 3) and a["image"].dtype == np.float32
        assert a["boxes"].shape == (n, 4, 4) and a["labels"].dtype == np.int32 and a["valid"].dtype == bool
        assert 0.0 <= a["image"].min() and a["image"].max() <= 1.0
        np.testing.assert_array_equal(a["label"], a["valid"].sum(1))
        assert a["valid"][:, 0].all()  # every canvas holds at least one object
        assert not a["boxes"][~a["valid"]].any() and not a["labels"][~a["valid"]].any()
        check_ground_truth(a["boxes"], a["labels"], a["valid"], DD.NUM_DIGIT_CLASSES, (64, 64))
        boxes = a["boxes"][a["valid"]]
        sides = np.concatenate([boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]])
        assert sides.min() >= 2 and sides.max() <= 32  # ink of 8x8 glyphs at scales 2..4
    source = data.ArraySource(arrays["train"])  # the grain pipeline's source interface
    assert len(source) == 40 and set(source[3]) == {"image", "boxes", "labels", "valid", "label"}
    assert len(set(arrays["train"]["labels"][arrays["train"]["valid"]])) == 10


def test_ink_lies_in_the_boxes_and_boxes_are_tight():
    a = small_set(**CLEAN)["train"]
    for image, boxes, valid in zip(a["image"], a["boxes"], a["valid"]):
        ink = image[..., 0] > 0
        inside = np.zeros_like(ink)
        for x1, y1, x2, y2 in boxes[valid].astype(int):
            inside[y1:y2, x1:x2] = True
            region = ink[y1:y2, x1:x2]  # each edge row / column of a box touches its glyph's ink
            assert region[0].any() and region[-1].any() and region[:, 0].any() and region[:, -1].any()
        assert not (ink & ~inside).any()
        np.testing.assert_array_equal(image[..., 0], image[..., 2])


def test_render_canvas_exact_box_and_class():
    glyphs, labels = DD._glyphs("train")
    index = 17
    r0, c0, r1, c1 = DD._ink_box(glyphs[index])
    for seed in range(5):
        rec = DD.render_canvas(np.random.default_rng(seed), glyphs[index:index + 1], labels[index:index + 1],
                               canvas_size=48, max_objects=1, scales=(3,), max_overlap=0.0, **CLEAN)
        x1, y1, x2, y2 = rec["boxes"][0]
        assert rec["valid"][0] and rec["labels"][0] == labels[index]
        assert (x2 - x1, y2 - y1) == (3 * (c1 - c0), 3 * (r1 - r0))
        crop = rec["image"][int(y1):int(y2), int(x1):int(x2), 0]
        # the crop is the glyph's ink, upscaled by 3 with nearest neighbour
        np.testing.assert_array_equal(crop[::3, ::3], glyphs[index][r0:r1, c0:c1])
        assert rec["image"][..., 0].sum() == pytest.approx(9 * glyphs[index].sum(), rel=1e-5)


def test_overlap_bound_and_clutter():
    a = small_set(max_overlap=0.1, clutter=3, num_train=30)["train"]
    for boxes, valid in zip(a["boxes"], a["valid"]):
        b = boxes[valid]
        for i in range(len(b)):
            if i:
                assert DD._iou(b[i], b[:i]).max() <= 0.1 + 1e-6
    assert (a["valid"].sum(1) > 1).any()


def test_determinism_by_seed():
    first = DD.digits_detection_arrays(num_train=6, num_test=3, seed=3)
    again = DD._digits_detection.__wrapped__(8, 3, 64, 4, (2, 3, 4), 0.3, 2, 0.05, 3)  # uncached, more canvases
    for key in first["train"]:
        np.testing.assert_array_equal(first["train"][key], again["train"][key][:6])  # canvas i: its own rng
        np.testing.assert_array_equal(first["test"][key], again["test"][key])
    other = DD.digits_detection_arrays(num_train=6, num_test=3, seed=4)
    assert not np.array_equal(first["train"]["image"], other["train"]["image"])


def test_through_the_grain_pipeline():
    arrays = small_set()
    train = data.make_train_iterator(data.ArraySource(arrays["train"]), global_batch_size=8, seed=0,
                                     transform=DD.keep_record)
    batch = next(train)
    assert batch["boxes"].shape == (8, 4, 4) and batch["valid"].shape == (8, 4) and batch["image"].shape[0] == 8
    for row, i in enumerate(batch["id"]):
        for key in ("image", "boxes", "labels", "valid"):
            np.testing.assert_array_equal(batch[key][row], arrays["train"][key][i])
    evals = list(data.make_eval_iterator(data.ArraySource(arrays["test"]), global_batch_size=4,
                                         transform=DD.keep_record))
    assert len(evals) == 3 and list(evals[-1]["mask"]) == [True, True, False, False]
    assert evals[-1]["boxes"].shape == (4, 4, 4)


def test_random_horizontal_flip():
    rec = {key: value[0] for key, value in small_set(**CLEAN)["train"].items()}
    assert DD.random_horizontal_flip(rec, None)["image"] is rec["image"]  # eval: unchanged
    flips = [DD.random_horizontal_flip(rec, np.random.default_rng(s)) for s in range(8)]
    flipped = [f for f in flips if not np.array_equal(f["image"], rec["image"])]
    assert 0 < len(flipped) < 8
    f = flipped[0]
    np.testing.assert_array_equal(f["image"], rec["image"][:, ::-1])
    ink = f["image"][..., 0] > 0
    inside = np.zeros_like(ink)
    for x1, y1, x2, y2 in f["boxes"][f["valid"]].astype(int):
        inside[y1:y2, x1:x2] = True
    assert not (ink & ~inside).any() and not f["boxes"][~f["valid"]].any()
    twice = DD.random_horizontal_flip(f, np.random.default_rng(int(np.flatnonzero(
        [not np.array_equal(g["image"], rec["image"]) for g in flips])[0])))
    np.testing.assert_array_equal(twice["boxes"], rec["boxes"])
    np.testing.assert_array_equal(twice["labels"], rec["labels"])


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_train=0), "num_train must be an integer >= 1"),
    (dict(canvas_size=24), r"canvas_size=24 cannot hold a glyph at scale 4 \(32 px\)"),
    (dict(scales=()), "scales must name at least one"),
    (dict(scales=(2, 0)), "each of scales must be an integer >= 1"),
    (dict(max_overlap=1.5), r"max_overlap is an IoU and must lie in \[0, 1\]"),
    (dict(noise=-0.1), "noise is a standard deviation"),
    (dict(max_objects=0), "max_objects must be an integer >= 1"),
    (dict(clutter=-1), "clutter must be an integer >= 0"),
    (dict(seed=1.5), "seed must be an integer >= 0"),
])
def test_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DD.digits_detection_arrays(**kwargs)


def voc_like(height=40, width=80):
    image = np.arange(height * width * 3, dtype=np.uint32).reshape(height, width, 3) % 256
    return {"image": image.astype(np.uint8),
            "objects": {"bbox": np.array([[0.25, 0.5, 0.75, 1.0], [0.0, 0.0, 0.01, 0.5], [0.1, 0.1, 0.5, 0.3]],
                                         np.float32),
                        "label": np.array([7, 3, 19], np.int64)}}


def test_tfds_record_mapping():
    rec = DD.tfds_record(voc_like(), canvas_size=64, max_objects=4)
    # 40x80 -> 32x64 (scale 0.8) at the top-left; box 2 is 0.32 px tall and dropped
    assert rec["image"].shape == (64, 64, 3) and not rec["image"][32:].any() and rec["image"][:32].any()
    np.testing.assert_allclose(rec["boxes"][:2], [[32, 8, 64, 24], [6.4, 3.2, 19.2, 16]], rtol=1e-6)
    assert list(rec["labels"]) == [7, 19, 0, 0] and list(rec["valid"]) == [True, True, False, False]
    assert rec["label"] == 2
    check_ground_truth(rec["boxes"][None], rec["labels"][None], rec["valid"][None], 20, (64, 64))
    one = DD.tfds_record(voc_like(), canvas_size=64, max_objects=1)
    assert list(one["labels"]) == [7]  # the first objects are kept
    crowd = voc_like()
    crowd["objects"]["is_crowd"] = np.array([True, False, False])
    assert list(DD.tfds_record(crowd, canvas_size=64, max_objects=4)["labels"][:1]) == [19]
    bad = voc_like()
    bad["objects"]["bbox"][0] = [0.75, 0.5, 0.25, 1.0]
    with pytest.raises(ValueError, match="ymin <= ymax"):
        DD.tfds_record(bad, canvas_size=64, max_objects=4)
    bad = voc_like()
    bad["objects"]["label"] = bad["objects"]["label"][:2]
    with pytest.raises(ValueError, match="3 boxes but 2 labels"):
        DD.tfds_record(bad, canvas_size=64, max_objects=4)
    with pytest.raises(ValueError, match="needs 'image'"):
        DD.tfds_record({"image": np.zeros((4, 4, 3))}, canvas_size=64, max_objects=4)
    with pytest.raises(ValueError, match="unknown TFDS detection dataset 'kitti'"):
        DD.tfds_detection_source("kitti", "train")


@pytest.mark.parametrize("name", ["voc/2007", "coco/2017"])
def test_tfds_source_under_mock_data(name):
    tfds = pytest.importorskip("tensorflow_datasets")
    records = [voc_like(), voc_like(30, 30)]
    if name == "coco/2017":
        for r in records:
            r["objects"]["is_crowd"] = np.zeros(3, bool)
    seen = []

    def as_data_source(self, split, **kwargs):
        seen.append((self.name, self.builder_config.name, split))
        return records

    with tfds.testing.mock_data(policy=tfds.testing.MockPolicy.USE_CODE, as_data_source_fn=as_data_source):
        source = DD.tfds_detection_source(name, "train", canvas_size=64, max_objects=4)
    assert seen == [tuple(name.split("/")) + ("train",)]  # the real builder and config were asked
    assert len(source) == 2
    first = source[0]
    np.testing.assert_array_equal(first["boxes"], DD.tfds_record(records[0], canvas_size=64, max_objects=4)["boxes"])
    second = source[1]  # 30x30 -> 64x64, no padding
    assert second["image"][-1].any()
    np.testing.assert_allclose(second["boxes"][0], [32, 16, 64, 48], rtol=1e-6)
