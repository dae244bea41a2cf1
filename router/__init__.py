"""caprouter core: selection policy, service, gRPC adapter, CLI and config."""

__version__ = "0.1.0"
