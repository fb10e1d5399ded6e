"""Synthetic microservice traffic with labelled injected events (the demo's and the tests' data)."""
