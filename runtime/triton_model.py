"""graphc's model for NVIDIA Triton's Python backend: the batched Decoder, streaming.

``graphc export --triton-repo DIR`` copies this file to ``DIR/<name>/1/model.py`` beside the
weights (``model.safetensors`` + ``config.json``) and, when given, the tokenizer files
(``tokenizer/vocab.bpe`` + ``encoder.json``). Triton's Python backend runs it in its stub
process with the first ``python3`` on the server's ``PATH`` (or the environment named by
``EXECUTION_ENV_PATH``), where graphc must be importable (README: "Triton model repository").

The model is *decoupled* (``model_transaction_policy { decoupled: true }``): ``execute``
only parses each request into a :class:`~graphc.runtime.serving.engine.Job` and returns;
graphc's continuous-batching :class:`~graphc.runtime.serving.engine.Engine` (the one
``graphc serve`` drives) runs the :class:`~graphc.runtime.decode.Decoder` on its own thread
and every generated token goes back at once as one response (``text_output``: the new text,
``output_ids``: the token), then a response carrying only the final flag. So requests join
and leave the running batch between decode steps, each sampled by its own seeded sampler:
a request's tokens do not depend on what else runs.

Tensor names follow Triton's LLM examples (the vLLM backend and TensorRT-LLM's ensemble):
inputs ``text_input`` or ``input_ids``, ``max_tokens``, ``temperature``, ``top_k``,
``top_p``, ``seed``; outputs ``text_output``, ``output_ids``. A bad request gets one error
response (``<field>: <what>``) carrying the final flag. End of text ends the stream and is not
sent as a token, as ``graphc serve`` does.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

try:
    import triton_python_backend_utils as pb_utils  # provided by Triton's Python backend
except ImportError:  # imported outside Triton: tests, linters, the repository writer
    pb_utils = None

DEFAULTS = {"max_tokens": 16, "temperature": 1.0, "top_k": 0, "top_p": 1.0, "seed": 0}
"""Request fields left out take these values (``graphc serve``'s defaults; temperature 0 = greedy)."""


def model_parameters(model_config: dict) -> dict[str, str]:
    """The ``parameters`` of ``config.pbtxt`` (as Triton hands the config over, JSON) as plain strings."""
    return {key: value["string_value"] for key, value in model_config.get("parameters", {}).items()}


class TritonPythonModel:
    """What Triton's Python backend loads: ``initialize``, ``execute``, ``finalize``."""

    def initialize(self, args: dict) -> None:
        from graphc.backends import get_backend
        from graphc.data.tokenizer import Tokenizer
        from graphc.models.load import load_model
        from graphc.runtime.decode import DecodeSpec
        from graphc.runtime.serving.engine import Engine

        here = Path(__file__).resolve().parent
        config = json.loads(args["model_config"])
        settings = model_parameters(config)
        params = load_model(here)
        tokenizer_dir = here / "tokenizer"
        self.tokenizer = Tokenizer(tokenizer_dir=tokenizer_dir if tokenizer_dir.is_dir() else None)
        self.context = int(settings.get("context") or params.cfg.max_seq_len)
        backend = get_backend(settings.get("backend", "onnxruntime"))()
        decoder = backend.decoder(backend.upload_params(params),
                                  DecodeSpec(int(settings.get("max_batch", 8)), self.context,
                                             settings.get("precision", "fp32")))
        self.vocab_size = params.cfg.vocab_size
        self.engine = Engine(decoder, eot=self.tokenizer.eot,
                             max_queue=int(settings.get("max_queue", 256))).start()

    def execute(self, requests):
        from graphc.errors import GraphcError
        from graphc.runtime.serving.engine import QueueFull

        for request in requests:
            sender = request.get_response_sender()
            try:
                self.engine.submit(self._job(request, sender))
            except GraphcError as e:
                _fail(sender, e.one_line(), pb_utils.TritonError.INVALID_ARG)
            except QueueFull as e:
                _fail(sender, f"queue full: {e}", pb_utils.TritonError.UNAVAILABLE)
        return None  # decoupled: the responses go through each request's sender

    def finalize(self) -> None:
        self.engine.stop()   # running and queued requests get an error response and the final flag

    # ------------------------------------------------------------------ requests
    def _job(self, request, sender):
        from graphc.runtime.sampling import Sampler
        from graphc.runtime.serving.app import ChoiceText
        from graphc.runtime.serving.engine import Job

        prompt = self._prompt(request)
        fields = {name: _scalar(request, name, default) for name, default in DEFAULTS.items()}
        max_tokens = int(fields["max_tokens"])
        if max_tokens < 1:
            raise _bad("max_tokens", f"must be >= 1, got {max_tokens}")
        if len(prompt) + max_tokens > self.context:
            raise _bad("max_tokens", f"the prompt's {len(prompt)} tokens + max_tokens {max_tokens} exceed the "
                                     f"context of {self.context} positions")
        sampler = _sampler(Sampler, fields)
        text = ChoiceText(self.tokenizer, stop=[])
        eot = self.tokenizer.eot
        job = None

        def emit(sampled, finish):   # on the engine thread
            if sender.is_cancelled():
                self.engine.cancel(job)   # frees the slot; nothing more is emitted
                sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
                return
            text.add(sampled, finish, eot)
            if sampled is not None and not (finish == "stop" and sampled.token == eot):
                sender.send(pb_utils.InferenceResponse(output_tensors=[
                    pb_utils.Tensor("text_output", np.array([text.delta().encode()], dtype=np.object_)),
                    pb_utils.Tensor("output_ids", np.array([sampled.token], dtype=np.int32))]))
            if finish == "abort":
                _fail(sender, "the model is being unloaded", pb_utils.TritonError.UNAVAILABLE)
            elif finish is not None and finish.startswith("error"):
                _fail(sender, finish.removeprefix("error: "), pb_utils.TritonError.INTERNAL)
            elif finish is not None:
                sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

        job = Job(prompt=prompt, max_tokens=max_tokens, sampler=sampler, emit=emit)
        return job

    def _prompt(self, request) -> list[int]:
        text = pb_utils.get_input_tensor_by_name(request, "text_input")
        ids = pb_utils.get_input_tensor_by_name(request, "input_ids")
        if (text is None) == (ids is None):
            raise _bad("text_input", "give exactly one of text_input and input_ids")
        if text is not None:
            values = text.as_numpy().reshape(-1)
            if values.size != 1:
                raise _bad("text_input", f"expected one string, got {values.size}")
            value = values[0]
            prompt = self.tokenizer.encode(value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value))
            field = "text_input"
        else:
            prompt = [int(i) for i in ids.as_numpy().reshape(-1)]
            field = "input_ids"
        if not prompt:
            raise _bad(field, "the prompt is empty")
        bad = [i for i in prompt if not 0 <= i < self.vocab_size]
        if bad:
            raise _bad(field, f"token id {bad[0]} is outside the vocabulary (0..{self.vocab_size - 1})")
        return prompt


def _bad(field: str, message: str):
    from graphc.errors import GraphcError

    return GraphcError(None, message, field)


def _scalar(request, name: str, default):
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        return default
    values = tensor.as_numpy().reshape(-1)
    if values.size != 1:
        raise _bad(name, f"expected one value, got {values.size}")
    return values[0].item()


def _sampler(sampler_class, fields: dict):
    """The request's seeded sampler; a bad setting names the request field (not a CLI flag)."""
    from graphc.errors import GraphcError

    try:
        return sampler_class(float(fields["temperature"]), int(fields["top_k"]) or None, float(fields["top_p"]),
                             int(fields["seed"]))
    except GraphcError as e:
        raise _bad((e.field or "").lstrip("-").replace("-", "_"), e.message) from None


def _fail(sender, message: str, code) -> None:
    """One error response carrying the final flag."""
    sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(message, code)),
                flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
