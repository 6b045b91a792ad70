"""The config groups Hydra composes (package data: ``pkg://convnets.configs``)."""
