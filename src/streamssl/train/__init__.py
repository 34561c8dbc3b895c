"""Training: the training API (``api``), run configurations, the trainer, checkpoints, the data pipeline,
encoder init sources, DDP."""
