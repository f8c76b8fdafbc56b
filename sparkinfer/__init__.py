"""SparkInfer: batch-1 LLM/MoE inference compiled with Apache TVM."""

__version__ = "0.1.0"
