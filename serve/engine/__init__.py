"""Serving engines: the interface (types) and the native NVFP4 engine with continuous batching."""

from nvfp4.serve.engine.native import NativeEngine
from nvfp4.serve.engine.types import (
    ContextTooLong,
    Engine,
    EngineError,
    EngineStats,
    GenerationRequest,
    NotReady,
    QueueFull,
    SamplingParams,
    TokenEvent,
)

__all__ = [
    "ContextTooLong",
    "Engine",
    "EngineError",
    "EngineStats",
    "GenerationRequest",
    "NativeEngine",
    "NotReady",
    "QueueFull",
    "SamplingParams",
    "TokenEvent",
]
