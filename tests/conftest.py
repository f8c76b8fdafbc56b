import pytest


def _has_cuda_gpu() -> bool:
    # Through the runtime's loader: runtime-only TVM (the GPU machines) does not autoload
    # the CUDA backend, and a bare tvm.cuda(0).exist would say False there.
    from sparkinfer.runtime.device import cuda_available

    return cuda_available()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    gpu_items = [item for item in items if "gpu" in item.keywords]
    # Importing TVM costs seconds: only probe for a GPU when a GPU test was collected.
    if not gpu_items or _has_cuda_gpu():
        return
    skip_gpu = pytest.mark.skip(reason="no CUDA GPU on this machine")
    for item in gpu_items:
        item.add_marker(skip_gpu)
