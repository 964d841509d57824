"""Selection math: pure numpy, no Ray, no gRPC."""
