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
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import MODEL, alternating_speed, cleanup, round_medians
from safetensors.torch import load_file, save_file

from llmopt.exporters import export_gguf
from llmopt.models import resolve_local_folder

DEPTHS = (30, 15, 5, 1)


def first_layers(src: Path, out: Path, k: int) -> None:
    """The HF folder ``src`` with only its first ``k`` decoder layers, written to ``out``."""

    def dropped(name: str) -> bool:
        return name.startswith("model.layers.") and int(name.split(".")[2]) >= k

    shutil.copytree(src, out)
    cfg = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": k}))
    for st in out.glob("*.safetensors"):
        save_file({n: t for n, t in load_file(st).items() if not dropped(n)}, st, metadata={"format": "pt"})
    idx = out / "model.safetensors.index.json"
    if idx.exists():
        j = json.loads(idx.read_text())
        j["weight_map"] = {n: v for n, v in j["weight_map"].items() if not dropped(n)}
        idx.write_text(json.dumps(j))


def main() -> None:
    src = Path(resolve_local_folder(MODEL))
    work = Path(tempfile.mkdtemp(prefix="probe-decode-depth-"))
    try:
        files = {}
        for k in DEPTHS:
            first_layers(src, work / f"L{k}", k)
            files[f"L{k}"] = work / f"L{k}-q4_0.gguf"
            export_gguf(str(work / f"L{k}"), str(files[f"L{k}"]), type="q4_0", embedding_type="q4_0")
            cleanup(work / f"L{k}")
        out = {k: round_medians(v) for k, v in alternating_speed(files, 3, 2, torch_label="torch-f32").items()}
    finally:
        cleanup(work)
    for k, (pre, dec, rng) in out.items():
        print(k, f"prefill {pre:.0f} decode {dec:.1f} {rng} ms/token {1000 / dec:.2f}")
    Path(__file__).resolve().parent.joinpath("results", "decode-depth.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
