"""Runtimes that run a model's network: torch (eager, CUDA graphs), ONNX Runtime, TensorRT.

base.py holds the protocol and the pieces every runtime shares; select.py picks one per
model from its preference list (import it directly: it needs engines.export, which needs
base.py).
"""
