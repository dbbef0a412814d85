"""moebius: a serving engine for Mixture-of-Experts models with runtime EP<->TP switching."""

from moebius.config import EngineConfig, ModelConfig, preset
from moebius.core import CompletionOutput, RequestOutput, SamplingParams
from moebius.llm import LLM

__version__ = "0.1.0"
__all__ = [
    "LLM",
    "SamplingParams",
    "RequestOutput",
    "CompletionOutput",
    "EngineConfig",
    "ModelConfig",
    "preset",
    "__version__",
]
