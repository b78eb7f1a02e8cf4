"""Files copied verbatim into a Triton model repository (the Python-backend model)."""
