"""The Open Inference Protocol (KServe v2) over gRPC: proto, messages and servicer."""
