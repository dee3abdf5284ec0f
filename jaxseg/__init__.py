"""jaxseg: human silhouette segmentation in JAX/Flax, from one CPU to a TPU pod."""
