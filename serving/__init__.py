"""Serving: the Triton model repository, the embedded tritonserver, clients and the CLI."""
