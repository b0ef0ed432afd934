"""kdjax.data ImageNet: a tiny imagenet2012 built by the real TFDS builder, then the real pipeline.

The session fixture writes fake ILSVRC tars (3 classes x 4 train JPEGs, validation files named as
the real ones so TFDS's shipped validation labels apply) into a temporary manual dir and prepares
them with ``python -m kdjax.data.imagenet`` (TFDS ``download_and_prepare``, ArrayRecord). Every
image is one solid colour unique to its file, so a batch row can be traced back to its file.
"""

import functools
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import urllib.parse

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from PIL import Image

import fake_gcs
from kdjax import data
from kdjax.data import imagenet

SYNSET_ROWS = (0, 7, 999)  # rows of TFDS's labels.txt used as the fake classes
TRAIN_PER_CLASS = 4
NUM_VAL = 10
MEAN = np.asarray([0.485, 0.456, 0.406]) * 255.0
STD = np.asarray([0.229, 0.224, 0.225]) * 255.0


def _tfds_label_files():
    import tensorflow_datasets as tfds

    root = os.path.join(os.path.dirname(tfds.__file__), "datasets", "imagenet2012")
    with open(os.path.join(root, "labels.txt")) as f:
        synsets = f.read().split()
    with open(os.path.join(root, "validation_labels.txt")) as f:
        validation = f.read().split()
    return synsets, validation


def _colour(number):
    return (30 + 17 * number) % 256, (200 - 13 * number) % 256, (90 + 29 * number) % 256


def _jpeg(colour, height, width):
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def _add(tar, name, payload):
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    tar.addfile(info, io.BytesIO(payload))


def _write_fake_ilsvrc(manual_dir):
    """Writes the two tars; returns {file_name: (expected label, colour)}."""
    synsets, validation = _tfds_label_files()
    expected, number = {}, 0
    with tarfile.open(os.path.join(manual_dir, "ILSVRC2012_img_train.tar"), "w") as outer:
        for row in SYNSET_ROWS:
            synset = synsets[row]
            inner_bytes = io.BytesIO()
            with tarfile.open(fileobj=inner_bytes, mode="w") as inner:
                for k in range(TRAIN_PER_CLASS):
                    name = f"{synset}_{k + 1}.JPEG"
                    _add(inner, name, _jpeg(_colour(number), 36 + 5 * k, 60 - 4 * k))
                    expected[name] = (row, _colour(number))
                    number += 1
            _add(outer, f"{synset}.tar", inner_bytes.getvalue())
    with tarfile.open(os.path.join(manual_dir, "ILSVRC2012_img_val.tar"), "w") as tar:
        for k in range(NUM_VAL):
            name = f"ILSVRC2012_val_{k + 1:08d}.JPEG"
            _add(tar, name, _jpeg(_colour(number), 50 - k, 40 + 2 * k))
            expected[name] = (synsets.index(validation[k]), _colour(number))
            number += 1
    return expected


@pytest.fixture(scope="session")
def tiny_imagenet(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_imagenet")
    manual, data_dir = root / "manual", root / "tfds"
    manual.mkdir()
    expected = _write_fake_ilsvrc(manual)
    imagenet.main(["--manual_dir", str(manual), "--data_dir", str(data_dir)])
    return {"data_dir": str(data_dir), "manual_dir": str(manual), "expected": expected}


def _name(source, example_id):
    name = source[int(example_id)]["file_name"]
    return name.decode() if isinstance(name, bytes) else name


def _denormalize(image):
    return image.astype(np.float64) * STD + MEAN


def _check_rows(batch, source, expected):
    """Label and pixels of every row match the file its id points at."""
    for row, example_id in enumerate(batch["id"]):
        label, colour = expected[_name(source, example_id)]
        assert batch["label"][row] == label
        pixels = _denormalize(batch["image"][row]).reshape(-1, 3)
        np.testing.assert_allclose(pixels.mean(0), colour, atol=4.0)
        assert pixels.std(0).max() < 3.0  # a solid colour stays solid through crop/resize


# ----------------------------------------------------------------------------- built dataset


def test_real_builder_made_both_splits_with_the_right_labels(tiny_imagenet):
    expected = tiny_imagenet["expected"]
    train = data.imagenet_source("train", tiny_imagenet["data_dir"])
    validation = data.imagenet_source("validation", tiny_imagenet["data_dir"])
    assert len(train) == len(SYNSET_ROWS) * TRAIN_PER_CLASS and len(validation) == NUM_VAL
    names = [_name(train, i) for i in range(len(train))] + [_name(validation, i) for i in range(NUM_VAL)]
    assert sorted(names) == sorted(expected)
    for source in (train, validation):
        for i in range(len(source)):
            assert source[i]["label"] == expected[_name(source, i)][0]
            assert isinstance(source[i]["image"], bytes)  # left encoded for the host transform


def test_ids_are_stable_record_indices(tiny_imagenet):
    first = data.imagenet_source("train", tiny_imagenet["data_dir"])
    again = data.imagenet_source("train", tiny_imagenet["data_dir"])
    assert [_name(first, i) for i in range(len(first))] == [_name(again, i) for i in range(len(again))]
    split_info = first.dataset_info.splits["train"]
    assert data.tfds_string_id(first, 5) == f"{split_info.filenames[0]}__5"
    assert data.tfds_string_id(first, 5) == "imagenet2012-train.array_record-00000-of-00001__5"
    with pytest.raises(ValueError, match=r"example_id must be in \[0, 12\)"):
        data.tfds_string_id(first, 12)


def test_rebuilding_gives_the_same_record_order(tiny_imagenet, tmp_path):
    data.prepare_imagenet(tiny_imagenet["manual_dir"], str(tmp_path / "rebuilt"))
    for split in ("train", "validation"):
        a = data.imagenet_source(split, tiny_imagenet["data_dir"])
        b = data.imagenet_source(split, str(tmp_path / "rebuilt"))
        assert [_name(a, i) for i in range(len(a))] == [_name(b, i) for i in range(len(b))]


# ----------------------------------------------------------------------------- gs:// data_dir

# Runs in a fresh process: etils picks its gs:// backend once per process (tf.io.gfile when
# TensorFlow is installed, which cannot be pointed at a local server; EPATH_USE_TF=false makes it
# fsspec's, here the fake's client), and the ArrayRecord shards go through ArrayRecord's own GCS
# client, pointed at the fake by CLOUD_STORAGE_EMULATOR_ENDPOINT. The config goes through the
# command-line parser and experiments.datasets.build_data, as in a run.
_GCS_READ = r"""
import json, sys
import numpy as np
import fake_gcs
fake_gcs.register_fsspec()
from experiments import cli
from experiments.datasets import build_data
from kdjax import data

url = sys.argv[1]
source = data.imagenet_source("validation", url)
names = [source[i]["file_name"].decode() for i in range(len(source))]
args = cli.parse_command_line(
    ["--config=experiments/configs/imagenet_eskd.py:teacher=none",
     f"--config.dataset.data_dir={url}", "--config.dataset.eval_batch_size=4",
     "--config.dataset.num_threads=2", "--workdir=unused"], prog="gcs_read")
dataset = build_data(args.config.dataset, seed=0)
rows = []
for batch in dataset.eval_iter():
    for row in np.flatnonzero(batch["mask"]):
        rows.append([int(batch["id"][row]), int(batch["label"][row]),
                     batch["image"][row].reshape(-1, 3).mean(0).tolist()])
print(json.dumps({"data_dir": args.config.dataset.data_dir, "names": names, "rows": rows,
                  "sizes": {s: dataset.num_examples(s) for s in sorted(dataset.sources)}}))
"""


def test_gs_data_dir_reaches_tfds_unchanged_and_reads_through_gcs(tiny_imagenet):
    bucket_dir = os.path.dirname(tiny_imagenet["data_dir"])  # gs://fake-bucket/tfds == data_dir
    url = "gs://fake-bucket/" + os.path.basename(tiny_imagenet["data_dir"])
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    env = {**os.environ, "EPATH_USE_TF": "false",
           "PYTHONPATH": os.pathsep.join(filter(None, [tests_dir, os.environ.get("PYTHONPATH")]))}
    with fake_gcs.FakeGcsServer({"fake-bucket": bucket_dir}) as server:
        env[fake_gcs.ENDPOINT_ENV] = server.endpoint
        result = subprocess.run([sys.executable, "-c", _GCS_READ, url], env=env, text=True,
                                capture_output=True, timeout=600,
                                cwd=os.path.dirname(tests_dir))
    assert result.returncode == 0, result.stderr[-4000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["data_dir"] == url
    assert out["sizes"] == {"train": len(SYNSET_ROWS) * TRAIN_PER_CLASS, "validation": NUM_VAL}
    expected = tiny_imagenet["expected"]
    assert sorted(out["names"]) == sorted(n for n in expected if n.startswith("ILSVRC2012_val_"))
    assert sorted(row[0] for row in out["rows"]) == list(range(NUM_VAL))
    for example_id, label, mean in out["rows"]:
        want_label, colour = expected[out["names"][example_id]]
        assert label == want_label
        np.testing.assert_allclose(_denormalize(np.asarray(mean)), colour, atol=4.0)
    # Both readers went to the fake: TFDS's metadata through epath/fsspec, the shards through
    # ArrayRecord's client (object downloads of the .array_record files).
    requests = [urllib.parse.unquote(r) for r in server.requests]
    assert any("imagenet2012/" in r and r.endswith("dataset_info.json") for r in requests), requests
    assert any(".array_record-" in r and "alt=media" in r for r in requests), requests
    assert not any(r.split(" ")[0] in ("POST", "PUT", "PATCH", "DELETE") for r in requests), requests


# ----------------------------------------------------------------------------- eval


def test_eval_pipeline_pads_masks_and_labels(tiny_imagenet):
    source = data.imagenet_source("validation", tiny_imagenet["data_dir"])
    batches = list(data.imagenet_eval_iterator(global_batch_size=4, data_dir=tiny_imagenet["data_dir"],
                                               num_threads=2))
    assert len(batches) == 3
    for batch in batches:
        assert batch["image"].shape == (4, 224, 224, 3) and batch["image"].dtype == np.float32
        assert batch["label"].dtype == np.int32 and batch["id"].dtype == np.int64
        assert batch["mask"].dtype == np.bool_
        _check_rows(batch, source, tiny_imagenet["expected"])
    mask = np.concatenate([b["mask"] for b in batches])
    ids = np.concatenate([b["id"] for b in batches])
    np.testing.assert_array_equal(mask, np.arange(12) < NUM_VAL)  # exactly the 2 padded rows
    np.testing.assert_array_equal(ids[mask], np.arange(NUM_VAL))


def test_eval_hosts_cover_the_split_once(tiny_imagenet):
    ids = []
    for host in range(2):
        for batch in data.imagenet_eval_iterator(global_batch_size=4, data_dir=tiny_imagenet["data_dir"],
                                                 process_index=host, process_count=2, num_threads=2):
            assert batch["image"].shape[0] == 2
            ids.extend(batch["id"][batch["mask"]].tolist())
    assert sorted(ids) == list(range(NUM_VAL))


# ----------------------------------------------------------------------------- train


def test_train_pipeline_epochs_labels_and_consistent_views(tiny_imagenet):
    data_dir = tiny_imagenet["data_dir"]
    source = data.imagenet_source("train", data_dir)
    it = data.imagenet_train_iterator(global_batch_size=6, seed=3, data_dir=data_dir, num_epochs=2,
                                      num_threads=4)
    batches = list(it)
    assert len(batches) == 4
    transform = functools.partial(data.imagenet_train_transform, image_size=224)
    for batch in batches:
        assert set(batch) == {"image", "label", "id", "epoch", "mask"}
        assert batch["image"].shape == (6, 224, 224, 3) and batch["image"].dtype == np.float32
        assert batch["mask"].all()
        _check_rows(batch, source, tiny_imagenet["expected"])
        for row in (0, 5):  # the view is a pure function of (seed, epoch, id)
            view = data.train_example(source, int(batch["id"][row]), seed=3,
                                      epoch=int(batch["epoch"][row]), transform=transform)
            np.testing.assert_array_equal(batch["image"][row], view["image"])
    ids = np.concatenate([b["id"] for b in batches])
    np.testing.assert_array_equal(np.concatenate([b["epoch"] for b in batches]), np.repeat([0, 1], 12))
    assert sorted(ids[:12]) == list(range(12)) and sorted(ids[12:]) == list(range(12))
    again = list(data.imagenet_train_iterator(global_batch_size=6, seed=3, data_dir=data_dir, num_epochs=2,
                                              num_threads=1))
    for a, b in zip(batches, again):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])


def test_train_hosts_are_disjoint_and_covering(tiny_imagenet):
    shares = []
    for host in range(3):
        it = data.imagenet_train_iterator(global_batch_size=6, seed=1, data_dir=tiny_imagenet["data_dir"],
                                          process_index=host, process_count=3, num_epochs=1, num_threads=2)
        batches = list(it)
        assert len(batches) == 2 and batches[0]["image"].shape[0] == 2
        shares.append(np.concatenate([b["id"] for b in batches]))
    assert sorted(np.concatenate(shares).tolist()) == list(range(12))


def test_resume_from_orbax_checkpoint_and_device_normalisation(tiny_imagenet, tmp_path):
    data_dir = tiny_imagenet["data_dir"]
    make = lambda normalize=True: data.imagenet_train_iterator(
        global_batch_size=8, seed=5, data_dir=data_dir, num_threads=2, normalize_on_host=normalize)
    uninterrupted = make()
    reference = [next(uninterrupted) for _ in range(3)]
    it = make()
    next(it)
    with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
        manager.save(1, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
        manager.wait_until_finished()
    resumed = make()
    with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
        manager.restore(1, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(resumed)))
    for want in reference[1:]:
        got = next(resumed)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])
    # uint8 on the host, normalised on the device: same values as host normalisation.
    host_uint8 = make(normalize=False)
    mesh = jax.make_mesh((8,), ("data",))
    device = data.prefetch_to_device(host_uint8, NamedSharding(mesh, P("data")),
                                     device_fn=jax.jit(data.normalize_batch))
    first = next(device)
    assert first["image"].dtype == np.float32
    assert first["image"].sharding.is_equivalent_to(NamedSharding(mesh, P("data")), 4)
    np.testing.assert_allclose(np.asarray(first["image"]), reference[0]["image"], rtol=1e-5, atol=1e-5)
    device.close()


# ----------------------------------------------------------------------------- errors


def test_missing_or_unprepared_dataset_says_how_to_prepare(tmp_path):
    with pytest.raises(FileNotFoundError) as error:
        data.imagenet_source("train", str(tmp_path / "empty"))
    message = str(error.value)
    assert "not prepared" in message and "python -m kdjax.data.imagenet --manual_dir=" in message
    assert "tfds build imagenet2012" in message and "--file_format=array_record" in message
    assert "ILSVRC2012_img_train.tar" in message and "ILSVRC2012_img_val.tar" in message
    (tmp_path / "manual").mkdir()
    with pytest.raises(FileNotFoundError, match="neither ILSVRC2012_img_train.tar nor ILSVRC2012_img_val.tar"):
        data.prepare_imagenet(str(tmp_path / "manual"), str(tmp_path / "out"))


def test_wrong_split_or_format_errors(tiny_imagenet, tmp_path):
    with pytest.raises(ValueError, match=r"split 'test' of imagenet2012 is not prepared; available: \['train', 'validation'\]"):
        data.imagenet_source("test", tiny_imagenet["data_dir"])
    with pytest.raises(ValueError, match="sub-splits would renumber the example ids"):
        data.imagenet_source("train[:50%]", tiny_imagenet["data_dir"])
    copy = tmp_path / "tfrecord_copy"
    shutil.copytree(tiny_imagenet["data_dir"], copy)
    (info_path,) = copy.glob("imagenet2012/*/dataset_info.json")
    info = json.loads(info_path.read_text())
    info["fileFormat"] = "tfrecord"
    info_path.write_text(json.dumps(info))
    with pytest.raises(ValueError, match="stored as 'tfrecord', but random access .* needs 'array_record'"):
        data.imagenet_source("train", str(copy))


# ----------------------------------------------------------------------------- transforms


def _gradient_jpeg(height, width):
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([255 * x / (width - 1), 255 * y / (height - 1), np.full_like(x, 128.0)], -1)
    buffer = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(buffer, format="PNG")  # lossless, PIL decodes it too
    return buffer.getvalue()


def test_random_resized_crop_box_follows_inception_constraints():
    for seed in range(200):
        rng = np.random.default_rng(seed)
        top, left, h, w = data.random_resized_crop_box(rng, 120, 90)
        assert 0 <= top and top + h <= 120 and 0 <= left and left + w <= 90
        # Accepted tries satisfy the bounds up to rounding of w and h.
        assert 0.08 * 120 * 90 * 0.9 <= h * w <= 120 * 90
        assert 3 / 4 * 0.9 <= w / h <= 4 / 3 * 1.1
    a = data.random_resized_crop_box(np.random.default_rng(1), 120, 90)
    b = data.random_resized_crop_box(np.random.default_rng(1), 120, 90)
    assert a == b
    # A 10 x 1000 strip never fits a crop with aspect <= 4/3: centred fallback, clamped aspect.
    assert data.random_resized_crop_box(np.random.default_rng(0), 10, 1000) == (0, (1000 - 13) // 2, 10, 13)
    assert data.random_resized_crop_box(np.random.default_rng(0), 1000, 10) == ((1000 - 13) // 2, 0, 13, 10)


def test_train_transform_is_crop_resize_flip_of_the_drawn_box():
    record = {"image": _gradient_jpeg(80, 100), "label": 7}
    flips = set()
    for seed in range(8):
        out = data.imagenet_train_transform(record, np.random.default_rng(seed), image_size=32, normalize=False)
        rng = np.random.default_rng(seed)
        top, left, h, w = data.random_resized_crop_box(rng, 80, 100)
        flip = rng.random() < 0.5
        flips.add(flip)
        reference = Image.open(io.BytesIO(record["image"])).convert("RGB")
        reference = np.asarray(reference.crop((left, top, left + w, top + h)).resize((32, 32), Image.Resampling.BILINEAR))
        if flip:
            reference = reference[:, ::-1]
        assert out["image"].dtype == np.uint8 and out["image"].shape == (32, 32, 3) and out["label"] == 7
        np.testing.assert_array_equal(out["image"], reference)
        # Red grows left to right unless flipped.
        assert (np.diff(out["image"][:, :, 0].astype(int).mean(0)) <= 0).all() == flip
    assert flips == {True, False}
    with pytest.raises(ValueError, match="needs an rng"):
        data.imagenet_train_transform(record, None)


def test_eval_transform_resizes_short_side_and_centre_crops():
    record = {"image": _gradient_jpeg(300, 400), "label": 1}
    out = data.imagenet_eval_transform(record, normalize=False)
    assert out["image"].shape == (224, 224, 3)
    resized = Image.open(io.BytesIO(record["image"])).convert("RGB").resize((341, 256), Image.Resampling.BILINEAR)
    expected = np.asarray(resized)[16:240, 58:282]
    np.testing.assert_array_equal(out["image"], expected)
    portrait = data.imagenet_eval_transform({"image": _gradient_jpeg(400, 300), "label": 1})
    assert portrait["image"].shape == (224, 224, 3) and portrait["image"].dtype == np.float32


def test_normalize_image_matches_float64_reference_on_host_and_device():
    pixels = np.random.default_rng(0).integers(0, 256, size=(2, 5, 5, 3)).astype(np.uint8)
    reference = (pixels.astype(np.float64) / 255.0 - np.asarray(data.MEAN_RGB)) / np.asarray(data.STD_RGB)
    np.testing.assert_allclose(data.normalize_image(pixels), reference, rtol=1e-5, atol=1e-5)
    on_device = jax.jit(data.normalize_batch)({"image": pixels, "label": np.zeros(2, np.int32)})
    np.testing.assert_allclose(np.asarray(on_device["image"]), reference, rtol=1e-5, atol=1e-5)
    assert data.normalize_image(pixels).dtype == np.float32


def test_in_memory_encoded_images_run_through_the_same_pipeline():
    images = np.empty(6, dtype=object)
    images[:] = [_gradient_jpeg(40 + i, 50) for i in range(6)]
    source = data.ArraySource({"image": images, "label": np.arange(6)})
    transform = functools.partial(data.imagenet_train_transform, image_size=16)
    it = data.make_train_iterator(source, global_batch_size=3, seed=0, transform=transform, num_threads=2)
    batch = next(it)
    assert batch["image"].shape == (3, 16, 16, 3) and batch["image"].dtype == np.float32
    np.testing.assert_array_equal(batch["label"], batch["id"])
