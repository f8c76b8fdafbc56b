"""`sparkinfer export`: a self-contained folder that runs one compiled model on a machine that
cannot host the TVM compiler (an edge box): the module for one arch, TVM's runtime-only half,
the SparkInfer runtime, the GGUF reader, the model, and a launcher `run.py`. The target needs
Python, numpy, tokenizers and jinja2, nothing else (`bundle.export_bundle` says what goes in).
"""

from sparkinfer.export.bundle import BUNDLE_INFO, Bundle, export_bundle

__all__ = ["BUNDLE_INFO", "Bundle", "export_bundle"]
