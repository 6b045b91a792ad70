"""Hydra sweeper ``hydra/sweeper=convnets_optuna``: Optuna search over convnets' trials.

``hydra_plugins`` is a namespace package (no ``__init__.py`` there): Hydra 1.3 finds sweepers
only under it. The logic is in :mod:`convnets.search`.
"""
