"""DeepSpeed engine, train/eval loop, schedule, checkpoints and monitoring."""
