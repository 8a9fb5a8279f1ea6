"""Adapters of the sandbox service: the Docker engine."""
