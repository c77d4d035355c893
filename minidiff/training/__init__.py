"""Training, sampling and run files: the trainer (Algorithm 1), the optimizer state, checkpoints,
bundles and sampling from them, configs, reports, pipelines in and out, classifier training."""
