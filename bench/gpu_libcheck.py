"""Device check and benchmark of the CUDA backend's library layer (cuBLASLt GEMMs, cuDNN SDPA).

    python bench/gpu_libcheck.py [--out DIR] [--quick]

On a CUDA GPU, for every GEMM plan GPT-2 124M needs (B16 T1024: M = 16384 tokens, C = 768;
fp32 and bf16) and for cuDNN's SDPA forward and backward (B16 H12 T1024 D64, bf16, Q/K/V
strided views of the packed qkv buffer, O and dO [B, T, H, D]), and for small odd shapes:

* correctness against PyTorch in float64 on the same (rounded) inputs, outputs poisoned with
  NaN first: ||out - ref|| / ||ref|| <= 1e-5 for fp32 GEMMs, <= 1e-2 for bf16 ones (the
  dtype the products are formed in: a bf16 GEMM landing in fp32, like the weight gradients,
  is a bf16 tensor-core GEMM, whose fp32 accumulation is not IEEE fp32 summation; its
  measured error is printed all the same) and for cuDNN's bf16 attention (O, dQ, dK, dV and
  the fp32 softmax stats it computes from bf16 inputs);
* determinism: a second run is bit-identical;
* CUDA-graph capture: the plan captured with ``torch.cuda.graph`` and replayed gives the same
  bits (torch is used only here, in the check: the plans take raw pointers and a stream);
* time (CUDA events, after warm-up) against torch's matmul / F.linear (+ GELU) and
  ``F.scaled_dot_product_attention``, TF32 off everywhere.

Prints one table and ``ALL OK`` (exit 0) or ``FAILED: ...`` (exit 1); with ``--out DIR`` also
writes the table as ``gpu_libcheck.md`` and the rows as ``gpu_libcheck.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import traceback
import zlib
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from graphc.backends.cuda import attention, gemm  # noqa: E402

TOL = {"fp32": 1e-5, "bf16": 1e-2}
TORCH_DTYPE = {"fp32": torch.float32, "bf16": torch.bfloat16}
ROWS: list[dict] = []
FAILURES: list[str] = []


def rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    out = out.double()
    if not torch.isfinite(out).all():
        return math.inf
    return float((out - ref).norm() / ref.norm().clamp_min(1e-300))


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16 if t.element_size() == 2 else torch.int32).clone()


def same_bits(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b))


def poison(*ts: torch.Tensor) -> None:
    for t in ts:
        t.fill_(float("nan"))


def cuda_time_ms(fn, stream: torch.cuda.Stream, iters: int, warmup: int = 3) -> float:
    torch.cuda.synchronize()
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            fn()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(stream)
        for _ in range(iters):
            fn()
        end.record(stream)
    end.synchronize()
    return start.elapsed_time(end) / iters


def host_us(fn, stream: torch.cuda.Stream, calls: int = 20) -> float:
    """Host time to enqueue one call (the GPU work is synchronised after, not timed)."""
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    with torch.cuda.stream(stream):
        for _ in range(calls):
            fn()
    elapsed = time.perf_counter() - t0
    torch.cuda.synchronize()
    return elapsed / calls * 1e6


def replay_bits(fn, outputs: list[torch.Tensor], reset, stream: torch.cuda.Stream) -> list[torch.Tensor]:
    """Capture ``fn`` in a CUDA graph, poison the outputs (``reset`` restores inputs that
    are also outputs), replay, and return the outputs' bits."""
    graph = torch.cuda.CUDAGraph()
    stream.synchronize()
    with torch.cuda.graph(graph, stream=stream):
        fn()
    torch.cuda.synchronize()
    poison(*outputs)
    reset()
    graph.replay()
    torch.cuda.synchronize()
    return [bits(t) for t in outputs]


def check(name: str, errors: dict[str, tuple[float, str]], deterministic: bool, replayed: bool) -> str:
    problems = [f"{k} {v:.2e} > {TOL[d]:g}" for k, (v, d) in errors.items() if not v <= TOL[d]]
    if not deterministic:
        problems.append("two runs differ")
    if not replayed:
        problems.append("graph replay differs")
    if problems:
        FAILURES.append(f"{name}: " + ", ".join(problems))
    return "ok" if not problems else "FAIL"


# --- GEMMs --------------------------------------------------------------------------------

def gelu_grad(x: torch.Tensor) -> torch.Tensor:
    c = math.sqrt(2 / math.pi)
    t = torch.tanh(c * (x + 0.044715 * x**3))
    return 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * c * (1 + 3 * 0.044715 * x * x)


def gemm_case(name: str, kind: str, M: int, N: int, K: int, dtype: str, epilogue: str, stream, iters: int,
              beta: float = 0.0) -> None:
    """kind: fwd (y = x W^T), dx (dx = dy W), dw (dW (+)= dy^T x); M tokens, N out, K in features."""
    dev, tdt = "cuda", TORCH_DTYPE[dtype]
    g = torch.Generator(device=dev).manual_seed(zlib.crc32(f"{name} {dtype}".encode()))

    def randn(*shape, scale=1.0, dt=tdt):
        return (torch.randn(*shape, device=dev, generator=g) * scale).to(dt)

    W = randn(N, K, scale=K**-0.5)
    if kind == "fwd":
        spec = gemm.linear_forward(M, N, K, dtype, epilogue=epilogue)
        x, b = randn(M, K), randn(N, scale=0.5)
        a_ptr, b_ptr = x, W
        out = torch.empty(M, N, device=dev, dtype=tdt)
        aux = torch.empty(M, N, device=dev, dtype=tdt) if gemm.EPILOGUES[epilogue].aux else None
        bias = b if gemm.EPILOGUES[epilogue].bias else None
        pre = x.double() @ W.double().T + (b.double() if bias is not None else 0)
        refs = {"y": gelu_ref(pre) if "gelu" in epilogue else pre}
        if aux is not None:
            refs["aux"] = pre

        def torch_fn():
            y = F.linear(x, W, bias)
            return F.gelu(y, approximate="tanh") if "gelu" in epilogue else y
    elif kind == "dx":
        spec = gemm.linear_backward_input(M, N, K, dtype, epilogue=epilogue)
        dy, pre = randn(M, N), randn(M, K)
        a_ptr, b_ptr = dy, W
        out = torch.empty(M, K, device=dev, dtype=tdt)
        kind_e = gemm.EPILOGUES[epilogue]
        aux = pre if kind_e.aux else None
        bias = torch.empty(K, device=dev, dtype=tdt) if kind_e.bias else None
        ref = dy.double() @ W.double()
        if kind_e.aux:
            ref = ref * gelu_grad(pre.double())
        refs = {"dx": ref}
        if bias is not None:
            refs["dbias"] = ref.sum(0)

        def torch_fn():
            d = dy @ W
            if kind_e.aux:
                d = torch.ops.aten.gelu_backward(d, pre, approximate="tanh")
            if kind_e.bias:
                d.sum(0)
            return d
    else:
        spec = gemm.linear_backward_weight(M, N, K, dtype, epilogue=epilogue)
        dy, x = randn(M, N), randn(M, K)
        a_ptr, b_ptr = dy, x
        dW0 = torch.randn(N, K, device=dev, generator=g)
        out = dW0.clone()
        aux = None
        bias = torch.empty(N, device=dev, dtype=torch.float32) if gemm.EPILOGUES[epilogue].bias else None
        refs = {"dW": beta * dW0.double() + dy.double().T @ x.double()}
        if bias is not None:
            refs["dbias"] = dy.double().sum(0)

        def torch_fn():
            out.add_(dy.t() @ x)
            if bias is not None:
                dy.sum(0)

    plan = gemm.GemmPlan(spec)
    ws = torch.empty(max(plan.workspace_size, 256), dtype=torch.uint8, device=dev)
    written = [out] + [t for t in (aux if kind == "fwd" else None, bias if kind != "fwd" else None) if t is not None]
    outputs = dict(zip(refs, written))
    accumulate = kind == "dw" and beta != 0  # out is C and D: restored, not poisoned

    def reset():
        if accumulate:
            out.copy_(dW0)

    def run():
        plan.run(torch.cuda.current_stream().cuda_stream, a_ptr.data_ptr(), b_ptr.data_ptr(), None, out.data_ptr(),
                 bias_ptr=None if bias is None else bias.data_ptr(), aux_ptr=None if aux is None else aux.data_ptr(),
                 workspace_ptr=ws.data_ptr(), workspace_size=ws.numel(), beta=beta)

    def run_once():
        poison(*written)
        reset()
        torch.cuda.synchronize()  # the side stream does not wait for the default one
        with torch.cuda.stream(stream):
            run()
        stream.synchronize()
        return [bits(t) for t in written]

    first = run_once()
    errors = {k: (rel(outputs[k], ref), dtype) for k, ref in refs.items()}
    second = run_once()
    replayed = replay_bits(run, written, reset, stream)
    status = check(f"{name} {dtype}", errors, same_bits(first, second), same_bits(first, replayed))
    reset()
    ms = cuda_time_ms(run, stream, iters)
    torch_ms = cuda_time_ms(torch_fn, stream, iters)
    ROWS.append(dict(case=name, dtype=dtype, shape=f"{spec.m}x{spec.n}x{spec.k}", epilogue=epilogue + (" beta=1" if beta else ""),
                     errors={k: v for k, (v, _) in errors.items()}, status=status, ms=ms, tflops=spec.flops / ms / 1e9,
                     torch_ms=torch_ms, speedup=torch_ms / ms, host_us=host_us(run, stream), workspace=plan.workspace_size))


def gelu_ref(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


def gemm_cases(M: int, C: int, iters: int):
    """GPT-2's GEMMs: (name, kind, M, N, K, epilogue, beta)."""
    return [
        ("qkv fwd", "fwd", M, 3 * C, C, "bias", 0.0),
        ("attn proj fwd", "fwd", M, C, C, "bias", 0.0),
        ("fc fwd (train)", "fwd", M, 4 * C, C, "gelu_aux_bias", 0.0),
        ("fc fwd (infer)", "fwd", M, 4 * C, C, "gelu_bias", 0.0),
        ("fc proj fwd", "fwd", M, C, 4 * C, "bias", 0.0),
        ("plain fwd", "fwd", M, 3 * C, C, "default", 0.0),
        ("qkv dx", "dx", M, 3 * C, C, "default", 0.0),
        ("fc proj dx dgelu", "dx", M, C, 4 * C, "dgelu", 0.0),
        ("fc proj dx dgelu+dbias", "dx", M, C, 4 * C, "dgelu_bgrad", 0.0),
        ("qkv dW+dbias", "dw", M, 3 * C, C, "bgrad_a", 1.0),
        ("fc dW+dbias", "dw", M, 4 * C, C, "bgrad_a", 1.0),
        ("fc proj dW+dbias", "dw", M, C, 4 * C, "bgrad_a", 1.0),
        ("fc proj dW", "dw", M, C, 4 * C, "default", 0.0),
    ] + ([] if M < 1024 else [  # the tied lm head, vocabulary padded to 50304 as llm.c does
        ("lm head fwd", "fwd", M, 50304, C, "default", 0.0),
        ("lm head dx", "dx", M, 50304, C, "default", 0.0),
        ("lm head dW (wte, accumulated)", "dw", M, 50304, C, "default", 1.0),
    ])


# --- SDPA ---------------------------------------------------------------------------------

def sdpa_case(B: int, H: int, T: int, D: int, stream, iters: int) -> None:
    dev = "cuda"
    name = f"sdpa B{B} H{H} T{T} D{D}"
    spec = attention.gpt2_spec(B, H, T, D)
    g = torch.Generator(device=dev).manual_seed(B * 1000 + T)
    qkv = torch.randn(B, T, 3, H, D, device=dev, generator=g).to(torch.bfloat16)
    dout = torch.randn(B, T, H, D, device=dev, generator=g).to(torch.bfloat16)
    o = torch.empty(B, T, H, D, device=dev, dtype=torch.bfloat16)
    stats = torch.empty(B, H, T, 1, device=dev, dtype=torch.float32)
    dqkv = torch.empty_like(qkv)
    fwd, bwd = attention.SdpaForwardPlan(spec), attention.SdpaBackwardPlan(spec)
    ws = torch.empty(max(fwd.workspace_size, bwd.workspace_size, 256), dtype=torch.uint8, device=dev)
    q, k, v = attention.packed_qkv_pointers(qkv.data_ptr(), spec)
    dq, dk, dv = attention.packed_qkv_pointers(dqkv.data_ptr(), spec)

    def run_fwd():
        fwd.run(torch.cuda.current_stream().cuda_stream, q, k, v, o.data_ptr(), stats.data_ptr(), workspace_ptr=ws.data_ptr())

    def run_bwd():
        bwd.run(torch.cuda.current_stream().cuda_stream, q, k, v, o.data_ptr(), dout.data_ptr(), stats.data_ptr(),
                dq, dk, dv, workspace_ptr=ws.data_ptr())

    def run_both():
        poison(o, stats, dqkv)
        torch.cuda.synchronize()
        with torch.cuda.stream(stream):
            run_fwd()
            run_bwd()
        stream.synchronize()
        return [bits(o), bits(stats), bits(dqkv)]

    first = run_both()
    # float64 reference from the same bf16 inputs
    qd, kd, vd = (qkv[:, :, j].transpose(1, 2).double().requires_grad_(True) for j in range(3))
    scores = (qd @ kd.transpose(-1, -2)) * spec.scale
    causal = torch.ones(T, T, dtype=torch.bool, device=dev).tril()
    scores = scores.masked_fill(~causal, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1, keepdim=True)
    ref_o = torch.softmax(scores, dim=-1) @ vd
    grads = torch.autograd.grad(ref_o, (qd, kd, vd), dout.transpose(1, 2).double())
    errors = {"O": (rel(o.transpose(1, 2), ref_o.detach()), "bf16"), "stats": (rel(stats, lse.detach()), "bf16")}
    for j, gname in enumerate(("dQ", "dK", "dV")):
        errors[gname] = (rel(dqkv[:, :, j].transpose(1, 2), grads[j]), "bf16")
    del qd, kd, vd, scores, lse, ref_o, grads
    second = run_both()

    def both():
        run_fwd()
        run_bwd()
    replayed = replay_bits(both, [o, stats, dqkv], lambda: None, stream)
    status = check(name, errors, same_bits(first, second), same_bits(first, replayed))

    fwd_ms = cuda_time_ms(run_fwd, stream, iters)
    bwd_ms = cuda_time_ms(run_bwd, stream, iters)
    tq, tk, tv = (qkv[:, :, j].transpose(1, 2).detach().requires_grad_(True) for j in range(3))
    tdo = dout.transpose(1, 2)

    def torch_fwd():
        with torch.no_grad():
            F.scaled_dot_product_attention(tq, tk, tv, is_causal=True)

    def torch_fwd_bwd():
        out = F.scaled_dot_product_attention(tq, tk, tv, is_causal=True)
        torch.autograd.grad(out, (tq, tk, tv), tdo)
    torch_fwd_ms = cuda_time_ms(torch_fwd, stream, iters)
    torch_bwd_ms = cuda_time_ms(torch_fwd_bwd, stream, iters) - torch_fwd_ms
    flops = spec.forward_flops()
    shape = f"B{B} H{H} T{T} D{D}"
    common = dict(dtype="bf16", shape=shape, status=status, errors={k: v for k, (v, _) in errors.items()})
    ROWS.append(dict(case="sdpa fwd", epilogue="causal, stats", ms=fwd_ms, tflops=flops / fwd_ms / 1e9, torch_ms=torch_fwd_ms,
                     speedup=torch_fwd_ms / fwd_ms, workspace=fwd.workspace_size, plan=fwd.plan_name,
                     host_us=host_us(run_fwd, stream), **common))
    ROWS.append(dict(case="sdpa bwd", epilogue="deterministic", ms=bwd_ms, tflops=2.5 * flops / bwd_ms / 1e9,
                     torch_ms=torch_bwd_ms, speedup=torch_bwd_ms / bwd_ms, workspace=bwd.workspace_size,
                     plan=bwd.plan_name, host_us=host_us(run_bwd, stream), **common))


# --- report -------------------------------------------------------------------------------

def table() -> str:
    head = ("| case | dtype | shape (m x n x k) | epilogue | rel err vs fp64 | checks | ms | TFLOP/s | torch ms | "
            "vs torch | host us/call |")
    lines = [head, "| --- | --- | --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in ROWS:
        errs = ", ".join(f"{k} {v:.1e}" for k, v in r["errors"].items())
        lines.append(f"| {r['case']} | {r['dtype']} | {r['shape']} | {r['epilogue']} | {errs} | {r['status']} | "
                     f"{r['ms']:.3f} | {r['tflops']:.0f} | {r['torch_ms']:.3f} | {r['speedup']:.2f}x | {r['host_us']:.0f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, help="write gpu_libcheck.md / .json here")
    ap.add_argument("--quick", action="store_true", help="small shapes only (no GPT-2 124M sizes)")
    ap.add_argument("--iters", type=int, default=20)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("error: gpu_libcheck: no CUDA device", file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = False
    torch.zeros(1, device="cuda")  # the primary context, current before any plan is built
    import cudnn
    from nvmath.bindings import cublasLt
    print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}, cuBLASLt {cublasLt.get_version()}, "
          f"cuDNN {cudnn.backend_version_string()}, cudnn-frontend {cudnn.__version__}", flush=True)
    stream = torch.cuda.Stream()
    shapes = [(37, 24), (16384, 768)] if not args.quick else [(37, 24)]
    for M, C in shapes:
        for dtype in ("fp32", "bf16"):
            for name, kind, m, n, k, epilogue, beta in gemm_cases(M, C, args.iters):
                if M < 1024 and name.startswith("plain"):
                    continue
                label = name if M >= 1024 else f"{name} (small)"
                rows = len(ROWS)
                try:
                    gemm_case(label, kind, m, n, k, dtype, epilogue, stream, args.iters, beta)
                except Exception as e:  # keep checking the rest; the failure is reported
                    traceback.print_exc()
                    FAILURES.append(f"{label} {dtype}: {type(e).__name__}: {e}")
                print(f"  {label} {dtype} {epilogue}: {ROWS[-1]['status'] if len(ROWS) > rows else 'ERROR'}", flush=True)
    sdpa_shapes = [(2, 4, 128, 64)] + ([] if args.quick else [(16, 12, 1024, 64)])
    for B, H, T, D in sdpa_shapes:
        try:
            sdpa_case(B, H, T, D, stream, args.iters)
            print(f"  sdpa B{B} H{H} T{T} D{D}: {ROWS[-1]['status']} (fwd plan {ROWS[-2]['plan']}, "
                  f"bwd plan {ROWS[-1]['plan']})", flush=True)
        except Exception as e:
            traceback.print_exc()
            FAILURES.append(f"sdpa B{B} H{H} T{T} D{D}: {type(e).__name__}: {e}")
    text = table()
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "gpu_libcheck.md").write_text(text + "\n")
        (args.out / "gpu_libcheck.json").write_text(json.dumps(dict(rows=ROWS, failures=FAILURES), indent=1))
    if FAILURES:
        print("FAILED: " + "; ".join(FAILURES))
        return 1
    print("ALL OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
