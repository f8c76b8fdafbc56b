"""Training pipeline of SparkInfer's embedded demo model (a small Qwen3-MoE trained on
the Python standard library). Not part of the installed package; see training/README.md."""
