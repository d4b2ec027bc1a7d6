"""Small XLA-friendly reference models (Linen and NNX) and their registry by name."""
