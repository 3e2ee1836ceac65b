"""Where Triton is installed but no GPU is, its kernels can run in its CPU interpreter (test_kernels.py). The
interpreter must be chosen before anything imports Triton, so it is chosen here, before the test modules load;
the kernels still run on the CPU only where a test turns on kernels.RUN_KERNELS_ON_CPU."""

import importlib.util
import os

import torch

if importlib.util.find_spec("triton") is not None and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
