"""Transport: the gRPC servicers, the interceptor that authenticates and maps errors, the CLI."""
