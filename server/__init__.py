"""The nestkv server: namespaced in-memory storage served over gRPC (`python -m nestkv.server`)."""
