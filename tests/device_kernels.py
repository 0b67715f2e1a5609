"""The device kernels a ``torch.profiler`` run saw (shared by the GPU tests and benchmarks)."""

from __future__ import annotations

# device-side events that are not kernels: copies, fills, annotations and syncs
NOT_KERNELS = ("memcpy", "memset", "gpu_user_annotation", "context sync", "event sync", "stream sync",
               "cuda_profiler_range")


def kernel_names(prof) -> list[str]:
    """Names of the kernels launched under ``prof`` (a finished ``torch.profiler.profile``), one per launch."""
    from torch.profiler import DeviceType

    return [e.name for e in prof.events()
            if e.device_type == DeviceType.CUDA and not e.name.lower().startswith(NOT_KERNELS)]
