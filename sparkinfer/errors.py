"""Errors a user can cause (bad files, bad requests, too little memory).

Every one of them carries a message that names the problem; the CLI prints it
without a traceback and exits non-zero.
"""


class SparkInferError(Exception):
    """Base of all errors caused by input rather than by a bug."""


class GGUFFormatError(SparkInferError):
    """The file is not a GGUF, or is truncated or corrupt."""


class UnsupportedArchitectureError(SparkInferError):
    """general.architecture names a model family we do not run."""


class UnsupportedQuantTypeError(SparkInferError):
    """A tensor uses a ggml type with no registered quant format."""


class MissingTensorError(SparkInferError):
    """A tensor the configuration requires is absent from the file."""


class TensorShapeError(SparkInferError):
    """A tensor's shape disagrees with the configuration."""


class MetadataError(SparkInferError):
    """A required metadata key is missing or has the wrong type."""


class ChatTemplateError(SparkInferError):
    """The chat template refused the conversation (e.g. via `raise_exception`), so the request is at fault."""


class OutOfMemoryError(SparkInferError):
    """The device has too little free memory for the weights or the KV cache asked for."""


class ContextLengthError(SparkInferError):
    """A request needs more tokens than the context the engine was loaded with."""


class CompiledModuleError(SparkInferError):
    """No usable compiled module for this model and arch (missing, stale, or for another one)."""


class UnsupportedDeviceError(SparkInferError):
    """The arch asked for is unknown, absent from this machine, or the GPU found has no target."""


class InvalidParameterError(SparkInferError):
    """A generation argument (sampling, length) is of the wrong type or out of range; `param`
    is its API name."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


class LlamaCppError(SparkInferError):
    """llama.cpp, asked for by `bench --compare`, is missing, failed, or its output is unreadable."""
