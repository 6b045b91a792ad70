"""convnets: config-driven research on Conv2D stacks.

Data flows one way: config -> architecture check -> model + data -> strategy -> trainer ->
tracking. ``architecture`` is pure Python (no TensorFlow); nothing below ``job`` knows Hydra.
"""

__version__ = "0.1.0"
