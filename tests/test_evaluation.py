"""Unit tests of convnets.erf, convnets.comparison and convnets.plots on tiny hand-built models."""

import os
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras
import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from convnets import plots
from convnets.architecture import analyze, resolve_stack
from convnets.comparison import pareto_front, summary_figures
from convnets.erf import effective_receptive_field, erf_square, theoretical_rf_box
from convnets.model import build_model

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def is_png(path, min_bytes=2000):
    data = Path(path).read_bytes()
    return data[:8] == PNG_SIGNATURE and len(data) > min_bytes


def conv_model(size=16, kernel=3, dilation=1, layers=1, init="glorot_uniform"):
    """A linear conv stack with `head_pool` naming like convnets.model's."""
    inputs = keras.Input((size, size, 1))
    x = inputs
    for i in range(layers):
        x = keras.layers.Conv2D(
            4,
            kernel,
            padding="same",
            dilation_rate=dilation,
            kernel_initializer=init,
            name=f"block{i + 1}_conv",
        )(x)
    x = keras.layers.GlobalAveragePooling2D(name="head_pool")(x)
    return keras.Model(inputs, keras.layers.Dense(3, name="classifier")(x))


IMAGES = np.random.default_rng(0).normal(size=(8, 16, 16, 1)).astype("float32")


# ---------------------------------------------------------------- ERF


def test_erf_one_3x3_layer_constant_kernel_is_exactly_3():
    erf = effective_receptive_field(conv_model(init="ones"), IMAGES)
    assert erf.side == 3
    assert erf.unit == (8, 8)
    assert erf.box == (7, 7, 3)  # centred on the centre unit (8, 8)
    nonzero = np.argwhere(erf.grad_map > 0)
    assert nonzero.min(0).tolist() == [7, 7] and nonzero.max(0).tolist() == [9, 9]


def test_erf_dilation_2_constant_kernel_is_exactly_5():
    erf = effective_receptive_field(conv_model(dilation=2, init="ones"), IMAGES)
    assert erf.side == 5
    assert erf.box == (6, 6, 5)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_erf_of_a_one_layer_3x3_stack_is_at_most_3_and_grows_with_dilation(seed):
    """The real model builder (conv, batch norm, relu) with random weights."""
    sides = {}
    for dilation in (1, 2, 4):
        keras.utils.set_random_seed(seed)
        cfg = {"name": "one", "layers": [{"filters": 8, "dilation": dilation}]}
        model = build_model(resolve_stack(cfg), (16, 16, 1), 10)
        sides[dilation] = effective_receptive_field(model, IMAGES).side
    assert 1 <= sides[1] <= 3
    assert sides[1] < sides[2] < sides[4]
    assert sides[4] <= 9 + 2  # dilation 4: effective kernel 9 (+ centroid rounding)


def test_erf_grows_with_depth():
    one = effective_receptive_field(conv_model(layers=1, init="ones"), IMAGES).side
    three = effective_receptive_field(conv_model(layers=3, init="ones"), IMAGES).side
    assert one == 3 and 3 < three <= 7  # theoretical RF of 3 layers: 7


def test_erf_accepts_a_dataset_and_caps_the_images():
    import tensorflow as tf

    ds = tf.data.Dataset.from_tensor_slices((IMAGES, np.zeros(8, "int32"))).batch(3)
    model = conv_model(init="ones")
    from_ds = effective_receptive_field(model, ds, max_images=5)
    direct = effective_receptive_field(model, IMAGES[:5])
    np.testing.assert_allclose(from_ds.grad_map, direct.grad_map, rtol=1e-6)


def test_erf_square_definition():
    grad = np.zeros((8, 8))
    grad[4, 4] = 1.0
    assert erf_square(grad) == (1, (4, 4, 1))
    grad[3:5, 3:5] = 1.0  # a 2x2 blob: centroid (3.5, 3.5)
    assert erf_square(grad) == (2, (3, 3, 2))
    # 94% in one pixel is not 95%: the square must grow to take in its neighbour.
    grad = np.zeros((8, 8))
    grad[2, 2], grad[2, 3] = 0.94, 0.06
    side, _ = erf_square(grad)
    assert side == 2
    assert erf_square(np.zeros((4, 4)))[0] == 0
    # Mass spread over the whole map: the whole map, never more.
    assert erf_square(np.ones((6, 6)))[0] == 6


def test_theoretical_rf_box_matches_the_centre_unit():
    stack = resolve_stack({"name": "s", "layers": [{"filters": 4}, {"filters": 4, "pool": "max"}]})
    analysis = analyze(stack, (8, 8, 1), 10)
    # Last map 4x4, centre unit 2: pool jump 2, start 0.5 -> centre pixel 4.5; RF 5 + 1 = 6.
    assert theoretical_rf_box(analysis) == (4.5, 4.5, 6, 6)


# ---------------------------------------------------------------- Pareto front


def test_pareto_front_small_example():
    xs = [10, 20, 30, 40, 5, 20]
    ys = [0.5, 0.7, 0.6, 0.9, 0.4, 0.7]
    assert pareto_front(xs, ys) == [4, 0, 1, 5, 3]  # 30/0.6 is beaten by 20/0.7
    assert pareto_front([], []) == []
    assert pareto_front([1.0, float("nan")], [0.5, 0.9]) == [0]


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 6), st.integers(0, 6)),
        min_size=1,
        max_size=12,
    )
)
def test_pareto_front_is_exactly_the_non_dominated_points(points):
    xs, ys = zip(*points, strict=True)
    front = pareto_front(xs, ys)

    def dominated(i):
        return any(
            xs[j] <= xs[i] and ys[j] >= ys[i] and (xs[j], ys[j]) != (xs[i], ys[i])
            for j in range(len(xs))
        )

    assert set(front) == {i for i in range(len(xs)) if not dominated(i)}
    assert [xs[i] for i in front] == sorted(xs[i] for i in front)


# ---------------------------------------------------------------- figures


def test_figures_are_valid_pngs(tmp_path):
    rng = np.random.default_rng(0)
    figs = {
        "curves": plots.training_curves(
            {
                "loss": [1.0, 0.5, 0.3],
                "accuracy": [0.5, 0.8, 0.9],
                "val_loss": [0.9, 0.6, 0.5],
                "val_accuracy": [0.6, 0.7, 0.8],
                "lr": [1e-3] * 3,
            }
        ),
        "confusion": plots.confusion_matrix(rng.integers(0, 20, (10, 10)), list("0123456789")),
        "misclassified": plots.misclassified_grid(
            rng.random((7, 8, 8, 1)), [1] * 7, [2] * 7, ["a", "b", "c"], confidence=[0.5] * 7
        ),
        "no_misclassified": plots.misclassified_grid(np.zeros((0, 8, 8, 1)), [], [], ["a"]),
        "filters": plots.filters(rng.normal(size=(3, 3, 1, 12))),
        "filters_rgb": plots.filters(rng.normal(size=(5, 5, 3, 6))),
        "feature_maps": plots.feature_maps(
            rng.random((8, 8, 1)),
            [("block1_act", rng.random((8, 8, 4))), ("block2_pool", rng.random((4, 4, 16)))],
        ),
        "erf": plots.erf_map(rng.random((16, 16)), erf_box=(5, 5, 6), rf_box=(8.0, 8.0, 7, 7)),
    }
    for name, fig in figs.items():
        path = plots.save(fig, tmp_path / f"{name}.png")
        assert is_png(path), name


def test_summary_figures_mark_the_front(tmp_path):
    runs = pd.DataFrame(
        {
            "run_name": ["a", "b", "c", "d"],
            "status": ["FINISHED", "FINISHED", "FAILED", "FINISHED"],
            "test_accuracy": [0.9, 0.95, np.nan, 0.8],
            "param_count": [1e3, 1e5, 1e4, 5e4],
            "receptive_field": [5, 11, 7, 9],
            "effective_receptive_field": [3, 6, np.nan, 5],
        }
    )
    paths = summary_figures(runs, tmp_path)
    assert set(paths) == {
        "accuracy_vs_params",
        "accuracy_vs_receptive_field",
        "accuracy_vs_effective_receptive_field",
    }
    assert all(is_png(p, 10_000) for p in paths.values())


def test_sweep_labels_keep_only_the_design_choices_that_differ():
    from convnets.comparison import _point_labels, runs_table

    runs = pd.DataFrame(  # mlflow.search_runs output of a sweep's jobs, as summarize reads it
        {
            "run_id": ["a", "b"],
            "params.model.layer_defaults.kernel_size": ["3", "5"],
            "params.model.width": ["1", "1"],
            "params.trainer.verbose": ["0", "0"],
            "params.tracking.uri": ["sqlite:///tmp/mlflow.db"] * 2,
            "params.tracking.experiment": ["a", "b"],
            "metrics.test_accuracy": [0.9, 0.8],
        }
    )
    assert _point_labels(runs_table(runs)) == ["kernel_size=3", "kernel_size=5"]


def test_the_params_that_differ_come_in_one_order_whatever_order_mlflow_gives():
    """mlflow.search_runs orders params by a set of names: by the hash seed; a group label
    copied from one run of evaluate.py is the baseline= of the next."""
    from convnets.comparison import runs_table

    runs = pd.DataFrame(
        {
            "run_id": ["a", "b"],
            "params.trainer.seed": ["1", "2"],
            "params.model.width": ["1", "2"],
            "params.dataset.name": ["digits", "mnist"],
            "metrics.test_accuracy": [0.9, 0.8],
        }
    )
    shuffled = runs[["run_id", "params.model.width", "metrics.test_accuracy",
                     "params.trainer.seed", "params.dataset.name"]]  # fmt: skip
    expected = ["dataset.name", "model.width", "trainer.seed"]
    assert runs_table(runs).attrs["params"] == runs_table(shuffled).attrs["params"] == expected


def test_runs_recorded_before_selected_val_accuracy_get_it_from_their_record():
    """The validation accuracy of the epoch each run tested: its own metric, else (a run
    recorded before it existed) its best epoch's when it restored that one, else its last
    epoch's; none for a run that tested nothing (pruned) or had no validation data."""
    from convnets.comparison import runs_table

    nan = float("nan")
    runs = pd.DataFrame(
        {
            "run_id": ["new", "old_restored", "old_last", "pruned", "no_val"],
            "params.trainer.restore_best": ["True", "True", "False", "True", "True"],
            "metrics.selected_val_accuracy": [0.7, nan, nan, nan, nan],
            "metrics.best_val_accuracy": [0.7, 0.8, 0.9, nan, nan],
            "metrics.val_accuracy": [0.6, 0.75, 0.85, 0.5, nan],
            "metrics.test_accuracy": [0.5, 0.5, 0.5, nan, 0.5],
        }
    )
    table = runs_table(runs).set_index("run_id")
    assert table["selected_val_accuracy"].to_dict() == pytest.approx(
        {"new": 0.7, "old_restored": 0.8, "old_last": 0.85, "pruned": nan, "no_val": nan},
        nan_ok=True,
    )
    assert "best_val_accuracy" not in table and "val_accuracy" not in table


def test_summary_figures_stay_readable_with_many_keys_and_long_floats(tmp_path):
    """A search over the learning rate and three other keys: points labelled by trial
    number, the axes of normal size, no layout warning."""
    import warnings

    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from convnets.comparison import _point_labels, runs_table

    rng = np.random.default_rng(0)
    n = 8
    runs = pd.DataFrame(
        {
            "run_id": [f"r{i}" for i in range(n)],
            "tags.mlflow.runName": [f"t{i:02d} lr=1.2e-3 k=3 w=1" for i in range(n)],
            "params.optimizer.lr": [str(v) for v in rng.uniform(1e-4, 1e-2, n)],
            "params.model.layer_defaults.dropout": [str(v) for v in rng.uniform(0, 0.5, n)],
            "params.model.layer_defaults.kernel_size": [str(3 + 2 * (i % 2)) for i in range(n)],
            "params.model.width": [str(0.5 * (1 + i % 3)) for i in range(n)],
            "metrics.test_accuracy": rng.uniform(0.8, 0.99, n),
            "metrics.param_count": rng.uniform(1e3, 1e5, n),
            "metrics.receptive_field": rng.integers(5, 30, n).astype(float),
        }
    )
    table = runs_table(runs)
    assert _point_labels(table) == [name.split()[0] for name in table["name"]]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a layout warning fails the test
        paths = summary_figures(table, tmp_path)
        x = table["param_count"].to_numpy(float)
        acc = table["test_accuracy"].to_numpy(float)
        long_labels = [f"lr={v}, dropout={v}, k=3, w=1" for v in runs["params.optimizer.lr"]]
        fig = plots.pareto_scatter(
            x,
            acc,
            pareto_front(x, acc),
            xlabel="parameters",
            title="t",
            labels=long_labels,
            color=table["receptive_field"],
            color_label="receptive field",
        )
        FigureCanvasAgg(fig)
        fig.savefig(tmp_path / "long.png")
    box = fig.axes[0].get_position()
    assert box.width > 0.7 and box.height > 0.7  # long labels do not shrink the axes
    assert all(is_png(p, 10_000) for p in paths.values())


@pytest.mark.parametrize("log_x", [False, True])
def test_runs_that_share_one_value_get_an_axis_of_whole_steps_around_it(log_x):
    """Every run with a receptive field of 6 px: the axis spans 5..7 (3..12 on a log axis),
    not a sliver around 6 ticked in fractions of a pixel."""
    fig = plots.pareto_scatter(
        [6, 6, 6], [0.9, 0.95, 0.97], [2], xlabel="receptive field", title="t", log_x=log_x
    )
    ax = fig.axes[0]
    assert ax.get_xlim() == ((3.0, 12.0) if log_x else (5.0, 7.0))
    if not log_x:
        ticks = [t for t in ax.get_xticks() if 5 <= t <= 7]
        assert ticks == [5, 6, 7]


def test_runs_of_several_sweeps_are_labelled_by_run_id_not_by_a_shared_job_number():
    """Two sweeps compared together both have a j00 and a j01: their points are labelled by
    the start of the run id (in runs.csv and MLflow's UI), not by numbers that repeat."""
    from convnets.comparison import _point_labels

    long = "0.0012345678901234"
    table = pd.DataFrame(
        {
            "run_id": ["83ea41" + "0" * 26, "71f4a5" + "0" * 26, "aa0000" + "1" * 26],
            "name": ["j00 lr=1.2e-3", "j01 lr=1.2e-3", "j00 lr=1.2e-3"],
            "optimizer.lr": [long, long + "1", long + "2"],
            "model.layer_defaults.dropout": ["0.123456789"] * 3,
        }
    )
    table.attrs["params"] = ["optimizer.lr", "model.layer_defaults.dropout"]
    assert _point_labels(table) == ["83ea41", "71f4a5", "aa0000"]
    table["name"] = ["j00 lr=1.2e-3", "j01 lr=1.2e-3", "j02 lr=1.2e-3"]  # one sweep: its numbers
    assert _point_labels(table) == ["j00", "j01", "j02"]


def _label_boxes(fig):
    """The display-space boxes of a figure's annotations (drawn first)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    renderer = canvas.get_renderer()
    return [t.get_window_extent(renderer) for t in fig.axes[0].texts]


def test_groups_of_one_size_are_drawn_side_by_side_with_their_labels_apart():
    """Six dropout values: one parameter count. Their error bars sat on one x and their
    labels on one another."""
    fig = plots.group_means(
        [1000.0] * 6, [0.95, 0.951, 0.949, 0.95, 0.952, 0.948], [0.94] * 6, [0.96] * 6,
        [3] * 6, [0], xlabel="parameters", title="t", log_x=True,
    )  # fmt: skip
    drawn = fig.axes[0].lines[0].get_xdata()  # the error bars' markers
    assert len(set(np.round(drawn, 9))) == 6
    assert fig.axes[0].get_xlabel() == "parameters; groups of one size drawn side by side"
    boxes = _label_boxes(fig)
    assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1 :])


def test_front_labels_stay_inside_the_figure_and_shared_points_share_one():
    x, acc = np.array([1e3, 1e4, 1e5, 1e5]), np.array([0.5, 0.6, 0.99, 0.99])
    labels = ["a", "b", "dropout=0.0, trainer.seed=0", "dropout=0.0, trainer.seed=1"]
    fig = plots.pareto_scatter(
        x, acc, pareto_front(x, acc), xlabel="p", title="t", log_x=True, labels=labels,
        color=[5, 5, 5, 5], color_label="receptive field",
    )  # fmt: skip
    assert len(fig.axes) == 1  # one receptive field: no colour bar to read
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert sum("trainer.seed" in t for t in texts) == 1  # the two runs on one point: one label
    width = fig.get_figwidth() * fig.dpi
    assert all(box.x0 >= 0 and box.x1 <= width for box in _label_boxes(fig))


def test_an_erf_every_run_saturated_and_runs_without_sizes_draw_nothing_empty(tmp_path):
    from convnets.comparison import seed_groups

    runs = pd.DataFrame(
        {
            "test_accuracy": [0.9, 0.95, 0.8],
            "param_count": [1e3, 1e5, 5e4],
            "receptive_field": [5, 11, 9],
            "effective_receptive_field": [8, 8, 8],
            "erf_saturated": [True, True, True],
        }
    )
    assert set(summary_figures(runs, tmp_path)) == {
        "accuracy_vs_params",
        "accuracy_vs_receptive_field",
    }
    table = pd.DataFrame({"run_id": ["a", "b"], "test_accuracy": [0.9, 0.8], "param_count": np.nan})
    table.attrs["params"] = []
    groups, _, figure = seed_groups(table, tmp_path)
    assert len(groups) == 1 and figure is None
