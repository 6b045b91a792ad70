"""Figures: training curves, confusion matrix, filters, feature maps, ERF, Pareto scatter.

Every function takes plain numpy data and returns a :class:`matplotlib.figure.Figure`;
nothing here reads a model or MLflow. Figures are built with the object API (``Figure``,
not ``pyplot``): no global state, no GUI backend, so they are safe in sweeps and tests and
render with Agg. :func:`save` writes a PNG and releases the figure.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib import colors
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from matplotlib.ticker import MaxNLocator

DPI = 110


def save(fig: Figure, path: str | Path) -> Path:
    """Write ``fig`` as a PNG at ``path`` (parents created) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    return path


def _grid(n: int, max_cols: int) -> tuple[int, int]:
    cols = max(1, min(n, max_cols))
    return math.ceil(n / cols), cols


def _show_image(ax, image: np.ndarray, **kwargs) -> None:
    """An (H, W, C) image in [0, 1]: grey for one channel, RGB for three."""
    image = np.clip(np.asarray(image, dtype=float), 0.0, 1.0)
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    if image.ndim == 2:
        ax.imshow(image, cmap="gray", vmin=0.0, vmax=1.0, **kwargs)
    else:
        ax.imshow(image[..., :3], **kwargs)
    ax.set_xticks([])
    ax.set_yticks([])


# ---------------------------------------------------------------- training


def training_curves(history: Mapping[str, Sequence[float]]) -> Figure:
    """Loss and accuracy per epoch, train against validation (Keras ``History.history``).

    Keys used: ``loss``, ``accuracy`` and, when present, ``val_loss``, ``val_accuracy``.
    Epochs are numbered from 1 on the x axis.
    """
    fig = Figure(figsize=(10, 4))
    # Placed by hand: every run draws this figure, and a layout engine doubles its cost
    # (0.25 s against 0.13 s on 2 CPU cores) for a layout that never changes.
    fig.subplots_adjust(left=0.06, right=0.985, bottom=0.12, top=0.83, wspace=0.22)
    axes = fig.subplots(1, 2)
    for ax, metric, label in zip(axes, ("loss", "accuracy"), ("loss", "accuracy"), strict=True):
        for key, name, style in ((metric, "train", "-o"), (f"val_{metric}", "validation", "-s")):
            values = history.get(key)
            if values is None or len(values) == 0:
                continue
            epochs = np.arange(1, len(values) + 1)
            ax.plot(epochs, values, style, markersize=3, label=name)
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.set_title(f"{label} per epoch")
        ax.grid(alpha=0.3)
        ax.legend()
        ax.xaxis.get_major_locator().set_params(integer=True)
    fig.suptitle("Training curves")
    return fig


# ---------------------------------------------------------------- evaluation


def confusion_matrix(matrix: np.ndarray, class_names: Sequence[str], *, title: str = "") -> Figure:
    """Counts with true class on rows and predicted class on columns; cells annotated.

    Colour is the fraction of the row (per-class recall), so rare classes stay visible.
    """
    matrix = np.asarray(matrix)
    n = len(class_names)
    rows = matrix.sum(axis=1, keepdims=True)
    frac = np.divide(matrix, rows, out=np.zeros(matrix.shape, dtype=float), where=rows > 0)
    side = min(max(4.5, 0.45 * n + 2.5), 20)
    fig = Figure(figsize=(side + 1, side), layout="constrained")
    ax = fig.subplots()
    im = ax.imshow(frac, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(im, ax=ax, label="fraction of the true class", shrink=0.8)
    ticks = np.arange(n)
    ax.set_xticks(ticks, labels=class_names, rotation=90 if n > 10 else 0)
    ax.set_yticks(ticks, labels=class_names)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title or "Confusion matrix (test set)")
    if n <= 30:  # beyond that the numbers are unreadable; the colours still tell
        for i in range(n):
            for j in range(n):
                if matrix[i, j]:
                    ax.text(
                        j,
                        i,
                        str(int(matrix[i, j])),
                        ha="center",
                        va="center",
                        fontsize=8 if n <= 12 else 6,
                        color="white" if frac[i, j] > 0.5 else "black",
                    )
    return fig


def misclassified_grid(
    images: np.ndarray,
    true: Sequence[int],
    pred: Sequence[int],
    class_names: Sequence[str],
    *,
    confidence: Sequence[float] | None = None,
    total: int | None = None,
    max_cols: int = 6,
) -> Figure:
    """Misclassified test images (in [0, 1]) titled ``true -> predicted (p)``.

    ``confidence``: the predicted class's probability; ``total``: how many test images were
    misclassified in all (the grid may show the first few only).
    """
    n = len(images)
    total = n if total is None else total
    if n == 0:
        fig = Figure(figsize=(5, 2), layout="constrained")
        ax = fig.subplots()
        ax.axis("off")
        ax.text(0.5, 0.5, "no misclassified test images", ha="center", va="center")
        fig.suptitle("Misclassified test images")
        return fig
    nrows, ncols = _grid(n, max_cols)
    fig = Figure(figsize=(1.8 * ncols, 2.0 * nrows + 0.4), layout="constrained")
    axes = np.atleast_1d(fig.subplots(nrows, ncols)).ravel()
    for k, ax in enumerate(axes):
        if k >= n:
            ax.axis("off")
            continue
        _show_image(ax, images[k], interpolation="nearest")
        text = f"{class_names[true[k]]} → {class_names[pred[k]]}"
        if confidence is not None:
            text += f" ({confidence[k]:.2f})"
        ax.set_title(text, fontsize=8, color="firebrick")
    shown = f"all {n}" if n == total else f"first {n} of {total}"
    fig.suptitle(f"Misclassified test images: true → predicted (probability), {shown}")
    return fig


def filters(kernel: np.ndarray, *, title: str = "", max_filters: int = 64) -> Figure:
    """First-layer Conv2D kernels, one panel per output filter.

    ``kernel`` is Keras's (kh, kw, in_channels, filters). A three-channel kernel is shown in
    colour (each filter scaled to [0, 1] on its own); otherwise the input channels are
    averaged and drawn on one diverging scale, shared by all panels, so signs compare.
    """
    kernel = np.asarray(kernel, dtype=float)
    count = min(kernel.shape[-1], max_filters)
    nrows, ncols = _grid(count, 8)
    fig = Figure(figsize=(1.3 * ncols + 1.2, 1.3 * nrows + 0.6), layout="constrained")
    axes = np.atleast_1d(fig.subplots(nrows, ncols)).ravel()
    rgb = kernel.shape[2] == 3
    grey = kernel.mean(axis=2)
    limit = float(np.abs(grey[..., :count]).max()) or 1.0
    im = None
    for k, ax in enumerate(axes):
        ax.set_xticks([])
        ax.set_yticks([])
        if k >= count:
            ax.axis("off")
            continue
        if rgb:
            f = kernel[..., k]
            span = f.max() - f.min()
            ax.imshow(
                (f - f.min()) / span if span > 0 else np.zeros_like(f), interpolation="nearest"
            )
        else:
            im = ax.imshow(
                grey[..., k], cmap="RdBu_r", vmin=-limit, vmax=limit, interpolation="nearest"
            )
        ax.set_title(str(k), fontsize=7)
    if im is not None:
        label = "weight" if kernel.shape[2] == 1 else "weight (mean over input channels)"
        fig.colorbar(im, ax=axes.tolist(), label=label, shrink=0.8)
    kh, kw, cin, cout = kernel.shape
    shown = f", first {count}" if count < cout else ""
    fig.suptitle(title or f"First-layer filters ({kh}x{kw}, {cin} in, {cout} out{shown})")
    return fig


def feature_maps(
    image: np.ndarray,
    maps: Sequence[tuple[str, np.ndarray]],
    *,
    max_channels: int = 8,
    title: str = "",
) -> Figure:
    """One test image and, per row, the first channels of each layer's (h, w, c) output.

    Each panel has its own colour scale (min to max of that channel): the point is where a
    filter responds, and layers differ in range by orders of magnitude.
    """
    nrows = len(maps) + 1
    ncols = max(
        1, min(max_channels, max((m.shape[-1] for _, m in maps), default=1))
    )  # columns = channels shown
    fig = Figure(figsize=(1.4 * ncols + 1.6, 1.45 * nrows + 0.5), layout="constrained")
    axes = np.array(fig.subplots(nrows, ncols, squeeze=False))
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
        ax.axis("off")
    axes[0, 0].axis("on")
    _show_image(axes[0, 0], image, interpolation="nearest")
    axes[0, 0].set_ylabel("input", fontsize=8)
    for r, (name, fmap) in enumerate(maps, start=1):
        h, w, c = fmap.shape
        for k in range(min(c, ncols)):
            ax = axes[r, k]
            ax.axis("on")
            ax.imshow(fmap[..., k], cmap="viridis", interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if k == 0:
                ax.set_ylabel(f"{name}\n{h}x{w}x{c}", fontsize=7)
            if r == 1 or k == 0:
                ax.set_title(f"ch {k}", fontsize=7)
    fig.suptitle(
        title
        or f"Feature maps of one test image (first {ncols} channels per layer, "
        "each panel on its own colour scale)"
    )
    return fig


def erf_map(
    grad_map: np.ndarray,
    *,
    erf_box: tuple[int, int, int] | None = None,
    erf_mass: float = 0.95,
    rf_box: tuple[float, float, int, int] | None = None,
    title: str = "",
) -> Figure:
    """Effective receptive field: input-gradient magnitude with the squares drawn on it.

    ``erf_box`` = (top, left, side) of the measured square (pixel indices); ``rf_box`` =
    (centre_row, centre_col, height, width) of the theoretical receptive field, which may
    extend past the image (the part outside is what zero padding feeds).
    """
    grad = np.asarray(grad_map, dtype=float)
    peak = grad.max()
    norm = grad / peak if peak > 0 else grad
    h, w = grad.shape
    fig = Figure(figsize=(6.2, 5.2), layout="constrained")
    ax = fig.subplots()
    im = ax.imshow(norm, cmap="magma", vmin=0.0, vmax=1.0, interpolation="nearest")
    fig.colorbar(im, ax=ax, label="|∂ centre unit / ∂ input| (fraction of max)", shrink=0.85)
    handles = []
    if rf_box is not None:
        cy, cx, rh, rw = rf_box
        handles.append(
            ax.add_patch(
                Rectangle(
                    (cx - rw / 2, cy - rh / 2),
                    rw,
                    rh,
                    fill=False,
                    edgecolor="cyan",
                    linewidth=2,
                    label=f"theoretical RF {rh}x{rw}",
                )
            )
        )
    if erf_box is not None:
        top, left, side = erf_box
        handles.append(
            ax.add_patch(
                Rectangle(
                    (left - 0.5, top - 0.5),
                    side,
                    side,
                    fill=False,
                    edgecolor="lime",
                    linestyle="--",
                    linewidth=2,
                    label=f"ERF ({erf_mass:.0%} of gradient) {side}x{side}",
                )
            )
        )
    # Show the theoretical RF whole when it reaches past the image (its outside part sees
    # zero padding), up to one image size of margin on each side; the image is outlined.
    left, right, top, bottom = -0.5, w - 0.5, -0.5, h - 0.5
    if rf_box is not None:
        left = max(min(left, rf_box[1] - rf_box[3] / 2), -0.5 - w)
        right = min(max(right, rf_box[1] + rf_box[3] / 2), w - 0.5 + w)
        top = max(min(top, rf_box[0] - rf_box[2] / 2), -0.5 - h)
        bottom = min(max(bottom, rf_box[0] + rf_box[2] / 2), h - 0.5 + h)
    if (left, right, top, bottom) != (-0.5, w - 0.5, -0.5, h - 0.5):
        ax.set_facecolor("0.85")
        ax.add_patch(
            Rectangle((-0.5, -0.5), w, h, fill=False, edgecolor="white", lw=1, linestyle=":")
        )
        ax.text(left + 0.2, top + 0.2, "outside the image", va="top", fontsize=8, color="0.3")
    ax.set_xlim(left - 0.3, right + 0.3)
    ax.set_ylim(bottom + 0.3, top - 0.3)
    ax.set_xlabel("input column (pixel)")
    ax.set_ylabel("input row (pixel)")
    if handles:
        ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=1)
    ax.set_title(title or "Effective receptive field of the centre unit")
    return fig


# ---------------------------------------------------------------- comparison


def pareto_scatter(
    x: Sequence[float],
    y: Sequence[float],
    front: Sequence[int],
    *,
    xlabel: str,
    ylabel: str = "test accuracy",
    title: str,
    color: Sequence[float] | None = None,
    color_label: str = "",
    log_x: bool = False,
    labels: Sequence[str] | None = None,
) -> Figure:
    """Scatter of runs, the Pareto front (indices ``front``, sorted by x) joined as a step line.

    ``color`` (optional) colours the points on a log scale when it spans a factor above 10.
    ``labels`` name the front points.
    """
    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    fig = Figure(figsize=(7.5, 5), layout="constrained")
    ax = fig.subplots()
    finite = np.asarray(color if color is not None else [], dtype=float)
    finite = finite[np.isfinite(finite)]
    if len(finite) and finite.min() < finite.max():  # one value alone colours nothing
        c = np.asarray(color, dtype=float)
        lo, hi = float(finite.min()), float(finite.max())
        norm = colors.LogNorm(lo, hi) if lo > 0 and hi / lo > 10 else colors.Normalize(lo, hi)
        sc = ax.scatter(x, y, c=c, cmap="viridis", norm=norm, s=40, edgecolor="k", lw=0.4)
        fig.colorbar(sc, ax=ax, label=color_label)
    else:
        ax.scatter(x, y, s=40, color="tab:blue", edgecolor="k", lw=0.4, label="runs")
    front = list(front)
    if front:
        fx, fy = x[front], y[front]
        ax.plot(fx, fy, drawstyle="steps-post", color="crimson", lw=1.5, zorder=1)
        ax.scatter(
            fx,
            fy,
            s=140,
            facecolors="none",
            edgecolors="crimson",
            lw=1.5,
            label="Pareto front",
            zorder=3,
        )
        if labels is not None:
            position = _axis_fraction(x, log_x)
            at: dict[tuple[float, float], list[str]] = {}  # runs on one point share a label
            for i in front:
                at.setdefault((x[i], y[i]), []).append(labels[i])
            for (px, py), names in at.items():
                # Right of a point in the axes' left half, left of one in the right half, so
                # the label stays inside the axes.
                right_half = position(px) > 0.5
                note = ax.annotate(
                    ", ".join(names),
                    (px, py),
                    textcoords="offset points",
                    xytext=(-8 if right_half else 8, -12),
                    ha="right" if right_half else "left",
                    fontsize=7,
                    color="crimson",
                )
                # A long label must not make the layout shrink the axes to fit it.
                note.set_in_layout(False)
        ax.legend(loc="best")
    if log_x:
        ax.set_xscale("log")
    elif np.isfinite(x).any() and np.all(x[np.isfinite(x)] == np.round(x[np.isfinite(x)])):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # pixels: no 7.8 px ticks
    lo, hi = _axis_range(x, log_x)
    if lo == hi and np.isfinite(x).any():
        # Every run has the same value: matplotlib would span a sliver around it, ticked in
        # fractions of a pixel. One step either side (a factor of 2 on a log axis) instead.
        value = float(x[np.isfinite(x)][0])
        ax.set_xlim(*((value / 2, value * 2) if log_x else (value - 1, value + 1)))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    return fig


def _axis_range(x: np.ndarray, log_x: bool) -> tuple[float, float]:
    """The smallest and largest plottable value of ``x`` on the axis' scale (log10 on a log
    axis, where only positive values show); (0, 0) when there is none."""
    finite = x[np.isfinite(x) & ((x > 0) if log_x else True)]
    if not len(finite):
        return 0.0, 0.0
    lo, hi = float(finite.min()), float(finite.max())
    return (float(np.log10(lo)), float(np.log10(hi))) if log_x else (lo, hi)


def _axis_fraction(x: np.ndarray, log_x: bool):
    """Where a value sits between the smallest and largest of ``x`` (0..1; 0 when all are
    equal), on the axis' scale."""
    lo, hi = _axis_range(x, log_x)
    scale = np.log10 if log_x else float
    return lambda value: (float(scale(value)) - lo) / (hi - lo) if hi > lo else 0.0


def _dodged(x: np.ndarray, log_x: bool) -> np.ndarray:
    """``x`` with the points that share a value spread side by side (a few percent of a
    decade, or of the range, apart), so that their error bars and labels do not overlap."""
    out = x.astype(float).copy()
    lo, hi = _axis_range(x, log_x)
    step = 0.02 * max(hi - lo, 1.0) if log_x else 0.03 * ((hi - lo) or 1.0)
    for value in np.unique(x[np.isfinite(x)]):
        same = np.flatnonzero(x == value)
        if len(same) < 2:
            continue
        offsets = (np.arange(len(same)) - (len(same) - 1) / 2) * step
        out[same] = value * 10**offsets if log_x and value > 0 else value + offsets
    return out


def group_means(
    x: Sequence[float],
    mean: Sequence[float],
    low: Sequence[float],
    high: Sequence[float],
    n: Sequence[int],
    front: Sequence[int],
    *,
    xlabel: str,
    title: str,
    log_x: bool = False,
) -> Figure:
    """Group means (runs that differ only in the seed) with their 95% confidence intervals as
    error bars, the Pareto front of the means joined. Groups are numbered (``g1``...) in the
    order given; a group of one run is drawn hollow (no interval); groups of the same ``x``
    (configurations of one size) are drawn side by side."""
    raw_x = np.asarray(x, dtype=float)
    x, mean = _dodged(raw_x, log_x), np.asarray(mean, dtype=float)
    low, high = np.asarray(low, dtype=float), np.asarray(high, dtype=float)
    fig = Figure(figsize=(7.5, 5), layout="constrained")
    ax = fig.subplots()
    has_ci = np.isfinite(low) & np.isfinite(high)
    ax.errorbar(
        x[has_ci],
        mean[has_ci],
        yerr=[mean[has_ci] - low[has_ci], high[has_ci] - mean[has_ci]],
        fmt="o",
        color="tab:blue",
        capsize=4,
        label="group mean, 95% CI",
    )
    if (~has_ci).any():
        ax.scatter(x[~has_ci], mean[~has_ci], facecolors="none", edgecolors="tab:blue",
                   label="one run (no interval)")  # fmt: skip
    front = list(front)
    if front:  # ringed too: a front of one group draws no line
        ax.plot(x[front], mean[front], drawstyle="steps-post", color="crimson", lw=1.2,
                marker="o", markersize=11, markerfacecolor="none",
                label="Pareto front of the means")  # fmt: skip
    stacked: dict[float, int] = {}  # labels of groups drawn side by side: one above another
    for i in range(len(x)):
        level = stacked[raw_x[i]] = stacked.get(raw_x[i], -1) + 1
        ax.annotate(f"g{i + 1} (n={n[i]})", (x[i], mean[i]), textcoords="offset points",
                    xytext=(6, 4 + 9 * level), fontsize=7)  # fmt: skip
    if log_x:
        ax.set_xscale("log")
    shared = len(np.unique(raw_x[np.isfinite(raw_x)])) < np.isfinite(raw_x).sum()
    ax.set_xlabel(f"{xlabel}; groups of one size drawn side by side" if shared else xlabel)
    ax.set_ylabel("test accuracy")
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    ax.legend(loc="best")
    return fig
