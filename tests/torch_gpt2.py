"""An independent GPT-2 in PyTorch (nanoGPT-style), the reference graphc is tested against.

Written from the GPT-2 paper / nanoGPT, not from graphc's graph: it shares only the
parameter layout (llm.c's (out, in) weights), which it loads as ordinary nn.Parameters.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from graphc.models.params import Params


class TorchGPT2(torch.nn.Module):
    def __init__(self, params: Params, dtype=torch.float32):
        super().__init__()
        self.cfg = cfg = params.cfg
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
        x = self.wte[tokens] + self.wpe[:T]
        for m in self.layers:
            h = F.layer_norm(x, (C,), m.ln1w, m.ln1b, cfg.ln_eps)
            q, k, v = F.linear(h, m.qkvw, m.qkvb).split(C, dim=-1)
            q, k, v = (t.view(B, T, H, C // H).transpose(1, 2) for t in (q, k, v))
            att = (q @ k.transpose(-2, -1)) / math.sqrt(C // H)
            att = att.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf")).softmax(-1)
            y = (att @ v).transpose(1, 2).reshape(B, T, C)
            x = x + F.linear(y, m.attprojw, m.attprojb)
            h = F.layer_norm(x, (C,), m.ln2w, m.ln2b, cfg.ln_eps)
            x = x + F.linear(F.gelu(F.linear(h, m.fcw, m.fcb), approximate="tanh"), m.fcprojw, m.fcprojb)
        x = F.layer_norm(x, (C,), self.lnfw, self.lnfb, cfg.ln_eps)
        logits = x @ self.wte[:cfg.vocab_size].T
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1))
        return logits, loss

    def grads(self) -> dict[str, np.ndarray]:
        """Gradients in llm.c's 16-tensor layout (wte padded rows included)."""
        out = {"wte": self.wte.grad.numpy(), "wpe": self.wpe.grad.numpy(),
               "lnfw": self.lnfw.grad.numpy(), "lnfb": self.lnfb.grad.numpy()}
        for t in ["ln1w", "ln1b", "qkvw", "qkvb", "attprojw", "attprojb", "ln2w", "ln2b", "fcw", "fcb",
                  "fcprojw", "fcprojb"]:
            out[t] = np.stack([getattr(m, t).grad.numpy() for m in self.layers])
        return out
