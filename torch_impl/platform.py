"""Where the Triton kernels run: compiled on a CUDA GPU, else under Triton's
interpreter on the CPU. Imported before any kernel is defined, because Triton
reads TRITON_INTERPRET when a ``@triton.jit`` function is created."""

import os
import sys

import torch

ON_GPU = torch.cuda.is_available()
if not ON_GPU and os.environ.get("TRITON_INTERPRET") is None:
    if "triton" in sys.modules:
        # triton.language's own jit helpers were already built for compilation.
        raise ImportError("No CUDA device: import torch_impl before triton, or set "
                          "TRITON_INTERPRET=1, so that Triton runs in its interpreter")
    os.environ["TRITON_INTERPRET"] = "1"

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def default_device() -> torch.device:
    return torch.device("cuda" if ON_GPU else "cpu")


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def check_kernel_device(tensors: dict) -> torch.device:
    """All given tensors must share one device the kernels can run on."""
    device = None
    for name, tensor in tensors.items():
        if tensor is None:
            continue
        if device is None:
            device, first = tensor.device, name
        elif tensor.device != device:
            raise ValueError(f"`{name}` is on {tensor.device} but `{first}` is on {device}")
    if device.type == "cuda" and INTERPRET:
        raise ValueError(f"`{first}` is on CUDA but TRITON_INTERPRET=1 runs kernels on the CPU")
    if device.type != "cuda" and not INTERPRET:
        raise ValueError(f"`{first}` is on {device}; compiled Triton kernels need CUDA tensors")
    return device
