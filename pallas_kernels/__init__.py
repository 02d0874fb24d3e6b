"""Pallas GPU kernels, each beside its pure-jnp reference."""
