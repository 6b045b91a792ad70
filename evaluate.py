"""``python evaluate.py run_id=<id> | checkpoint=<path.keras> | compare=<experiment or parent id>``
(the same as ``convnets-evaluate``; from Python: ``convnets.evaluate`` / ``convnets.compare``).

Evaluates a logged model on its test split (metrics and figures logged to the same run), or a
local ``.keras`` model, or writes the comparison report of an experiment / sweep.
"""

from convnets.commands import evaluate

if __name__ == "__main__":
    evaluate()
