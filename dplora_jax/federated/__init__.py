"""Federated learning: partitioning, the compiled round, aggregation."""
