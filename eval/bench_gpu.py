"""gptq-q4_0 on the CPU and on a CUDA GPU (``--device cuda``), same input, same calibration windows: seconds,
how many stored codes differ, and GPTQ's own loss per Linear on both, so the float differences between the
devices are measured, not assumed. Needs a machine with a GPU (this project's machines have none; it ran on a
lent one: eval/results/gpu.md).

    python eval/bench_gpu.py smoke OUTDIR                   # a tiny random Llama made on the spot
    python eval/bench_gpu.py full OUTDIR MODEL TEXT         # e.g. the embedded model's GGUF, 32 x 512 calibration

``full`` compresses on the CPU, then twice on the GPU (the first run pays CUDA's start-up), and writes
OUTDIR/full.json; the two outputs stay in OUTDIR/cpu and OUTDIR/cuda.
"""

import json
import sys
import time
import traceback
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from llmopt.compression import compress  # noqa: E402


def _tensors(folder: Path, codes: bool) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    out = {}
    for p in sorted(folder.glob("*.safetensors")):
        if (p.name == "quantization.safetensors") == codes:
            with safe_open(str(p), framework="pt") as f:
                out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def losses(folder: Path) -> dict[str, float]:
    report = json.loads((folder / "llmopt_report.json").read_text())
    return {r["linear"]: r["loss"] for r in report["linears"] if r.get("loss") is not None}


def compare(a: Path, b: Path) -> dict:
    ca, cb = _tensors(a, True), _tensors(b, True)
    out = {"tensors": len(ca), "same_names": sorted(ca) == sorted(cb)}
    diff = total = 0
    per = {}
    for k in ca:
        d = int((ca[k] != cb[k]).sum())
        diff += d
        total += ca[k].numel()
        if d:
            per[k] = d
    worst = sorted(per.items(), key=lambda x: -x[1])[:8]
    out.update(entries=total, differing=diff, fraction=diff / max(total, 1), worst=worst)
    la, lb = losses(a), losses(b)
    rel = {k: (lb[k] - la[k]) / la[k] for k in la if la[k]}
    out["gptq_loss_sum"] = {"cpu": sum(la.values()), "cuda": sum(lb.values())}
    out["gptq_loss_rel_diff"] = {"sum": sum(lb.values()) / sum(la.values()) - 1, "min": min(rel.values()),
                                 "max": max(rel.values())}  # fmt: skip
    return out


def run(model, out: Path, calib, extra, device):
    t0 = time.perf_counter()
    compress(str(model), "gptq-q4_0", out / device, calib=calib, device=device, overwrite=True, **extra)
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def main():
    mode, out = sys.argv[1], Path(sys.argv[2])
    out.mkdir(parents=True, exist_ok=True)
    res = {"mode": mode, "torch": torch.__version__, "gpu": torch.cuda.get_device_name(0)}
    if mode == "smoke":
        from tests.conftest import make_tiny_tokenizer
        from tests.test_streaming import random_llama

        text = (REPO.parent / "shared" / "data" / "wikitext-2" / "valid.nounk.txt").read_text()[:200_000]
        tf = out / "text.txt"
        tf.write_text(text)
        tok = make_tiny_tokenizer(text)
        model = random_llama(out / "model", tok, hidden=256, layers=2, kv=2)
        calib, extra = f"text:{tf}", dict(calib_samples=8, calib_seq_len=64)
    else:
        model, calib, extra = sys.argv[3], f"text:{sys.argv[4]}#0:0.5", {}
    for dev in ("cpu", "cuda"):
        try:
            res[f"{dev}_seconds"] = round(run(model, out, calib, extra, dev), 2)
        except Exception as e:  # the traceback is the point of a smoke run
            res[f"{dev}_error"] = "".join(traceback.format_exception(e))[-4000:]
            print(json.dumps(res, indent=1), flush=True)
            raise
    if mode == "full":  # a second GPU run: the first includes CUDA's start-up and kernel loading
        res["cuda_seconds_again"] = round(run(model, out, calib, extra, "cuda"), 2)
    res["compare"] = compare(out / "cpu", out / "cuda")
    print(json.dumps(res, indent=1), flush=True)
    (out / f"{mode}.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
