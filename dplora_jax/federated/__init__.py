"""Federated learning: partitioning, the compiled round, aggregation, a centred LoRA's centre."""
