"""The loss_plot IMAGE: tick values and the data-to-pixel mapping by hand, then the drawn pixels: the learning-rate
line on its own axis, save markers, validation dots, the smoothed line, at the places the mapping puts them."""
from __future__ import annotations

import numpy as np
import pytest

from trainer_core.report.plot import (COLOURS, PAD_BOTTOM, PAD_LEFT, PAD_RIGHT, PAD_TOP, frame_for, loss_plot,
                               moving_average, nice_ticks, smoothing_window)

W, H = 640, 320


def test_moving_average_by_hand():
    assert moving_average([4, 2, 6, 0], 2) == [4, 3, 4, 3]
    assert moving_average([1, 2, 3], 1) == [1, 2, 3]
    assert [smoothing_window(n) for n in (2, 4, 12, 60, 200, 1000)] == [1, 1, 3, 3, 10, 50]


@pytest.mark.parametrize("lo, hi, count, ticks", [
    (0, 1, 5, [0, 0.2, 0.4, 0.6, 0.8, 1.0]),   # span 1 / 5 = 0.2
    (1, 100, 5, [20, 40, 60, 80, 100]),          # 99 / 5 = 19.8 -> 20
    (1, 12, 6, [2, 4, 6, 8, 10, 12]),            # 11 / 6 = 1.8 -> 2
    (0, 1e-4, 4, [0, 5e-5, 1e-4]),               # 2.5e-5 -> 5e-5
    (0.13, 0.47, 5, [0.2, 0.3, 0.4]),           # 0.068 -> 0.1, first multiple above 0.13
])
def test_nice_ticks_by_hand(lo, hi, count, ticks):
    assert nice_ticks(lo, hi, count) == pytest.approx(ticks)


def test_frame_maps_steps_loss_and_lr_by_hand():
    f = frame_for([2.0, 1.0, 1.5, 0.0, 1.0], W, H, validation=[(3, 3.0)], lrs=[(1, 0.0), (5, 2e-4)])
    left, top, right, bottom = PAD_LEFT, PAD_TOP, W - PAD_RIGHT, H - PAD_BOTTOM
    assert f.box == (left, top, right, bottom)
    assert f.x(1) == left and f.x(5) == right and f.x(3) == round((left + right) / 2)
    # loss range 0..3 (validation included) widened by 4 % each side: -0.12..3.12
    assert f.loss == pytest.approx((-0.12, 3.12))
    assert f.y_loss(1.5) == round((top + bottom) / 2)
    # lr axis from 0 to 1.08 x the largest rate
    assert f.y_lr(0) == bottom and f.y_lr(2.16e-4) == top and f.y_lr(1.08e-4) == round((top + bottom) / 2)


def colour_rows(im, x: int, colour) -> np.ndarray:
    """The rows of column x holding exactly ``colour``."""
    return np.nonzero((np.asarray(im)[:, x] == np.array(colour, dtype=np.uint8)).all(-1))[0]


def run_200():
    rng = np.random.default_rng(0)
    losses = [float(1 / (1 + i / 30) + 0.2 * rng.random()) for i in range(200)]
    lrs = [(s, 1e-4 * min(1.0, s / 40)) for s in range(1, 201)]  # warmup to step 40, then constant
    validation = [(60, 0.55), (120, 0.45), (180, 0.40)]
    return losses, lrs, validation, [50, 100, 150]


def test_learning_rate_line_sits_on_its_own_axis():
    losses, lrs, validation, saves = run_200()
    im = loss_plot(losses, W, H, validation=validation, lrs=lrs, saves=saves)
    f = frame_for(losses, W, H, validation, lrs)
    for step in (10, 20, 30, 70, 130, 190):
        lr = dict(lrs)[step]
        rows = colour_rows(im, f.x(step), COLOURS["lr"])  # the line passes through each (step, lr) vertex
        assert f.y_lr(lr) in rows and np.ptp(rows) <= 8, (step, rows, f.y_lr(lr))
    # constant 1e-4 after warmup: one row, 1/1.08 of the plot height up from the bottom
    rows = colour_rows(im, f.x(130), COLOURS["lr"])
    assert abs(rows.mean() - (f.box[3] - (f.box[3] - f.box[1]) / 1.08)) <= 1.5


def test_no_learning_rates_no_lr_line():
    losses, _, validation, saves = run_200()
    im = loss_plot(losses, W, H, validation=validation, saves=saves)
    f = frame_for(losses, W, H, validation)
    plot_area = np.asarray(im)[f.box[1] + 1:f.box[3], f.box[0] + 1:f.box[2]]
    assert not (plot_area == np.array(COLOURS["lr"], dtype=np.uint8)).all(-1).any()


def test_save_markers_at_the_save_steps_only():
    losses, lrs, validation, saves = run_200()
    im = loss_plot(losses, W, H, validation=validation, lrs=lrs, saves=saves)
    f = frame_for(losses, W, H, validation, lrs)
    a = np.asarray(im)
    left, top, right, bottom = f.box
    is_save = (a == np.array(COLOURS["save"], dtype=np.uint8)).all(-1)
    marker_row = is_save[top - 5, left:right + 1]  # the triangles above the frame
    marked = np.nonzero(marker_row)[0] + left
    for s in saves:  # each triangle is centred on its step
        near = marked[np.abs(marked - f.x(s)) <= 5]
        assert len(near) and abs(near.mean() - f.x(s)) <= 1, (s, marked)
    assert all(min(abs(m - f.x(s)) for s in saves) <= 5 for m in marked)
    # the dashed line runs through the plot at that step
    assert is_save[top:bottom, f.x(100)].sum() > (bottom - top) / 4
    assert is_save[top:bottom, f.x(75)].sum() == 0


def test_validation_points_and_smoothed_line_where_the_mapping_puts_them():
    losses, lrs, validation, saves = run_200()
    im = loss_plot(losses, W, H, validation=validation, lrs=lrs, saves=saves)
    f = frame_for(losses, W, H, validation, lrs)
    a = np.asarray(im)
    for step, v in validation:
        x, y = f.x(step), f.y_loss(v)
        assert (a[y - 2:y + 3, x - 2:x + 3] == np.array(COLOURS["val"], dtype=np.uint8)).all(-1).all(), step
    avg = moving_average(losses, 10)  # 200 steps: window 200 // 20
    for step in (30, 90, 170):
        rows = colour_rows(im, f.x(step), COLOURS["smooth"])
        assert f.y_loss(avg[step - 1]) in rows, (step, rows)


def test_step_axis_ticks_below_the_frame():
    losses, lrs, validation, saves = run_200()
    im = loss_plot(losses, W, H, validation=validation, lrs=lrs, saves=saves)
    f = frame_for(losses, W, H, validation, lrs)
    a = np.asarray(im)
    bottom = f.box[3]
    tick_row = (a[bottom + 2] == np.array(COLOURS["frame"], dtype=np.uint8)).all(-1)
    ticks = sorted(np.nonzero(tick_row)[0])
    assert ticks == [f.x(t) for t in (50, 100, 150, 200)]


def test_empty_and_single_step_runs_draw():
    assert loss_plot([]).size == (W, H)
    im = loss_plot([0.5], lrs=[(1, 1e-4)], validation=[(1, 0.4)])
    assert (np.asarray(im) == np.array(COLOURS["val"], dtype=np.uint8)).all(-1).any()
