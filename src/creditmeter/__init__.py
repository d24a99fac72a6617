"""creditmeter: a gRPC credit metering server with atomic Redis balances."""

__version__ = "0.1.0"
