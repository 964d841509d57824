"""The gRPC gateway: the only place (with the client) that speaks gRPC."""
