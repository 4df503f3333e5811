"""Runtimes that run a model's network: torch (eager, CUDA graphs), ONNX Runtime, TensorRT.

base.py holds the protocol and the pieces every runtime shares; torch_rt.py, onnx_rt.py and
tensorrt_rt.py the runtimes; select.py picks one per model from its preference list.
Beside them: export.py (torch -> ONNX, equivalence checks, the build cache), build.py
(`fewstep build MODEL`) and bench.py (`fewstep bench engines`). Import the modules
directly: select.py needs export.py, which needs base.py.
"""
