"""The in-memory reference: the same model trained the plain way, for equivalence checks.

`ReferenceModel` + `torch.optim.AdamW` + `clip_grad_norm_` + gradient accumulation over micro-batches, on
the same batches and learning rates as a fuyou-ray run. Tests (and the GPU check) compare against it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fuyou_ray.config import OptimizerConfig, RunConfig
from fuyou_ray.data import TokenDataset
from fuyou_ray.models import ModelSpec, ReferenceModel, lm_loss
from fuyou_ray.optim import learning_rate


@dataclass
class ReferenceRun:
    model: ReferenceModel
    losses: list[float]

    def unit_weights(self) -> list[torch.Tensor]:
        return [self.model.flat_unit(i) for i in range(self.model.spec.num_units)]


def reference_adamw(params: list[torch.nn.Parameter], o: OptimizerConfig) -> torch.optim.AdamW:
    """torch.optim.AdamW with fuyou-ray's param groups: weight decay on matrices, none on vectors."""
    return torch.optim.AdamW(
        [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": o.weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ],
        lr=o.lr,
        betas=o.betas,
        eps=o.eps,
        # The fused kernel is the one fuyou-ray runs over element ranges, so the two agree bit for bit;
        # the default for-loop AdamW differs from it by an ulp here and there, which Adam's first steps
        # amplify to ~1e-6.
        fused=True,
    )


def train_reference(
    cfg: RunConfig, steps: int, device: str = "cpu", dtype: torch.dtype = torch.float32
) -> ReferenceRun:
    """Train the plain model for `steps` steps of `cfg`'s schedule; params in `dtype` on `device`.

    With dtype bf16 the weights themselves are bf16 (no fp32 master): the usual pure-bf16 baseline.
    """
    spec = ModelSpec(cfg.model)
    model = ReferenceModel(spec, cfg.seed).to(device=device, dtype=dtype)
    data = TokenDataset.from_config(cfg.data, cfg.model.vocab_size)
    o = cfg.optimizer
    opt = reference_adamw(list(model.parameters()), o)
    losses = []
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = learning_rate(o, step, cfg.steps)
        batch = data.batch(step, cfg.batch.global_batch, cfg.batch.seq_len)
        opt.zero_grad(set_to_none=True)
        total = 0.0
        for x, y in batch.micro_batches(cfg.batch.micro_batch):
            loss = lm_loss(model(x.to(device)), y.to(device)) / cfg.batch.accum_steps
            loss.backward()
            total += float(loss.detach())
        if o.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), o.max_grad_norm)
        opt.step()
        losses.append(total)
    return ReferenceRun(model, losses)


def train_reference_mixed(cfg: RunConfig, steps: int, device: str = "cuda") -> ReferenceRun:
    """Mixed precision done the plain way, all on `device`: fp32 master weights and AdamW, a bf16 copy
    of the model for forward/backward, bf16 gradients accumulated in fp32 over micro-batches, then
    clip_grad_norm_ on the fp32 gradients. The same arithmetic fuyou-ray performs, without any streaming.
    """
    spec = ModelSpec(cfg.model)
    master = ReferenceModel(spec, cfg.seed).to(device)
    work = ReferenceModel(spec, cfg.seed).to(device=device, dtype=torch.bfloat16)
    data = TokenDataset.from_config(cfg.data, cfg.model.vocab_size)
    o = cfg.optimizer
    masters = list(master.parameters())
    opt = reference_adamw(masters, o)
    losses = []
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = learning_rate(o, step, cfg.steps)
        with torch.no_grad():
            for w, m in zip(work.parameters(), masters, strict=True):
                w.copy_(m)
        accum = [torch.zeros_like(m) for m in masters]
        batch = data.batch(step, cfg.batch.global_batch, cfg.batch.seq_len)
        total = 0.0
        for x, y in batch.micro_batches(cfg.batch.micro_batch):
            loss = lm_loss(work(x.to(device)), y.to(device)) / cfg.batch.accum_steps
            grads = torch.autograd.grad(loss, list(work.parameters()))
            for a, g in zip(accum, grads, strict=True):
                a += g.float()
            total += float(loss.detach())
        for m, a in zip(masters, accum, strict=True):
            m.grad = a
        if o.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(masters, o.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(total)
    return ReferenceRun(master, losses)
