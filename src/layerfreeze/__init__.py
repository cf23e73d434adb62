"""layerfreeze: layer freezing for transfer learning in JAX, Flax and Optax."""
