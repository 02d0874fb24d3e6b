"""Serving: engine, HTTP server and the `qoq-jax` command line."""
