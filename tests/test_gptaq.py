"""GPTAQ (GPTQ with asymmetric calibration): the kernel option checked on its own objective ‖WX − ŴX̃‖², the
engine's second activation stream checked against plain forwards, and a tiny model end to end."""

from __future__ import annotations

from typing import ClassVar

import pytest
import torch
from torch import nn

from llmopt.calibration import run_layerwise
from llmopt.core.config import StageConfig
from llmopt.core.stage import Stage
from llmopt.core.state import CompressionState, LinearOutcome
from llmopt.formats import IntFormat, make_format
from llmopt.kernels.gptaq import asymmetric_start
from llmopt.kernels.gptq import GPTQConfig, gptq_quantize
from llmopt.kernels.hessian import prepare
from tests.conftest import make_tiny_llama

torch.set_num_threads(1)

PLAIN = GPTQConfig(act_order=False, static_groups=False, mse_grid=0)
FORMATS = [make_format("q4_0"), make_format("q4_1"), IntFormat(4, 32, True), IntFormat(3, None, False)]


def asym_problem(out: int = 48, cols: int = 128, tokens: int = 2048, shift: float = 0.15, seed: int = 0):
    """W (out, in); FP inputs X (in, N), correlated with outlier channels; X̃ = X distorted the way an earlier
    quantized layer distorts it (a small linear map of X plus noise). Returns W, X, X̃, H = 2/N X̃X̃ᵀ and
    G = 2/N (X − X̃) X̃ᵀ."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out, cols, generator=g) * 0.05
    A = torch.randn(cols, 24, generator=g)
    X = A @ torch.randn(24, tokens, generator=g) + 0.3 * torch.randn(cols, tokens, generator=g)
    X[torch.randperm(cols, generator=g)[:3]] *= 10.0
    E = torch.randn(cols, cols, generator=g) / cols**0.5
    Xt = X + shift * (E @ X) + shift * X.std() * torch.randn(cols, tokens, generator=g)
    return W, X, Xt, 2 * Xt @ Xt.T / tokens, 2 * (X - Xt) @ Xt.T / tokens


def asym_error(W: torch.Tensor, Q: torch.Tensor, X: torch.Tensor, Xt: torch.Tensor) -> float:
    """‖WX − ŴX̃‖² / N, computed from the activations themselves (float64)."""
    return float(((W.double() @ X.double() - Q.double() @ Xt.double()) ** 2).sum() / X.shape[1])


@pytest.fixture(scope="module")
def problem():
    return asym_problem()


def test_option_off_is_gptq_bit_for_bit(problem):
    """asymmetric off: G is ignored; asymmetric on without G (no second stream): plain GPTQ. Same bytes."""
    W, _, _, H, G = problem
    fmt = make_format("q4_0")
    for cfg in (PLAIN, GPTQConfig()):
        ref = gptq_quantize(W, H, fmt, cfg)
        for res in (
            gptq_quantize(W, H, fmt, cfg, dxxt=G),
            gptq_quantize(W, H, fmt, cfg.model_copy(update={"asymmetric": True})),
        ):
            assert torch.equal(res.codes, ref.codes) and torch.equal(res.weight, ref.weight)
            assert torch.equal(res.qparams.scale, ref.qparams.scale) and res.loss == ref.loss


@pytest.mark.parametrize("form", ["gptaq", "exact"])
@pytest.mark.parametrize("cfg", [PLAIN, GPTQConfig()], ids=["plain", "shipped"])
def test_identical_inputs_give_gptq(problem, cfg, form):
    """X̃ = X: G = 2/N (X − X)Xᵀ is exactly 0, the start is W itself, and the codes are GPTQ's exactly."""
    W, X, _, _, _ = problem
    H = 2 * X @ X.T / X.shape[1]
    G = 2 * (X - X) @ X.T / X.shape[1]
    fmt = make_format("q4_0")
    on = cfg.model_copy(update={"asymmetric": True, "asym_alpha": 1.0, "asym_form": form})
    a, b = gptq_quantize(W, H, fmt, cfg), gptq_quantize(W, H, fmt, on, dxxt=G)
    assert torch.equal(a.codes, b.codes) and torch.equal(a.weight, b.weight)


@pytest.mark.parametrize("form", ["gptaq", "exact"])
@pytest.mark.parametrize("cfg", [PLAIN, GPTQConfig()], ids=["plain", "shipped"])
@pytest.mark.parametrize("fmt", FORMATS, ids=str)
def test_gptaq_lowers_the_asymmetric_objective(problem, fmt, cfg, form):
    """X̃ ≠ X: on the very calibration data, ‖WX − ŴX̃‖² is lower than GPTQ's (H from X̃, as the engine gives
    it), for α = 1 and for the reference implementation's α = 0.25, and the full term lowers it more."""
    W, X, Xt, H, G = problem
    gptq = asym_error(W, gptq_quantize(W, H, fmt, cfg).weight, X, Xt)
    errs = {}
    for alpha in (0.25, 1.0):
        on = cfg.model_copy(update={"asymmetric": True, "asym_alpha": alpha, "asym_form": form})
        errs[alpha] = asym_error(W, gptq_quantize(W, H, fmt, on, dxxt=G).weight, X, Xt)
    assert errs[1.0] < errs[0.25] < gptq
    assert errs[1.0] < 0.9 * gptq  # a real margin, not noise


def reference_eq18(W: torch.Tensor, H: torch.Tensor, G: torch.Tensor, scale: torch.Tensor, damp: float):
    """The paper's column walk written out with explicit inverses (no Cholesky identities, no lazy batches):
    fixing column q to q̂, the columns F after it get −(w_q − q̂) [H_F'⁻¹]_{q,F} / [H_F'⁻¹]_qq (GPTQ, F' = {q} ∪ F)
    plus w_q G[q, F] H_FF⁻¹ (Eq. 18's asymmetric term, w_q the original weight). Rounds onto a fixed per-row
    int4 grid. Returns the quantized weights."""
    n = W.shape[1]
    Hd = H.double() + damp * torch.diag(H).mean().double() * torch.eye(n, dtype=torch.float64)
    V, W0, G = W.double().clone(), W.double(), G.double()
    Q = torch.zeros_like(V)
    for q in range(n):
        Q[:, q] = (V[:, q] / scale).round().clamp(-8, 7) * scale
        F = slice(q + 1, n)
        if q + 1 == n:
            break
        Hinv = torch.linalg.inv(Hd[q:, q:])  # over F' = {q} ∪ F
        V[:, F] -= torch.outer((V[:, q] - Q[:, q]) / Hinv[0, 0], Hinv[0, 1:])
        V[:, F] += torch.outer(W0[:, q], G[q, F] @ torch.linalg.inv(Hd[F, F]))
    return Q


def test_walk_from_the_start_is_eq18_with_explicit_inverses():
    """GPTQ's walk started from asymmetric_start (Cholesky rows, shares added up front, lazy batches) gives the
    codes of the column-by-column OBS walk of Eq. 18 with explicit inverses."""
    W, X, Xt, H, G = asym_problem(out=16, cols=40, tokens=400)
    damp = 0.01
    fmt = IntFormat(4, None, True)
    Wp, Hp, _ = prepare(W, H)
    start = asymmetric_start(Wp, Hp, G, False, 1.0, damp, "gptaq")
    qp = fmt.qparams(start, 0, None)
    cfg = PLAIN.model_copy(update={"asymmetric": True, "asym_alpha": 1.0, "block_size": 8})
    res = gptq_quantize(W, H, fmt, cfg, dxxt=G)
    assert torch.equal(res.qparams.scale, qp.scale)
    ref = reference_eq18(W, H, G, qp.scale[:, 0].double(), damp)
    same = (res.weight.double() - ref).abs().le(1e-6).float().mean()
    assert same >= 0.99  # the odd code may round the other way on a float32 / float64 tie


def test_act_order_start_uses_the_walk_order():
    """With act-order the asymmetric term follows the walk's order (decreasing diag H): the start equals the
    in-order start of the problem with its columns permuted that way, permuted back."""
    W, _, _, H, G = asym_problem(out=8, cols=32, tokens=256)
    Wp, Hp, _ = prepare(W, H)
    perm = torch.argsort(torch.diag(Hp), descending=True, stable=True)
    a = asymmetric_start(Wp, Hp, G, True, 1.0, 0.01)
    b = asymmetric_start(Wp[:, perm], Hp[perm][:, perm], G[perm][:, perm], False, 1.0, 0.01)
    torch.testing.assert_close(a[:, perm], b, rtol=1e-4, atol=1e-6)


# --- the engine's second stream -------------------------------------------------------------------


class AsymRecordingStage(Stage):
    """Scales every weight (a stand-in for quantization error) and records the statistics it is handed."""

    name = "record"
    Config: ClassVar = StageConfig
    statistic = "hessian"

    def __init__(self, scale: float, fp: bool = True, sink: float = 0.0):
        super().__init__(StageConfig(stage="record"))
        self.scale, self.fp, self.sink = scale, fp, sink
        self.seen: dict = {}

    @property
    def needs_fp_inputs(self) -> bool:
        return self.fp

    def first_token_weight(self, name: str) -> float:
        return self.sink if name.endswith("v_proj") else 0.0

    def compress_linear(self, name, W, stats, state, layer_index):
        self.seen[name] = stats
        return LinearOutcome(weight=W * self.scale)


def linear_inputs(model, windows, scaled_layers: int, scale: float) -> dict[str, torch.Tensor]:
    """Every Linear's input (T, in) from one plain forward of a copy of ``model`` whose first ``scaled_layers``
    decoder layers have their Linear weights multiplied by ``scale``."""
    import copy

    m = copy.deepcopy(model)
    with torch.no_grad():
        for layer in m.model.layers[:scaled_layers]:
            for mod in layer.modules():
                if isinstance(mod, nn.Linear):
                    mod.weight.mul_(scale)
    xs: dict[str, list] = {}
    hooks = [
        mod.register_forward_hook(lambda _m, a, _o, n=n: xs.setdefault(n, []).append(a[0].reshape(-1, a[0].shape[-1])))
        for n, mod in m.named_modules()
        if isinstance(mod, nn.Linear) and n != "lm_head"
    ]
    with torch.no_grad():
        m(input_ids=windows, use_cache=False)
    for h in hooks:
        h.remove()
    return {n: torch.cat(v).double() for n, v in xs.items()}


@pytest.mark.parametrize("sink", [0.0, 0.5])
def test_engine_gives_fp_and_compressed_statistics(sink):
    """With a stage asking for them, each Linear gets H = 2/N X̃ᵀX̃ from the inputs through the compressed
    earlier layers and G = 2/N (X − X̃)ᵀX̃ with X from the uncompressed model, both as plain forwards give them
    (with a first-token weight, v_proj's first token of every window counted s² times in both);
    in layer 0 the two streams agree exactly (G = 0). Without the request there is no G."""
    model = make_tiny_llama(vocab_size=300, seed=1)
    windows = torch.randint(0, 300, (6, 32), generator=torch.Generator().manual_seed(0))
    fp = linear_inputs(model, windows, 0, 1.0)
    st = AsymRecordingStage(0.8, sink=sink)
    run_layerwise(__import__("copy").deepcopy(model), windows, [st], CompressionState(), batch_size=4)
    assert set(st.seen) == set(fp)
    for ell in (0, 1):
        comp = linear_inputs(model, windows, ell, 0.8)  # layers before ℓ compressed, ℓ itself not yet
        for n in [n for n in fp if n.startswith(f"model.layers.{ell}.")]:
            x, xt = fp[n], comp[n]
            c = torch.ones(len(xt), 1, dtype=torch.float64)  # (T, 1) token weights; tokens window by window
            if n.endswith("v_proj") and sink:
                c[:: windows.shape[1]] = max(1.0, sink * windows.shape[1])  # s²
            H, G = (2 * (c * xt).t() @ xt / len(xt)).float(), (2 * (c * (x - xt)).t() @ xt / len(xt)).float()
            torch.testing.assert_close(st.seen[n].hessian, H, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(st.seen[n].dxxt, G, rtol=1e-4, atol=1e-5)
            if ell == 0:
                assert not st.seen[n].dxxt.any()
            else:
                assert st.seen[n].dxxt.abs().max() > 1e-3
    plain = AsymRecordingStage(0.8, fp=False)
    run_layerwise(__import__("copy").deepcopy(model), windows, [plain], CompressionState(), batch_size=4)
    assert all(s.dxxt is None for s in plain.seen.values())


def test_tiny_model_compress_with_gptaq(tiny_model_dir, tiny_text_file, tmp_path):
    """End to end (recipe → engine → kernel → saved folder): layer 0 sees the same inputs in both streams, so
    its codes are GPTQ's bit for bit; layer 1's differ, and GPTAQ's layer-1 outputs are nearer the uncompressed
    model's on the calibration windows."""
    from llmopt.compression import compress_model
    from llmopt.data import calibration_windows
    from llmopt.models import load_model, load_tokenizer
    from llmopt.recipe import parse_recipe

    tok = load_tokenizer(str(tiny_model_dir))
    windows = calibration_windows(f"text:{tiny_text_file}", tok, 8, 64, seed=0)
    ref = load_model(str(tiny_model_dir), dtype=torch.float32).model
    states, models = {}, {}
    for asym in (False, True):
        model = load_model(str(tiny_model_dir), dtype=torch.float32).model
        stage = {"stage": "gptq", "format": "int", "bits": 3, "group_size": 32, "asymmetric": asym, "asym_alpha": 1.0}
        states[asym], _ = compress_model(model, parse_recipe({"stages": [stage]}), windows)
        models[asym] = model
    q0, q1 = states[False].quantized, states[True].quantized
    assert set(q0) == set(q1) and len(q0) == 14
    for n in q0:
        same = torch.equal(q0[n].codes, q1[n].codes)
        assert same == n.startswith("model.layers.0."), n

    def final_hidden(m):
        with torch.no_grad():
            return m(input_ids=windows, output_hidden_states=True, use_cache=False).hidden_states[-1]

    target = final_hidden(ref)
    err = {a: float((final_hidden(m) - target).square().mean()) for a, m in models.items()}
    assert err[True] < err[False]
