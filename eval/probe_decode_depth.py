"""How llama.cpp's decode time per token grows with depth on this machine: the bundled SmolLM2 cut to its first
30 / 15 / 5 / 1 decoder layers (same width, same 49152 x 576 tied head), each exported by llama.cpp's quantizer
as Q4_0 with a Q4_0 token embedding (the cpu-10x recipe's types), timed in 3 alternating rounds (512-token
prompt, 128 greedy tokens, 2 threads) beside the full model in torch float32 eager. A probe, not a model: the
cut files are not meant to be good, only to show the per-token cost of the head and of each layer, and so how
many layers a file could keep and still decode 10x torch F32 eager here. Writes eval/results/decode-depth.json
(per file: [prefill tok/s, decode tok/s, [slowest, fastest decode round]], medians of the rounds).

    python eval/probe_decode_depth.py
"""

import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import MODEL, alternating_speed, round_medians
from safetensors.torch import load_file, save_file

from llmopt.exporters import export_gguf
from llmopt.models import resolve_local_folder

src = Path(resolve_local_folder(MODEL))
work = Path("/tmp/probe-decode-depth")
work.mkdir(parents=True, exist_ok=True)
files = {}
for k in (30, 15, 5, 1):
    f = work / f"L{k}"
    if not (f / "config.json").exists():
        shutil.copytree(src, f, dirs_exist_ok=True)
        cfg = json.loads((f / "config.json").read_text())
        cfg["num_hidden_layers"] = k
        (f / "config.json").write_text(json.dumps(cfg))
        for st in f.glob("*.safetensors"):
            d = load_file(st)
            d = {n: t for n, t in d.items() if not (n.startswith("model.layers.") and int(n.split(".")[2]) >= k)}
            save_file(d, st, metadata={"format": "pt"})
        idx = f / "model.safetensors.index.json"
        if idx.exists():
            j = json.loads(idx.read_text())
            j["weight_map"] = {
                n: v
                for n, v in j["weight_map"].items()
                if not (n.startswith("model.layers.") and int(n.split(".")[2]) >= k)
            }
            idx.write_text(json.dumps(j))
    g = work / f"L{k}-q4_0.gguf"
    if not g.exists():
        export_gguf(str(f), str(g), type="q4_0", embedding_type="q4_0")
    files[f"L{k}"] = g
runs = alternating_speed(files, 3, 2, torch_label="torch-f32")
out = {k: round_medians(v) for k, v in runs.items()}
for k, (p, d, r) in out.items():
    print(k, f"prefill {p:.0f} decode {d:.1f} {r} ms/token {1000 / d:.2f}")
Path(__file__).resolve().parent.joinpath("results", "decode-depth.json").write_text(json.dumps(out, indent=1))
