"""clipline: a reproducible DVC pipeline for CLIP-style models."""
