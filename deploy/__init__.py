"""Deployment: exported model folders (ONNX, ExportedProgram, TensorRT) and serving assets."""
