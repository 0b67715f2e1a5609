"""The controller's computations and their implementations.

* :mod:`.reference`: every computation in plain PyTorch (the semantics; what the tests compare
  the fast paths against);
* :mod:`.library`: the ops, one namespace ``torch.ops.autolr_fast``, schemas and fake kernels;
* :mod:`.cpp_backend` (``csrc/ops``, C++ on the CPU, CUDA for the multi-tensor ops) and
  :mod:`.triton_backend` / :mod:`.triton_kernels` (the controller step on CUDA);
* :mod:`.dispatch`: the fastest available implementation per device, the reference otherwise.
"""
