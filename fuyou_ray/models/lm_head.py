"""The LM head's projection (hidden -> vocabulary logits), shared by every model family.

`LMHead` is an `nn.Linear` without bias - same parameter, same state-dict key `<name>.weight`, so layouts,
checkpoints and the HF import/export see no difference - whose forward runs the GEMMs on an aligned
vocabulary. GPT-2/GPT-3's vocabulary (50257) is odd, and the logits' rows then have an odd leading
dimension: cuBLAS has no aligned bf16 tensor-core kernel for that, and the head's three GEMMs (forward and
the two of backward) ran 3.9x slower than at 50304 on the H100. One head visit of 64 x 1024 tokens at
h 5120 took 866 ms; padded, 221 ms; at vocab 50304, 205 ms (docs/BENCHMARKS.md, "LM head").
So on CUDA the weight is padded with zero rows to a multiple of `VOCAB_ALIGN` (a copy of vocab x h, cheap
next to the GEMM), the GEMM writes aligned logits, and the padding columns are sliced off: the logits,
the loss and the gradients are those of the unpadded head (the padded rows' gradient is dropped with the
padding). On CPU the plain `nn.Linear` path runs (no alignment penalty there, and CPU results stay
bit-identical to the reference model).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

VOCAB_ALIGN = 64  # elements: 128 bytes of bf16, what cuBLAS's fastest kernels want of a leading dimension


class LMHead(nn.Linear):
    """hidden (..., h) -> logits (..., vocab); see the module docs for the padding on CUDA."""

    def __init__(self, d_model: int, vocab_size: int) -> None:
        super().__init__(d_model, vocab_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return aligned_logits(x, self.weight) if x.is_cuda else super().forward(x)


def aligned_logits(x: torch.Tensor, weight: torch.Tensor, align: int = VOCAB_ALIGN) -> torch.Tensor:
    """`x @ weight.T` with the GEMM run on `weight` padded to a multiple of `align` rows; the result is a
    strided view of the aligned logits without the padding columns (`lm_loss`'s fp32 cast makes it
    contiguous anyway)."""
    vocab = weight.shape[0]
    pad = -vocab % align
    if pad == 0:
        return F.linear(x, weight)
    return F.linear(x, F.pad(weight, (0, 0, 0, pad)))[..., :vocab]
