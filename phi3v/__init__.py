"""phi3v: Phi-3 Vision on ONNX Runtime, with onnxruntime, numpy, tokenizers and Pillow only.

from phi3v import Pipeline
pipe = Pipeline.load("data/phi-3-vision-cpu")
print(pipe.generate("What is in this picture?", images=["cat.png"]).text)
"""

from phi3v.config import ModelConfig, load_config
from phi3v.engine import DEFAULT_MAX_NEW_TOKENS, Pipeline, Stream
from phi3v.errors import (
    ConfigError,
    DownloadError,
    ImageError,
    LimitError,
    ModelFolderError,
    Phi3VError,
    PrecisionError,
    PromptError,
)
from phi3v.image import MAX_CROPS, ProcessedImage, preprocess_image
from phi3v.results import Generation, Progress, Timings

__all__ = [
    "DEFAULT_MAX_NEW_TOKENS",
    "MAX_CROPS",
    "ConfigError",
    "DownloadError",
    "Generation",
    "ImageError",
    "LimitError",
    "ModelConfig",
    "ModelFolderError",
    "Phi3VError",
    "Pipeline",
    "PrecisionError",
    "ProcessedImage",
    "Progress",
    "PromptError",
    "Stream",
    "Timings",
    "load_config",
    "preprocess_image",
]
