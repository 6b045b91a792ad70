"""Hydra launcher ``hydra/launcher=fresh_process``: each job of a sweep in a new process.

``python train.py -m hydra/launcher=fresh_process hydra.launcher.n_jobs=N ...`` runs every job
in a process of its own (at most ``N`` at a time), so the sweep's memory does not grow with the
number of jobs, at the price of one interpreter, TensorFlow and MLflow start-up per job. The
registration and settings are in :mod:`.fresh_process_launcher` (imported by Hydra at start-up,
so it stays light); the launching is in :mod:`._core` (imported only when a sweep runs).
"""
