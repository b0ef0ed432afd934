"""``config.dataset.augment`` (issue 19): the demo's MNIST-1D shift + noise as the small sets' train
transform. Off by default (existing runs and stores unchanged), validated, applied to the train
views only (``train_example``, the train iterator, a view store's fingerprint), never to eval."""
import json
import os

import numpy as np
import pytest

from experiments import datasets, errors, stages, validate
from experiments.configs import base, mnist1d_eskd
from kdjax import data


def demo_augment(record, rng):
    """The demo notebook's augmentation, verbatim."""
    image = np.roll(record["image"], rng.integers(-4, 5), axis=0)
    image = image + 0.2 * rng.standard_normal(image.shape)
    return {"image": image.astype(np.float32), "label": record["label"]}


def config(augment=None, name="mnist1d"):
    c = mnist1d_eskd.get_config("teacher=small,mode=full").unlock()
    c.dataset.num_samples = 200
    c.dataset.name = name
    if augment is not None:
        c.dataset.augment = augment
    return c


def test_off_by_default_and_the_eval_view_is_never_augmented():
    assert base.kd_config().dataset.augment == ""
    c = config()
    d = datasets.build_data(c.dataset, 0)
    assert d.train_transform is None and data.transform_fingerprint(d.train_transform) == "identity"
    a = datasets.build_data(config("shift_noise").dataset, 0)
    assert a.eval_transform is None and a.preprocessing == d.preprocessing
    np.testing.assert_array_equal(next(a.eval_iter())["image"], next(d.eval_iter())["image"])


def test_shift_noise_is_the_demo_augmentation_on_the_train_views():
    a = datasets.build_data(config("shift_noise").dataset, 3)
    source = a.sources[a.train_split]
    assert a.train_transform is datasets.shift_noise
    for i, epoch in [(0, 0), (5, 1), (77, 2)]:
        got = data.train_example(source, i, seed=3, epoch=epoch, transform=a.train_transform)
        want = data.train_example(source, i, seed=3, epoch=epoch, transform=demo_augment)
        np.testing.assert_array_equal(got["image"], want["image"])
        assert got["image"].dtype == np.float32 and got["label"] == source[i]["label"]
        # A roll of the clean signal by |shift| <= 4, plus noise of sd 0.2.
        residuals = [np.std(got["image"] - np.roll(source[i]["image"], s, axis=0))
                     for s in range(-4, 5)]
        assert 0.1 < min(residuals) < 0.3
    batch = next(a.train_iter())
    clean = np.stack([source[int(i)]["image"] for i in batch["id"]])
    assert batch["image"].shape == clean.shape and np.abs(batch["image"] - clean).max() > 0.3
    # Another epoch: another view of the same id.
    e0 = data.train_example(source, 0, seed=3, epoch=0, transform=a.train_transform)["image"]
    e1 = data.train_example(source, 0, seed=3, epoch=1, transform=a.train_transform)["image"]
    assert not np.allclose(e0, e1)
    fp = data.transform_fingerprint(a.train_transform)
    assert fp != "identity" and fp.startswith("experiments.datasets.shift_noise@")


@pytest.mark.parametrize("name, value, message", [
    ("mnist1d", "shift", r"config.dataset.augment='shift'; valid: '', 'shift_noise'"),
    ("digits", "shift_noise", r"dataset.name='digits' has none; use ''"),
    ("imagenet2012", "shift_noise", r"has its own \(random-resized crops and flips\)"),
])
def test_bad_values_are_config_errors(name, value, message):
    c = config(name=name)
    c.dataset.augment = value
    with pytest.raises(errors.ConfigError, match=message):
        validate.validate_config(c, "kd")
    validate.validate_config(config("shift_noise"), "kd")
    with pytest.raises(errors.ConfigError, match=r"config.dataset.augment='shift'; valid"):
        datasets.train_transform("shift")  # build_data refuses it too, without validation


def test_a_workdir_started_before_the_key_existed_resumes(tmp_path):
    """config.json of an older run lacks dataset.augment: resuming with the default is no change;
    turning augmentation on under it is refused as any results-shaping change."""
    c = config()
    workdir = str(tmp_path)
    recorded = json.loads(c.to_json_best_effort())
    del recorded["dataset"]["augment"]
    with open(os.path.join(workdir, "config.json"), "w") as f:
        json.dump(recorded, f)
    stages.record_config(c, workdir)
    assert not os.path.exists(os.path.join(workdir, "config_changes.jsonl"))
    with pytest.raises(errors.ConfigError, match=r"dataset.augment: None -> 'shift_noise'"):
        stages.record_config(config("shift_noise"), workdir)
