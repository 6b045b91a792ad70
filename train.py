"""``python train.py [group=option ...] [key=value ...]``: train one stack, record it in MLflow
(the same as ``convnets-train``; from Python: ``convnets.train([...])``)."""

from convnets.commands import train

if __name__ == "__main__":
    train()
