"""rtagger: streaming real-time music tagging (CNN + transformer on 3.69 s windows)."""

from rtagger.errors import AudioError, CheckpointError, ConfigError, RtaggerError

__version__ = "0.1.0"

__all__ = [
    "AudioError",
    "CheckpointError",
    "ConfigError",
    "RtaggerError",
    "Tagger",
    "__version__",
    "load_model",
]


def __getattr__(name: str):
    # Lazy so that `import rtagger` (e.g. for its errors) does not import torch.
    if name == "load_model":
        from rtagger.model.checkpoint import load_model

        return load_model
    if name == "Tagger":
        from rtagger.pipeline.tagger import Tagger

        return Tagger
    raise AttributeError(name)
