"""``python evaluate.py run_id=<id> | checkpoint=<path.keras> | compare=<experiment or parent id>``.

Evaluates a logged model on its test split (metrics and figures logged to the same run), or a
local ``.keras`` model, or writes the comparison report of an experiment / sweep. Returns the
evaluation accuracy (``None`` for ``compare``).
"""

import hydra
from hydra.core.hydra_config import HydraConfig

import convnets.config  # noqa: F401  (registers the schemas Hydra composes against)
from convnets.cli import imports_without_gc, report_user_errors, run_main


@hydra.main(config_path="configs", config_name="evaluate", version_base="1.3")
@report_user_errors
def main(cfg) -> float | None:
    with imports_without_gc():  # MLflow, with the command's module
        from convnets import evaluate_job

    report = evaluate_job.run(cfg, HydraConfig.get().runtime.output_dir)
    return None if cfg.compare else report.metrics["eval_accuracy"]


if __name__ == "__main__":
    run_main(main)
