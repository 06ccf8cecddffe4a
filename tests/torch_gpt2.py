"""An independent GPT-2 in PyTorch (nanoGPT-style), the reference graphc is tested against.

Written from the GPT-2 paper / nanoGPT, not from graphc's graph: it shares only the
parameter layout (llm.c's (out, in) weights), which it loads as ordinary nn.Parameters.

``compute=torch.bfloat16`` runs it in BF16 mixed precision, the reference for graphc's
``precision_bf16`` pass: float32 master parameters cast to bf16 at their use (once per
forward), bf16 activations, GEMMs and residual stream; layer norm, attention (its
softmax), GELU and the loss compute in float32 on the bf16 tensors and store bf16, as
fused kernels do (autograd rounds each gradient to the dtype of the tensor it flows to).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from graphc.models.params import Params


class TorchGPT2(torch.nn.Module):
    def __init__(self, params: Params, dtype=torch.float32, compute=None):
        super().__init__()
        self.cfg = cfg = params.cfg
        self.act = compute or dtype                                  # activations
        self.inner = torch.float32 if compute is not None else dtype  # inside LN, softmax, GELU, loss
        P = lambda a: torch.nn.Parameter(torch.tensor(np.array(a), dtype=dtype))  # noqa: E731
        self.wte = P(params.tensor("wte"))
        self.wpe = P(params.tensor("wpe"))
        self.layers = torch.nn.ModuleList()
        for layer in range(cfg.n_layer):
            m = torch.nn.Module()
            for t in ["ln1w", "ln1b", "qkvw", "qkvb", "attprojw", "attprojb", "ln2w", "ln2b", "fcw", "fcb",
                      "fcprojw", "fcprojb"]:
                setattr(m, t, P(params.tensor(t)[layer]))
            self.layers.append(m)
        self.lnfw = P(params.tensor("lnfw"))
        self.lnfb = P(params.tensor("lnfb"))

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor | None = None):
        cfg = self.cfg
        B, T = tokens.shape
        C, H = cfg.n_embd, cfg.n_head
        act, inner = self.act, self.inner
        w = lambda p: p.to(act)                          # noqa: E731 - the weight as the GEMMs read it
        up = lambda *ts: [t.to(inner) for t in ts]       # noqa: E731 - into a kernel's inner dtype

        def ln(x, weight, bias):
            return F.layer_norm(*up(x), (C,), *up(w(weight), w(bias)), cfg.ln_eps).to(act)

        wte = w(self.wte)
        x = wte[tokens] + w(self.wpe)[:T]
        for m in self.layers:
            h = ln(x, m.ln1w, m.ln1b)
            q, k, v = F.linear(h, w(m.qkvw), w(m.qkvb)).split(C, dim=-1)
            q, k, v = up(*(t.view(B, T, H, C // H).transpose(1, 2) for t in (q, k, v)))
            att = (q @ k.transpose(-2, -1)) / math.sqrt(C // H)
            att = att.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf")).softmax(-1)
            y = (att @ v).to(act).transpose(1, 2).reshape(B, T, C)
            x = x + F.linear(y, w(m.attprojw), w(m.attprojb))
            h = ln(x, m.ln2w, m.ln2b)
            g = F.gelu(*up(F.linear(h, w(m.fcw), w(m.fcb))), approximate="tanh").to(act)
            x = x + F.linear(g, w(m.fcprojw), w(m.fcprojb))
        x = ln(x, self.lnfw, self.lnfb)
        logits = x @ wte[:cfg.vocab_size].T
        loss = None
        if targets is not None:
            loss = F.cross_entropy(*up(logits.reshape(-1, logits.size(-1))), targets.reshape(-1))
        return logits, loss

    def grads(self) -> dict[str, np.ndarray]:
        """Gradients in llm.c's 16-tensor layout (wte padded rows included)."""
        out = {"wte": self.wte.grad.numpy(), "wpe": self.wpe.grad.numpy(),
               "lnfw": self.lnfw.grad.numpy(), "lnfb": self.lnfb.grad.numpy()}
        for t in ["ln1w", "ln1b", "qkvw", "qkvb", "attprojw", "attprojb", "ln2w", "ln2b", "fcw", "fcb",
                  "fcprojw", "fcprojb"]:
            out[t] = np.stack([getattr(m, t).grad.numpy() for m in self.layers])
        return out
