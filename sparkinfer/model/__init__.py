"""The model in TVM Relax: the decode step of Qwen3-MoE / Qwen3.

`sparkinfer.model.qwen3moe` builds the IRModule (imports TVM); `sparkinfer.model.spec` says
what the step's inputs are and needs nothing heavy (the manifest and runtime use it alone).
"""
