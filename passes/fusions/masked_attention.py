"""Fuse attention under an arbitrary boolean mask into ``Attention(Q, K, V, attn_mask)``.

The same pattern as :mod:`graphc.passes.fusions.attention` (scores, scale, ``Where(mask,
s, -inf)``, softmax, ``@ V``), for masks that are *not* the plain causal one -- the KV-cache
decode graph's ``key slot j <= past_len[b] + i`` mask, [B, 1, S, capacity]. ONNX
``Attention``'s boolean ``attn_mask`` means exactly "True: this key takes part", so::

    softmax(Where(mask, scale * Q Kᵀ, -inf)) V  ==  Attention(Q, K, V, mask, scale=scale)

A plain causal mask still becomes ``is_causal=1`` (as in the causal fusion). The mask must
be boolean and 4-D (what TensorRT's Attention accepts). TensorRT's backend runs this
fusion in its legalisation so that decode attention also reaches IAttention's fused MHA.
"""

from __future__ import annotations

from onnx import TensorProto, helper

from graphc.passes.fusions.attention import AttentionFusion
from graphc.passes.fusions.pattern import FusionPass, Match, NoMatch, Rewrite, expect


class MaskedAttentionFusion(AttentionFusion):
    name = "masked_attention"

    def _check_causal(self, m: Match, mask: str, tq, tk) -> None:
        try:
            super()._check_causal(m, mask, tq, tk)
        except NoMatch:
            idx = m.idx
            expect(idx.dtype(mask) == TensorProto.BOOL, "the mask is not boolean")
            expect(idx.rank(mask) == 4, f"the mask is not 4-D (rank {idx.rank(mask)})")
            m.values["attn_mask"] = mask

    def rewrite(self, m: Match) -> Rewrite:
        v = m.values
        if "attn_mask" not in v:
            return super().rewrite(m)
        node = helper.make_node("Attention", [v["q"], v["k"], v["v"], v["attn_mask"]], [m.root_node.output[0]],
                                is_causal=0, scale=v["scale"])
        return Rewrite([node])


def fuse_masked_attention() -> FusionPass:
    return FusionPass(MaskedAttentionFusion())
