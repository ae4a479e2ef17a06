"""Speech synthesis engines. Nothing in this package knows about gRPC or HTTP."""
