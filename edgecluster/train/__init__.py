"""Training: plain torch modules for pipeline stages, data, checkpoints and evaluation."""
