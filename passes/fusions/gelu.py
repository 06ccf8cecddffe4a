"""Fuse the tanh-approximated GELU into the standard ``Gelu(approximate="tanh")`` (opset 20).

Math::

    gelu(x) = 0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 * x^3)))

Spelled in primitive ops the products may be grouped and ordered any way (llm.c's order
is Mul(Mul(x, 0.5), Add(Tanh(...), 1))), so the matcher *flattens* each tree of Mul
nodes into its factors (following only single-use interior Muls) and checks the
multiset of factors instead of one fixed tree:

* the root product's factors are: scalar constants multiplying to 0.5, exactly one
  ``Add(Tanh(u), 1)`` and exactly one more factor x;
* ``u``'s factors are: constants multiplying to sqrt(2/pi) and one ``Add(x, cube)``;
* ``cube``'s factors are: constants multiplying to 0.044715 and x three times (or one
  ``Pow(x, 3)``), all the same x as in the root product.

Constants must agree to a relative 1e-5 (a different constant is a different function).
Bias + GELU is left as Gemm(bias) + Gelu on purpose; see ``graphc/ops/gelu.py``.
"""

from __future__ import annotations

from onnx import helper

from graphc.ops.gelu import GELU_A as A, GELU_S as S
from graphc.passes.fusions.pattern import (
    Fusion, FusionPass, GraphIndex, Match, NoMatch, Rewrite, close, commuted, expect, flatten_product,
    split_constants,
)

class GeluTanhFusion(Fusion):
    name = "gelu"
    anchors = ("Mul",)

    def match(self, idx: GraphIndex, root: int) -> Match:
        m = Match(idx, root)
        c, rest = split_constants(idx, flatten_product(m, idx.nodes[root].output[0], root=True))
        expect(close(c, 0.5), f"the constant factor is {c}, not 0.5")
        expect(len(rest) == 2, f"the product has {len(rest)} non-constant factors, not 2 (x and 1 + tanh)")
        reasons = []
        for x, onep in (rest, rest[::-1]):
            mm = m.fork()
            try:
                self._one_plus_tanh(mm, onep, x)
                mm.values["x"] = x
                return mm
            except NoMatch as e:
                reasons.append(str(e))
        raise NoMatch(" | ".join(reasons))

    def _one_plus_tanh(self, m: Match, onep: str, x: str) -> None:
        idx = m.idx
        add = m.take(onep, "Add", "1 + tanh")
        for t, one in commuted(add):
            if close(idx.scalar(one), 1.0):
                break
        else:
            raise NoMatch("the Add is not (tanh + 1)")
        tanh = m.take(t, "Tanh")
        expect(len(idx.uses(tanh.output[0])) == 1, "tanh is used elsewhere")
        c, rest = split_constants(idx, flatten_product(m, tanh.input[0]))
        expect(close(c, S), f"the tanh argument's scale is {c}, not sqrt(2/pi)")
        expect(len(rest) == 1, "the tanh argument is not c * (x + a x^3)")
        inner = m.take(rest[0], "Add", "x + a x^3")
        for xx, cube in commuted(inner):
            if xx != x:
                continue
            c3, fs = split_constants(idx, flatten_product(m, cube))
            expect(close(c3, A), f"the cubic coefficient is {c3}, not 0.044715")
            if len(fs) == 1:
                pw = m.take(fs[0], "Pow", "x^3")
                expect(pw.input[0] == x and idx.scalar(pw.input[1]) == 3.0, "the cube is not Pow(x, 3)")
            else:
                expect(fs == [x, x, x], "the cube is not x * x * x")
            return
        raise NoMatch("the tanh argument does not add x to a x^3 of the same x")

    def rewrite(self, m: Match) -> Rewrite:
        return Rewrite([helper.make_node("Gelu", [m.values["x"]], [m.root_node.output[0]], approximate="tanh")])


def fuse_gelu() -> FusionPass:
    return FusionPass(GeluTanhFusion())
