"""End to end on the bundled SmolLM2-135M (hidden 576, 30 layers): short calibration, short windows."""

import json

import pytest
import torch

from llmopt.cli import main
from llmopt.compression import REPORT_FILE, compress
from llmopt.evaluation import evaluate

pytestmark = pytest.mark.integration
MODEL = "bundled:smollm2"


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("integration")


def test_group_128_refused_on_576_wide_model(work, capsys):
    out = work / "g128"
    rc = main(["compress", MODEL, "--recipe", "configs/rtn-w4g128.yaml", "--output", str(out)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "128" in err and "576" in err and "64" in err and len(err.splitlines()) == 1, err
    assert not out.exists()


def test_rtn_kl_orders_bits(work, wikitext_path):
    """KL(dense ‖ RTN) > 0, and 8-bit is closer to the dense model than 4-bit (group 64)."""
    data = f"text:{wikitext_path}"
    kl = {}
    for recipe, key in (("configs/rtn-w4g64.yaml", 4), ("configs/rtn-w8.yaml", 8)):
        out = work / f"rtn{key}"
        compress(MODEL, recipe, out)
        r = evaluate(str(out), data=data, seq_len=256, max_windows=1, base=MODEL, progress=False)
        kl[key] = r.kl.mean
    assert 0 < kl[8] < kl[4]
    assert kl[4] < 0.5  # a working 4-bit model, not a broken one


def test_sparsegpt_2of4_then_gptq_keeps_mask(work, wikitext_path):
    """Joint sparse + quant through the engine on the real model: 2:4 exact in every Linear, pruned
    weights still exactly zero after GPTQ, and the output reloads with from_pretrained."""
    from transformers import AutoModelForCausalLM

    out = work / "sgpt24-gptq"
    res = compress(
        MODEL,
        "configs/sparsegpt-2of4-gptq-w4g64.yaml",
        out,
        calib=f"text:{wikitext_path}#0:0.5",
        calib_samples=4,
        calib_seq_len=128,
    )
    model = AutoModelForCausalLM.from_pretrained(out)
    n = 0
    for name, mod in model.named_modules():
        if name.startswith("model.layers.") and isinstance(mod, torch.nn.Linear):
            zeros = (mod.weight == 0).view(mod.weight.shape[0], -1, 4).sum(-1)
            assert bool((zeros >= 2).all()), name  # GPTQ may round a kept weight to 0, never the reverse
            n += 1
    assert n == 30 * 7
    report = json.loads((out / REPORT_FILE).read_text())
    gptq = [r for r in report["linears"] if r["stage"] == "gptq"]
    assert len(gptq) == 210 and all(r["pruned_nonzero"] == 0 for r in gptq)
    sgpt = [r for r in report["linears"] if r["stage"] == "sparsegpt"]
    assert all(r["n_m_exact"] for r in sgpt)
    assert res.report["peak_rss_mib"] < 3 * 1024
    assert (out / "quantization.safetensors").exists()
