"""Fine-tuning strategies, the training loop, optimisers and schedules, the frozen-feature cache."""
