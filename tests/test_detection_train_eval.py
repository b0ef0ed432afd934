"""kdjax.detection.train's evaluation: the jitted eval step (forward + post-processing) on 8 devices
equals one device, and detection_map's COCO mAP (an oracle scores 1; eval padding rows are left out)."""
import jax
import numpy as np
import pytest

from kdjax import sharding
from kdjax.detection import model as M
from kdjax.detection import train as DT
from test_detection_train import K, STUDENT, TX, batch_of


def test_eval_step_sharded_and_map():
    single = sharding.make_mesh(devices=jax.devices()[:1])
    state, _ = DT.init_detection_state(STUDENT, TX, seed=0, mesh=single)
    variables = {"params": jax.device_get(state.params["detector"])}
    batch = batch_of()
    detections = []
    for mesh in (single, sharding.make_mesh(data=-1, fsdp=1)):
        step = DT.make_detection_eval_step(STUDENT, mesh=mesh, max_detections=10)
        detections.append(jax.device_get(step(variables, sharding.global_batch({"image": batch["image"]},
                                                                                mesh)["image"])))
    one, eight = detections
    assert one.boxes.shape == (8, 10, 4) and one.classes.shape == (8, 10)
    np.testing.assert_array_equal(one.valid, eight.valid)
    np.testing.assert_allclose(eight.scores, one.scores, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(eight.boxes, one.boxes, rtol=1e-4, atol=1e-3)
    result = DT.detection_map(step, variables, [batch], K, mesh)  # an untrained student: a valid, low mAP
    assert 0.0 <= result["map50"] <= 1.0

    # an oracle eval step that returns the ground truth scores mAP 1; padding rows (mask False) are left out
    def oracle(variables, images):
        wrong = np.arange(8) >= 6  # the padding rows' "detections" are all wrong
        return M.Detections(np.where(wrong[:, None, None], 0.0, batch["boxes"]), batch["valid"].astype(np.float32),
                            batch["labels"], batch["valid"])

    padded = {**batch, "mask": np.arange(8) < 6}
    assert DT.detection_map(oracle, None, [padded], K, mesh)["map"] == pytest.approx(1.0)
    assert DT.detection_map(oracle, None, [batch], K, mesh)["map"] < 1.0
