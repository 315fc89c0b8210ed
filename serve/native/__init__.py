"""The native engine: packed NVFP4 (or plain) weights in this process, continuous batching in a thread."""

from nvfp4.serve.native.engine import NativeEngine

__all__ = ["NativeEngine"]
