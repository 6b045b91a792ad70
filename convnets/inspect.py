"""``python -m convnets.inspect model=<name> [input_shape=[H,W,C]] [num_classes=N] [format=json]``:
the per-layer table of a model config, without TensorFlow (:mod:`convnets.inspection`).
From Python: :func:`convnets.inspect`."""

if __name__ == "__main__":
    from convnets.commands import inspect

    inspect()
