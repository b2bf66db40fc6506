"""Adapted linear layers as low-rank sums over T adapters, for DivMerge over LoRA adapters
(blockmerge.lora.learn): each adapted nn.Linear (or GPT-2 Conv1D) of the streamed base's meta skeleton
becomes a module computing

    y = x W0^T (+ b) + sum_t Gamma_t s_t (x A_t^T) B_t^T

with Gamma a tensor of the pass (per row for the teachers: one-hot on each row's task), so autograd gives
dL/dGamma_t = s_t sum_tokens <dL/dy, (x A_t^T) B_t^T> straight from the low-rank factors, B_t A_t never formed.

Optional bitsandbytes base (`quantize: nf4 | int8`): the adapted weights of each block are quantized when
the block is used (nf4: bnb.functional.quantize_4bit + bnb.matmul_4bit; int8: LLM.int8 vector-wise
quantization + bnb.matmul, no outlier threshold) and the forward runs through bitsandbytes' kernels, as in
QLoRA; the low-rank terms stay in the compute dtype."""

from __future__ import annotations

import torch
import torch.nn.functional as F

QUANTIZE = (None, "nf4", "int8")


class LowRankState:
    """Shared by the low-rank modules of one model: the coefficients of the pass and quantized weights."""

    def __init__(self, n_blocks: int, quantize: str | None):
        self.coef: list[torch.Tensor | None] = [None] * n_blocks  # [T] per block, None = adapters off
        self.quantize = quantize
        self.qcache: dict[str, tuple] = {}
        self.qblock: int | None = None


def _quantize(w: torch.Tensor, kind: str):
    import bitsandbytes.functional as bnbF

    if kind == "nf4":
        return bnbF.quantize_4bit(w.detach().to(torch.float32), quant_type="nf4")
    CB, SCB, _ = bnbF.int8_vectorwise_quant(w.detach().to(torch.float16))
    return CB, SCB


def _quant_linear(x: torch.Tensor, q, kind: str, bias: torch.Tensor | None) -> torch.Tensor:
    import bitsandbytes as bnb

    if kind == "nf4":
        packed, st = q
        y = bnb.matmul_4bit(x, packed.t(), quant_state=st)
    else:
        from bitsandbytes.autograd._functions import MatmulLtState

        CB, SCB = q
        state = MatmulLtState()
        state.CB, state.SCB, state.has_fp16_weights, state.threshold = CB, SCB, False, 0.0
        y = bnb.matmul(x.to(torch.float16), CB, state=state).to(x.dtype)
    return y if bias is None else y + bias


class LowRankSumLinear(torch.nn.Module):
    """Stands in for an adapted nn.Linear (or GPT-2 Conv1D) of the skeleton: `weight`/`bias` are supplied
    by functional_call like the original's; adds sum_t Gamma_t s_t (x A_t^T) B_t^T."""

    def __init__(
        self,
        orig: torch.nn.Module,
        name: str,
        block: int,
        terms: list[tuple[int, torch.Tensor, torch.Tensor, float]],
        state: LowRankState,
        conv1d: bool,
        dtype: torch.dtype,
        device,
    ):
        super().__init__()
        self.weight = orig.weight  # meta placeholders: functional_call substitutes the block's tensors
        self.bias = getattr(orig, "bias", None)
        self.name, self.block, self.state, self.conv1d = name, block, state, conv1d
        # factors of all adapters concatenated along the rank: z = x A^T [.., R]; column c belongs to task[c]
        self.A = torch.cat([A for _, A, _, _ in terms]).to(device, dtype)
        self.B = torch.cat([B for _, _, B, _ in terms], dim=1).to(device, dtype)
        self.task = torch.cat([torch.full((A.shape[0],), t) for t, A, _, _ in terms]).to(device)
        self.scale = torch.cat([torch.full((A.shape[0],), s, dtype=dtype) for _, A, _, s in terms]).to(device)

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        st = self.state
        if st.quantize is not None:
            if st.qblock != self.block:  # one block's quantized weights at a time
                st.qcache.clear()
                st.qblock = self.block
            q = st.qcache.get(self.name)
            if q is None:
                w = self.weight.T if self.conv1d else self.weight
                q = st.qcache[self.name] = _quantize(w, st.quantize)
            return _quant_linear(x, q, st.quantize, self.bias)
        if self.conv1d:
            y = x @ self.weight
            return y if self.bias is None else y + self.bias
        return F.linear(x, self.weight, self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_forward(x)
        g = self.state.coef[self.block]
        if g is None:
            return y
        z = x @ self.A.T
        col = g.to(self.scale)[..., self.task] * self.scale  # Gamma_t s_t per rank column: [R], or [batch, R]
        if col.dim() == 2 and z.dim() == 3:  # per-row coefficients (teachers of several tasks in one batch)
            col = col[:, None, :]
        elif col.dim() == 2 and z.shape[0] != col.shape[0]:  # rows flattened to [batch * seq, in] (MoE blocks)
            col = col.repeat_interleave(z.shape[0] // col.shape[0], dim=0)
        return y + (z * col) @ self.B.T
