"""The gRPC scoring service (``bliss serve``): index registry, batching, health, metrics."""
