"""Deployment export: ONNX graphs of the four Stable Diffusion networks and TensorRT engines built from them.

    python -m export --model PATH --out DIR --format onnx|tensorrt [--dtype fp32|fp16] [--min/--opt/--max BxHxW]

specs.py describes each network's interface, onnx.py exports it, tensorrt.py builds engines,
manifest.py records what DIR holds and decides what can be reused.
"""
