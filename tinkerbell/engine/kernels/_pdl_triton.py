"""Programmatic dependent launch (PDL) for the decode path's Triton kernels (imported only where Triton is).

A decode step at batch 1 is ~170 short kernels that each stream a little memory; between two of them the GPU
idles while the next grid is launched and ramps up. Launched with PDL (Hopper and later), a kernel's grid is
scheduled while the previous kernel's last programs still run, and waits on the device (`gdc_wait`) before it
touches anything the previous kernel wrote. Every PDL kernel must wait before its first dependent load or any
store, and must wait even if it reads nothing of its predecessor: the kernel after it relies on the chain.
"""

from __future__ import annotations

import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait


@triton.jit
def pdl_enter(PDL: tl.constexpr):
    """A PDL kernel's first statement: wait for the previous kernel to finish (its writes visible), then let the
    next kernel's grid be scheduled as our programs finish."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
