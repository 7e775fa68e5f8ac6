"""The exceptions phi3v raises on bad input or a bad model folder.

Every one of them derives from :class:`Phi3VError`, so callers (the CLI, the
Gradio app) can catch exactly ours and show the message as it is: each message
says what was wrong and what to do about it.
"""


class Phi3VError(Exception):
    """Base class of every error phi3v raises on bad input or a bad model folder."""


class ModelFolderError(Phi3VError):
    """The model folder is missing, incomplete or holds files we cannot use."""


class ConfigError(ModelFolderError):
    """genai_config.json (or processor_config.json) is malformed or of an unknown layout."""


class ImageError(Phi3VError):
    """An image could not be read or is unusable (not an image, corrupt, too large)."""


class PromptError(Phi3VError):
    """The prompt, its image tags or the generation settings are invalid."""


class PrecisionError(Phi3VError):
    """The precision asked for is unknown, or cannot run with this model set."""


class DownloadError(Phi3VError):
    """Fetching a model set failed (network, HTTP status, disk, checksum, lock)."""


class LimitError(PromptError):
    """The request is larger than this server allows (prompt tokens, images)."""


def first_line(err: BaseException) -> str:
    """The first line of a library's error text (onnxruntime's and protobuf's run long), to
    quote inside one of our messages; the exception's type name when it has no text."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
