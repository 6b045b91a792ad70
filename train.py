"""``python train.py [group=option ...] [key=value ...]``: train one stack, record it in MLflow.

Returns the job's validation accuracy, the objective of ``-m hparams_search=...`` sweeps.
"""

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode

import convnets.config  # noqa: F401  (registers the schemas Hydra composes against)
from convnets.checks import check_config
from convnets.cli import imports_without_gc, report_user_errors, run_main


@hydra.main(config_path="configs", config_name="train", version_base="1.3")
@report_user_errors
def main(cfg) -> float:
    if HydraConfig.get().mode != RunMode.MULTIRUN:  # a sweep records a bad point as FAILED
        check_config(cfg)  # pure: refused before TensorFlow loads or a run is recorded (~1 s)
    # MLflow (with the job module), then TensorFlow once the store and any run id are checked
    # (job.train): a mistake there is reported in ~2 s instead of ~7. Either order costs the
    # same (6.5-6.9 s for both here); importing both at once on two threads was slower than
    # one after the other (5.7 s against 5.4 s: they contend for the GIL).
    with imports_without_gc():  # MLflow, with the job module
        from convnets import job

    return job.train(cfg)


if __name__ == "__main__":
    run_main(main)
