"""The Pareto front: the one implementation, for ``compare=``, sweep summaries, a search's
``pareto.png`` and a reproduced study."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def pareto_front(xs: Sequence[float], ys: Sequence[float]) -> list[int]:
    """Indices of the points no other point beats on both: smaller-or-equal x, larger-or-equal y.

    "Cheapest for its accuracy": minimise x (parameters, receptive field), maximise y
    (accuracy). A point is on the front unless another has x <= its x and y >= its y with
    one of them strict; identical points are all on it. NaN/inf points are ignored.
    Returned in increasing x (the order to draw the front as a step line).
    """
    x = np.asarray(xs, dtype=float)
    y = np.asarray(ys, dtype=float)
    valid = [i for i in range(len(x)) if np.isfinite(x[i]) and np.isfinite(y[i])]
    front: list[int] = []
    best = -math.inf
    for i in sorted(valid, key=lambda i: (x[i], -y[i])):
        if y[i] > best:
            front.append(i)
            best = y[i]
        elif y[i] == best and x[i] == x[front[-1]]:
            front.append(i)
    return front
