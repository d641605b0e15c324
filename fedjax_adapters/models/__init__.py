"""Models: small vision nets from the FLoRAL paper and a LLaMA-architecture decoder (all Flax NNX)."""
