"""llm-compressor baseline: GPTQ / SparseGPT on the same model and calibration tokens as llmopt.

Runs with the separate llm-compressor venv (NOT llmopt's .venv; this script never imports llmopt)
and writes a plain float32 Hugging Face folder (dequantized / pruned dense weights) that llmopt's
transformers 4.57 loads with ``AutoModelForCausalLM.from_pretrained(out)``.

Environment (/work/llmc-venv, outside the repo; llm-compressor needs transformers 5.x, which
conflicts with llmopt's transformers 4.57 pin)::

    python3 -m venv /work/llmc-venv
    /work/llmc-venv/bin/pip install torch==2.13.0                      # CPU wheel from local disk
    /work/llmc-venv/bin/pip install llmcompressor==0.14.0.1 torch==2.13.0

Version decision: no conflict. llmcompressor 0.14.0.1 accepts torch 2.13.0 as is (the resolver kept
the CPU build; nothing was downgraded). Installed: llmcompressor 0.14.0.1, compressed-tensors 0.19.0,
transformers 5.17.0 (llmcompressor pins >=5.15,<=5.17), torch 2.13.0+cpu, accelerate 1.15.0,
datasets 5.2.0. Versions are printed at start.

Usage (32 x 512 calibration windows written by llmopt as an (N, L) int64 tensor)::

    MODEL=$(ls -d ~/.cache/llmopt/gguf/SmolLM2-135M-Instruct.Q4_1-*/)
    /work/llmc-venv/bin/python eval/llmcompressor_baseline.py --model-dir "$MODEL" \
        --calib-ids calib_32x512.pt --method gptq-w4g64 --output out/llmc-gptq-w4g64
    # --method: gptq-w4g64 | gptq-w4g32 | gptq-w3g64 | gptq-w8g32 | gptq-w4g32-asym | gptq-w8 | sparsegpt-50 | ...

Layer-by-layer mode (no model, no pipeline): ``--hessians FILE.pt`` holds {name: {"W": (out, in),
"H": (in, in)}} saved by ``bench_llmcompressor.py --layerwise``; each Linear is quantized by
llm-compressor's own GPTQ function (``llmcompressor.modifiers.gptq.gptq_quantize.quantize_weight``) with
the scales of its default weight observer (``memoryless_minmax``), exactly as ``GPTQModifier`` calls
them, and {name: dequantized W} is saved to ``--output`` (a .pt file)::

    /work/llmc-venv/bin/python eval/llmcompressor_baseline.py --hessians h.pt --bits 3 --group-size 64 \
        --actorder weight --output llmc_q.pt

The last stdout line is JSON: {"method", "oneshot_seconds" (the oneshot() call alone: no model load,
no save), "peak_rss_mib" (ru_maxrss of this process, model load included), ...}.

What llm-compressor 0.14 does (read from its source, llmcompressor/modifiers/gptq/*.py,
pruning/sparsegpt/*.py, pipelines/sequential/pipeline.py, datasets/utils.py):

* Calibration data: a ``datasets.Dataset`` with an ``input_ids`` column is used as already
  tokenized (no re-tokenization); ``shuffle_calibration_samples=False`` selects LengthAwareSampler
  (order by length; all windows have length L, so all N are used), batch_size=1, the truncation
  collator with max_seq_length=L is a no-op. attention_mask is all ones (no padding).
* Pipeline: "sequential", one LlamaDecoderLayer at a time; the inputs of layer i+1 are the outputs
  of the already compressed layers 0..i (propagate_error=True). Inside a layer all Linears get
  their Hessians from ONE forward pass of the uncompressed layer: i.e. NOT "true sequential"
  (o_proj / down_proj do not see the quantized q/k/v / gate/up).
* GPTQ: dampening_frac=0.01 (fraction of mean(diag H) added to diag H; the class docstring's yaml
  says 0.001 but the field default is 0.01), block_size=128, Hessian in float32. Group scales are
  STATIC: computed before GPTQ from the original weights by the "memoryless_minmax" observer
  (no MSE / clipping search); symmetric int b: scale = max|w| / ((2^b - 1) / 2), codes in
  [-2^(b-1), 2^(b-1)-1], scale kept in float32. Default actorder is "static" (= "weight": columns
  walked by decreasing diag(H), groups stay contiguous in the original order); ``--actorder none``
  walks columns in order. lm_head is ignored (tied embeddings are never quantized).
* SparseGPT: dampening_frac=0.01, block_size=128; unstructured 50% selects the mask per block of 128
  columns over all rows (as in the paper); 2:4 picks 2 of every 4 consecutive input columns per row.
  Targets: the decoder layers (every Linear inside them); lm_head ignored.

Saving: llm-compressor's own ``save_pretrained(save_compressed=False)`` (checked with 0.14.0.1) writes
the same dense fake-quantized float32 weights, but adds 420 weight_scale / weight_zero_point tensors
and a compressed-tensors ``quantization_config`` (format "dense") to config.json; transformers 4.57
then refuses to load it (ImportError: compressed_tensors is not installed). So this script writes
model.safetensors with exactly the tensor names and dtypes of the input folder, taken from the
compressed model (bit-identical to the weights in llm-compressor's save), and copies config.json,
tokenizer and generation files verbatim from --model-dir (llmopt_gguf.json is not copied).
``--llmc-save DIR`` additionally writes llm-compressor's own save_compressed=False output.

Checks printed after saving: GPTQ - every contiguous group of G input columns of every quantized
Linear holds <= 2^b distinct values and W / weight_scale is an integer code in [-2^(b-1), 2^(b-1)-1];
SparseGPT - overall sparsity of the decoder Linears and, for 2:4, that every group of 4 input
columns has >= 2 zeros (groups with more zeros must already have had them in the input weights:
the bundled model is dequantized Q4_1, so a few weights are exactly 0).

CPU cost: llm-compressor's GPTQ inner loop (gptq_block_update, eager backend on CPU) calls
compressed-tensors' fake_quantize once per column, so the quantization itself takes minutes on CPU
(~470 s for SmolLM2-135M on one busy core, nearly independent of the calibration size); SparseGPT's
loop is plain torch and takes seconds.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import os
import resource
import shutil
import sys
import time

import torch

METHODS = {
    "gptq-w4g64": ("gptq", 4, 64),
    "gptq-w4g32": ("gptq", 4, 32),
    "gptq-w3g64": ("gptq", 3, 64),
    # the nearest schemes to llmopt's GGUF and per-channel configs, for --timing (bench_llmcompressor.py)
    "gptq-w8g32": ("gptq", 8, 32),  # q8_0: 8-bit symmetric blocks of 32
    "gptq-w4g32-asym": ("gptq", 4, 32),  # q4_1: 4-bit blocks of 32 with a min (see ASYMMETRIC)
    "gptq-w8": ("gptq", 8, None),  # int8 per output channel (group None)
    "sparsegpt-50": ("sparsegpt", "0:0", None),
    "sparsegpt-2of4": ("sparsegpt", "2:4", None),
}
ASYMMETRIC = {"gptq-w4g32-asym"}  # methods with a zero-point; all others symmetric
DAMP = 0.01  # llm-compressor 0.14 default for both GPTQModifier and SparseGPTModifier
BLOCK = 128
SKIP_FILES = {"llmopt_gguf.json", "model.safetensors.index.json"}


def log(msg: str) -> None:
    print(msg, flush=True)


def versions() -> dict:
    out = {"python": sys.version.split()[0]}
    for pkg in ("llmcompressor", "compressed-tensors", "transformers", "torch", "accelerate", "datasets"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


def build_recipe(method: str, actorder: str):
    kind, a, b = METHODS[method]
    if kind == "gptq":
        from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
        from llmcompressor.modifiers.gptq import GPTQModifier

        weights = QuantizationArgs(
            num_bits=a,
            type="int",
            symmetric=method not in ASYMMETRIC,
            strategy="group" if b else "channel",
            group_size=b,
            dynamic=False,
        )
        scheme = QuantizationScheme(
            targets=["Linear"], weights=weights, input_activations=None, output_activations=None
        )
        kw = {} if actorder == "default" else {"actorder": None if actorder == "none" else actorder}
        return GPTQModifier(
            config_groups={"group_0": scheme}, ignore=["lm_head"], block_size=BLOCK, dampening_frac=DAMP, **kw
        )
    from llmcompressor.modifiers.pruning.sparsegpt import SparseGPTModifier

    return SparseGPTModifier(
        sparsity=0.5,
        mask_structure=a,
        targets=[r"re:model\.layers\.\d+$"],  # decoder layers: every Linear inside them
        ignore=["re:.*lm_head"],
        block_size=BLOCK,
        dampening_frac=DAMP,
    )


def distinct_per_group(W: torch.Tensor, g: int) -> int:
    """Max number of distinct values in any contiguous group of g input columns (any row)."""
    x = W.reshape(W.shape[0], W.shape[1] // g, g).reshape(-1, g)
    s, _ = torch.sort(x, dim=1)
    return int(((s[:, 1:] != s[:, :-1]).sum(1) + 1).max())


def check_gptq(model, out_sd: dict, bits: int, g: int | None, symmetric: bool = True) -> dict:
    # symmetric: codes W / scale in [−2ᵇ⁻¹, 2ᵇ⁻¹ − 1]; with a zero-point W / scale = q − z, anywhere in ±(2ᵇ − 1)
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if symmetric else (-(2**bits - 1), 2**bits - 1)
    max_distinct, max_off, code_min, code_max, n = 0, 0.0, 0, 0, 0
    for name, mod in model.named_modules():
        if not isinstance(mod, torch.nn.Linear) or name == "lm_head":
            continue
        W = out_sd[name + ".weight"].float()
        width = g or W.shape[1]  # per channel: one group per row
        max_distinct = max(max_distinct, distinct_per_group(W, width))
        scale = getattr(mod, "weight_scale", None)
        if scale is not None:
            s = scale.detach().float().repeat_interleave(width, dim=1)
            q = W / s
            max_off = max(max_off, float((q - q.round()).abs().max()))
            code_min, code_max = min(code_min, int(q.round().min())), max(code_max, int(q.round().max()))
        n += 1
    return {
        "linears": n,
        "max_distinct_per_group": max_distinct,
        "allowed": 2**bits,
        "max_abs_code_offgrid": max_off,
        "code_range": [code_min, code_max],
        "code_range_allowed": [lo, hi],
        "ok": max_distinct <= 2**bits and max_off < 1e-3 and lo <= code_min and code_max <= hi,
    }


def check_sparse(model, out_sd: dict, structure: str, src_st: str) -> dict:
    from safetensors import safe_open

    zeros = total = 0
    fewer, more, more_unexplained = 0, 0, 0
    with safe_open(src_st, "pt") as src:
        for name, mod in model.named_modules():
            if not isinstance(mod, torch.nn.Linear) or name == "lm_head":
                continue
            W = out_sd[name + ".weight"]
            zeros += int((W == 0).sum())
            total += W.numel()
            if structure == "2:4":
                z = (W.reshape(W.shape[0], -1, 4) == 0).sum(-1)
                fewer += int((z < 2).sum())
                extra = z > 2
                if extra.any():
                    more += int(extra.sum())
                    z0 = (src.get_tensor(name + ".weight").reshape(W.shape[0], -1, 4) == 0).sum(-1)
                    more_unexplained += int((extra & (z0 < z)).sum())
    out = {"sparsity": zeros / total}
    if structure == "2:4":
        out.update(
            {
                "groups_of_4_with_lt_2_zeros": fewer,
                "groups_of_4_with_gt_2_zeros": more,
                "gt_2_not_already_zero_in_input": more_unexplained,
                "ok": fewer == 0 and more_unexplained == 0,
            }
        )
    else:
        out["ok"] = abs(zeros / total - 0.5) < 0.01
    return out


def layerwise(path: str, bits: int, group_size: int, actorder: str, output: str) -> None:
    """llm-compressor's GPTQ on saved (W, H) pairs: its observer's scales, its quantize_weight."""
    from compressed_tensors.quantization import QuantizationArgs
    from llmcompressor.modifiers.gptq.gptq_quantize import quantize_weight
    from llmcompressor.observers import Observer

    pairs = torch.load(path, map_location="cpu", weights_only=True)
    out, seconds = {}, 0.0
    for name, d in pairs.items():
        qargs = QuantizationArgs(
            num_bits=bits,
            type="int",
            symmetric=True,
            strategy="group",
            group_size=group_size,
            actorder=None if actorder == "none" else "weight",
        )
        W, H = d["W"].float(), d["H"].float()
        t0 = time.perf_counter()
        obs = Observer.load_from_registry("memoryless_minmax", base_name="weight", args=qargs)
        obs(W)
        qp = obs.get_qparams()
        Q, _loss, fallback = quantize_weight(
            W[None].clone(), H[None].clone(), qp["scale"][None], qp["zero_point"][None], None, qargs, BLOCK, DAMP
        )
        seconds += time.perf_counter() - t0
        out[name] = Q[0]
        if bool(fallback[0]):
            log(f"[llmc-baseline] {name}: RTN fallback (Hessian not positive definite)")
    torch.save(out, output)
    print(json.dumps({"layerwise": len(out), "seconds": round(seconds, 3), "versions": versions()}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hessians", default=None, help="layer-by-layer mode: .pt of {name: {W, H}} (see docstring)")
    ap.add_argument("--bits", type=int, default=3, help="layer-by-layer mode: int bits (symmetric)")
    ap.add_argument("--group-size", type=int, default=64, help="layer-by-layer mode: group size")
    ap.add_argument("--model-dir")
    ap.add_argument("--calib-ids", help="torch .pt tensor (N, L) int64 of token windows")
    ap.add_argument("--method", choices=sorted(METHODS))
    ap.add_argument("--output", required=True)
    ap.add_argument(
        "--actorder",
        default="default",
        choices=["default", "weight", "none"],
        help="GPTQ column order; default = llm-compressor's default ('static' = 'weight')",
    )
    ap.add_argument("--llmc-save", default=None, help="also save via llm-compressor save_compressed=False here")
    args = ap.parse_args()
    if args.hessians:
        layerwise(
            args.hessians, args.bits, args.group_size, "none" if args.actorder == "none" else "weight", args.output
        )
        return
    if not (args.model_dir and args.calib_ids and args.method):
        ap.error("--model-dir, --calib-ids and --method are required (unless --hessians)")

    vers = versions()
    log(f"[llmc-baseline] versions: {json.dumps(vers)}")
    log(f"[llmc-baseline] torch threads: {torch.get_num_threads()}")

    from datasets import Dataset
    from llmcompressor import oneshot
    from safetensors import safe_open
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ids = torch.load(args.calib_ids, map_location="cpu", weights_only=True)
    if not (isinstance(ids, torch.Tensor) and ids.ndim == 2 and ids.dtype == torch.int64):
        raise SystemExit(f"--calib-ids must hold an (N, L) int64 tensor, got {type(ids)} {getattr(ids, 'shape', '')}")
    N, L = ids.shape

    src_st = os.path.join(args.model_dir, "model.safetensors")
    with safe_open(src_st, "pt") as f:
        src_keys = list(f.keys())
        src_dtypes = {k: f.get_slice(k).get_dtype() for k in src_keys}

    tok = AutoTokenizer.from_pretrained(args.model_dir)
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32)
    model.eval()
    V = model.config.vocab_size
    if int(ids.min()) < 0 or int(ids.max()) >= V:
        raise SystemExit(f"calibration ids outside [0, {V})")
    log(f"[llmc-baseline] model {type(model).__name__} from {args.model_dir}; calib {N}x{L}; method {args.method}")

    ds = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": [[1] * L for _ in range(N)]})
    recipe = build_recipe(args.method, args.actorder)
    log(f"[llmc-baseline] recipe: {recipe!r}")

    t0 = time.perf_counter()
    model = oneshot(
        model=model,
        processor=tok,
        recipe=recipe,
        dataset=ds,
        num_calibration_samples=N,
        max_seq_length=L,
        shuffle_calibration_samples=False,
        batch_size=1,
        pipeline="sequential",
        output_dir=None,
    )
    oneshot_s = time.perf_counter() - t0
    log(f"[llmc-baseline] oneshot: {oneshot_s:.2f} s")

    # plain HF folder: the input's tensor names and dtypes, config/tokenizer copied verbatim
    sd = model.state_dict()
    missing = [k for k in src_keys if k not in sd]
    if missing:
        raise SystemExit(f"compressed model lacks tensors of the input: {missing[:5]}")
    dt = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
    out_sd = {k: sd[k].detach().to("cpu", dt.get(src_dtypes[k], torch.float32)).contiguous().clone() for k in src_keys}
    os.makedirs(args.output, exist_ok=True)
    save_file(out_sd, os.path.join(args.output, "model.safetensors"), metadata={"format": "pt"})
    for fn in sorted(os.listdir(args.model_dir)):
        p = os.path.join(args.model_dir, fn)
        if os.path.isfile(p) and not fn.endswith(".safetensors") and fn not in SKIP_FILES:
            shutil.copy2(p, os.path.join(args.output, fn))

    kind, a, b = METHODS[args.method]
    if kind == "gptq":
        check = check_gptq(model, out_sd, a, b, symmetric=args.method not in ASYMMETRIC)
    else:
        check = check_sparse(model, out_sd, a, src_st)
    log(f"[llmc-baseline] check: {json.dumps(check)}")
    with open(os.path.join(args.output, "llmcompressor_baseline.json"), "w") as f:
        json.dump(
            {
                "method": args.method,
                "actorder": args.actorder,
                "damp": DAMP,
                "block_size": BLOCK,
                "calib_shape": [N, L],
                "calib_ids": os.path.abspath(args.calib_ids),
                "oneshot_seconds": oneshot_s,
                "versions": vers,
                "check": check,
            },
            f,
            indent=2,
        )

    if args.llmc_save:
        model.save_pretrained(args.llmc_save, save_compressed=False)
        log(f"[llmc-baseline] llm-compressor save_compressed=False output in {args.llmc_save}")

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(
        json.dumps(
            {
                "method": args.method,
                "oneshot_seconds": round(oneshot_s, 3),
                "peak_rss_mib": round(peak, 1),
                "calib_shape": [N, L],
                "check_ok": check["ok"],
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
