"""phi3v: Phi-3 Vision on ONNX Runtime, with onnxruntime, numpy, tokenizers and Pillow only.

from phi3v import Pipeline
pipe = Pipeline.load("data/phi-3-vision-cpu")
print(pipe.generate("What is in this picture?", images=["cat.png"]).text)
"""

from phi3v.config import ModelConfig, load_config
from phi3v.errors import (
    ConfigError,
    DownloadError,
    ImageError,
    ModelFolderError,
    Phi3VError,
    PromptError,
)
from phi3v.image import ProcessedImage, preprocess_image
from phi3v.pipeline import Generation, Pipeline, Stream, Timings

__all__ = [
    "ConfigError",
    "DownloadError",
    "Generation",
    "ImageError",
    "ModelConfig",
    "ModelFolderError",
    "Phi3VError",
    "Pipeline",
    "ProcessedImage",
    "PromptError",
    "Stream",
    "Timings",
    "load_config",
    "preprocess_image",
]
