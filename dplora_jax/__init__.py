"""dplora_jax: differentially private federated LoRA fine-tuning of LLMs in JAX."""

__version__ = "0.1.0"
