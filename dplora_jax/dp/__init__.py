"""Differential privacy: every mechanism of dplora_jax and its accounting, in one place.

clipping (the clip primitive), noise (the Gaussian release), mechanisms (DP-SGD, the paper's
group release, client-level DP and adaptive clipping), plan (builds mechanisms and accountant
events from public values), accounting (dp-accounting), ledger (composable spend), sampling
(Poisson samples with fixed shapes), randomness (secret DP randomness), release (what each party
releases), statistics (private means of rows: a centre for hidden states, and the clipped mean
with a noised count behind a centred LoRA's centre).
"""
