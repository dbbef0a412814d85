"""In-place weight updates (RL: the policy's new weights between rollouts; SGLang's
``update_weights_from_disk`` and ``_from_tensor``): a checkpoint folder of the same model, or
named tensors (any subset, Hugging Face names), are written into every rank's tensors at their
fixed addresses, in the current layout (moebius/model/loader.py: ``WeightWriter``), so CUDA
graphs, both layouts' runtimes and the switch's buffers stay as they are. The prefix cache is
dropped (its KV came from the old weights). The engine applies an update only with no request
running: the server pauses admission, lets the running requests finish under the weights they
started with, then updates and resumes (docs/weight-updates.md).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from moebius.config import ConfigError, ModelConfig
from moebius.engine.weight_sync import GroupSource

# fields of ModelConfig a new checkpoint may change: not shapes
_FREE = {"torch_dtype"}


@dataclass
class WeightUpdate:
    """One update, as ``LLMEngine.weight_updates`` records it."""

    version: int  # weights version after it (the engine starts at 0)
    source: str  # the checkpoint folder, or "N tensors"
    step: int  # the engine step it followed
    seconds: float  # wall time, every rank checked and wrote
    check_seconds: float  # the slowest rank's check of every name and shape
    write_seconds: float  # the slowest rank's reads and writes into place
    error: str | None = None  # the source was refused; the weights did not change


def describe(source) -> str:
    if isinstance(source, GroupSource):
        return f"{len(source)} tensors over the trainer's group"
    return source if isinstance(source, str) else f"{len(source)} tensors"


def checked_source(current: ModelConfig, source):
    """``source`` as the ranks take it: a checkpoint folder, ValueError unless it holds the
    same model (every shape and option equal: what a rank would otherwise find only tensor by
    tensor); or named tensors (pairs or a dict) as a list of pairs, checked by the ranks name
    by name."""
    if isinstance(source, GroupSource):
        return source
    if not isinstance(source, str):
        return list(source.items() if isinstance(source, dict) else source)
    model_dir = source
    try:
        new = ModelConfig.from_dir(model_dir)
    except (ConfigError, OSError) as e:
        raise ValueError(f"cannot read the checkpoint at {model_dir!r}: {e}") from e
    diff = [f.name for f in fields(ModelConfig)
            if f.name not in _FREE and getattr(new, f.name) != getattr(current, f.name)]
    if diff:
        raise ValueError(f"the checkpoint at {model_dir!r} is another model: {', '.join(diff)} "
                         f"differ from the served model's")
    return source
