"""Deployable output: packed integer checkpoints and ONNX QDQ export."""
from zsq.export.packed_checkpoint import load_quantized, save_quantized  # noqa: F401
from zsq.export.manifest import FORMAT_VERSION  # noqa: F401
