"""The Envoy REST gateway in front of the gRPC server, and the launcher that runs both."""
