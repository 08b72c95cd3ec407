"""Differential privacy: sampling, clipping, noise, accounting."""
