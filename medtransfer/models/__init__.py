"""Backbones, the classifier wrapper, the model card and safe checkpoints."""
