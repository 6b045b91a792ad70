"""``python evaluate.py run_id=<id> | checkpoint=<path.keras> | compare=<experiment or parent id>``.

Evaluates a logged model on its test split (metrics and figures logged to the same run), or a
local ``.keras`` model, or writes the comparison report of an experiment / sweep. Returns the
evaluation accuracy (``None`` for ``compare``).
"""

import sys

import hydra
from hydra.core.hydra_config import HydraConfig

import convnets.config  # noqa: F401  (registers the schemas Hydra composes against)
from convnets import evaluation
from convnets.cli import one_line_config_errors, refuse_credentials, report_user_errors


@hydra.main(config_path="configs", config_name="evaluate", version_base="1.3")
@report_user_errors
def main(cfg) -> float | None:
    result = evaluation.run(cfg, HydraConfig.get().runtime.output_dir)
    return result.metrics["eval_accuracy"] if isinstance(result, evaluation.EvalReport) else None


if __name__ == "__main__":
    refuse_credentials(sys.argv[1:])  # before Hydra writes the overrides anywhere
    one_line_config_errors()
    main()
