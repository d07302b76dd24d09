"""The bliss client: a Python SDK and the command-line client."""
