"""What TensorRT built: its layer report, and which attentions became fused MHA kernels.

Built with ``ProfilingVerbosity.DETAILED``, the builder logs (at VERBOSE) one line per
engine layer::

    Name: _gemm_mha_v2_myl0_9, LayerType: kgen, Inputs: [...], Outputs: [...],
    TacticName: _gemm_mha_v2_0xef04..., StreamId: 0, Metadata: [ONNX Layer: attention_1]

The ``Metadata`` tags each engine layer with the ONNX nodes it came from, so an ONNX
``Attention`` node counts as *fused* when an engine layer tagged with it runs a fused
multi-head-attention kernel (``_gemm_mha_v2``, ``fmha``, flash attention), and as
decomposed when it became GEMMs and a softmax kernel. The engine inspector
(:func:`layers_from_inspector`) gives the same records where an engine can be
deserialized; both are read, nothing is assumed.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

FUSED_MHA = re.compile(r"mha|flash|fmha|sdpa", re.IGNORECASE)
_LAYER_LINE = re.compile(r"^Name: (?P<name>.*?), LayerType: (?P<type>[^,]*),.*?"
                         r"TacticName: (?P<tactic>[^,]*),.*?Metadata: (?P<meta>.*)$")
_ONNX_TAG = re.compile(r"\[ONNX Layer: ([^\]]*)\]")


@dataclass(frozen=True)
class EngineLayer:
    name: str
    layer_type: str
    tactic: str
    onnx_nodes: tuple[str, ...]

    @property
    def fused_attention(self) -> bool:
        return bool(FUSED_MHA.search(self.name) or FUSED_MHA.search(self.tactic))


def layers_from_log(messages: list[str]) -> list[EngineLayer]:
    """Engine layers from the builder's verbose log (the message that starts ``Layers:``)."""
    layers = []
    for message in messages:
        if not message.startswith("Layers:"):
            continue
        for line in message.splitlines()[1:]:
            m = _LAYER_LINE.match(line.strip())
            if m:
                layers.append(EngineLayer(m["name"], m["type"].strip(), m["tactic"].strip(),
                                          tuple(_ONNX_TAG.findall(m["meta"]))))
    return layers


def layers_from_inspector(flavor, engine) -> list[EngineLayer]:
    """Engine layers from the engine inspector (needs a deserialized engine)."""
    trt = flavor.trt
    inspector = engine.create_engine_inspector()
    info = json.loads(inspector.get_engine_information(trt.LayerInformationFormat.JSON))
    layers = []
    for rec in info.get("Layers", []):
        if isinstance(rec, str):
            layers.append(EngineLayer(rec, "", "", ()))
            continue
        meta = rec.get("Metadata", "")
        layers.append(EngineLayer(rec.get("Name", ""), str(rec.get("LayerType", "")), str(rec.get("TacticName", "")),
                                  tuple(_ONNX_TAG.findall(meta))))
    return layers


def fused_attention_nodes(layers: list[EngineLayer], attention_nodes: list[str]) -> list[str]:
    """The ONNX attention nodes (of ``attention_nodes``) some fused MHA kernel came from."""
    fused = {tag for layer in layers if layer.fused_attention for tag in layer.onnx_nodes}
    return [n for n in attention_nodes if n in fused]
