"""kdjax.detection.anchors against hand-computed anchors."""

import numpy as np
import pytest

from kdjax.detection import anchors as A


def test_cell_anchors_by_hand():
    # size 4: ratio 1 -> 4 x 4; ratio 4 (h / w) -> w = sqrt(16 / 4) = 2, h = 8.
    # size 8, ratio 0.25 -> w = sqrt(64 / 0.25) = 16, h = 4.
    got = A.cell_anchors([4, 8], [1.0, 4.0, 0.25])
    want = [[-2, -2, 2, 2], [-1, -4, 1, 4], [-4, -1, 4, 1],
            [-4, -4, 4, 4], [-2, -8, 2, 8], [-8, -2, 8, 2]]
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert got.dtype == np.float32


def test_grid_anchors_by_hand():
    # 2 x 3 cells at stride 10, one size 4, ratios (1, 4), offset 0.5: centres at 5, 15, 25 (x) and 5, 15 (y).
    got = A.grid_anchors((2, 3), stride=10, sizes=[4], aspect_ratios=[1.0, 4.0], offset=0.5)
    assert got.shape == (2, 3, 2, 4)
    np.testing.assert_allclose(got[0, 0], [[3, 3, 7, 7], [4, 1, 6, 9]])
    np.testing.assert_allclose(got[1, 2], [[23, 13, 27, 17], [24, 11, 26, 19]])
    np.testing.assert_allclose(got[0, 1, 0], [13, 3, 17, 7])   # column 1 -> x centre 15
    # The flat order is (row, column, anchor), as an RPN output [H, W, A * 4] reshaped.
    flat = got.reshape(-1, 4)
    np.testing.assert_allclose(flat[2 * 1 + 1], [14, 1, 16, 9])   # cell (0, 1), anchor 1
    np.testing.assert_allclose(flat[2 * (3 * 1 + 0)], [3, 13, 7, 17])  # cell (1, 0), anchor 0
    # offset 0: centred on the top-left corner of each cell.
    np.testing.assert_allclose(A.grid_anchors((1, 1), 16, [32], [1.0])[0, 0, 0], [-16, -16, 16, 16])


def test_areas_and_ratios_of_faster_rcnn_anchors():
    got = A.grid_anchors((3, 4), 16, [128, 256, 512], [0.5, 1.0, 2.0]).reshape(-1, 9, 4)
    w, h = got[..., 2] - got[..., 0], got[..., 3] - got[..., 1]
    np.testing.assert_allclose(np.sqrt(w * h)[0], [128] * 3 + [256] * 3 + [512] * 3, rtol=1e-5)
    np.testing.assert_allclose((h / w)[0], [0.5, 1, 2] * 3, rtol=1e-5)


def test_multilevel_concatenates_levels():
    got = A.multilevel_anchors([(4, 4), (2, 2)], [8, 16], [[16], [32]], [0.5, 1.0, 2.0])
    assert got.shape == (4 * 4 * 3 + 2 * 2 * 3, 4)
    np.testing.assert_allclose(got[48:], A.grid_anchors((2, 2), 16, [32], [0.5, 1, 2]).reshape(-1, 4))


def test_errors():
    with pytest.raises(ValueError, match="sizes"):
        A.cell_anchors([], [1.0])
    with pytest.raises(ValueError, match="aspect_ratios"):
        A.cell_anchors([8], [0.0])
    with pytest.raises(ValueError, match="feature_size"):
        A.grid_anchors((0, 3), 8, [8], [1.0])
    with pytest.raises(ValueError, match="offset"):
        A.grid_anchors((2, 3), 8, [8], [1.0], offset=1.0)
    with pytest.raises(ValueError, match="one stride"):
        A.multilevel_anchors([(2, 2)], [8, 16], [[8]], [1.0])
