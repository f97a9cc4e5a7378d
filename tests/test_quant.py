"""int8 / nf4 weight quantization (bitsandbytes) of a built model: error bounds, memory report, loading.

Stated tolerances, on CPU, against quant=none on the same weights (random init, fp32):
- per weight: int8 within half a step of its row's scale (absmax/127), nf4 within half the widest gap
  of the NF4 code (0.152) times its block's absmax, plus bf16 rounding;
- logits: relative Frobenius error <= 0.02 for int8 (measured 0.009), <= 0.15 for nf4 (measured 0.087).
"""

import os
import subprocess
import sys
import weakref

import pytest
import torch
from helpers import REPO

from llama_zh.checkpoint import WeightStream, model_stream, save_checkpoint
from llama_zh.config import ConfigError, ModelConfig, from_mapping
from llama_zh.generate import SamplingConfig, generate_batch
from llama_zh.infer import load, load_stream
from llama_zh.model import build_model
from llama_zh.quant import PROJECTIONS, QuantConfig, QuantError, weight_bytes

bnb = pytest.importorskip("bitsandbytes")

LOGIT_TOLERANCE = {"int8": 0.02, "nf4": 0.15}


def load_quantized(stream, quant, device="cpu", dtype=None):
    """(model, quant report) through the inference loader, backend torch: the unquantized head stays
    an nn.Linear (the kernel backend's swaps are tested in test_infer_room.py)."""
    model, report = load_stream(stream, device, dtype, quant, backend="torch")
    return model, report.quant


def load_for_inference(path, quant, device="cpu", dtype=None):
    model, tokenizer, report = load(path, device, dtype, quant, backend="torch")
    return model, tokenizer, report.quant


def random_model(ffn_dim=256, vocab_size=512, seed=0):
    config = ModelConfig(
        vocab_size=vocab_size, dim=128, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=ffn_dim, max_seq_len=128
    )
    return build_model(config, seed=seed).eval()


def projections(model):
    return {
        f"layers.{i}.{p}": model.get_submodule(f"layers.{i}.{p}") for i in range(len(model.layers)) for p in PROJECTIONS
    }


def test_config_validation():
    assert from_mapping(QuantConfig, {"name": "int8", "threshold": 6.0}, "quant").threshold == 6.0
    with pytest.raises(ConfigError, match="quant.name: 'int4'"):
        QuantConfig(name="int4")
    with pytest.raises(ConfigError, match="unknown key"):
        from_mapping(QuantConfig, {"name": "int8", "bits": 8}, "quant")
    with pytest.raises(ConfigError, match="quant.compute_dtype"):
        QuantConfig(name="nf4", compute_dtype="int8")


@pytest.mark.parametrize("method", ["int8", "nf4"])
def test_logits_within_tolerance_of_none(method):
    model = random_model()
    x = torch.randint(0, 512, (4, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(x)
    quantized, report = load_quantized(model_stream(model), QuantConfig(name=method))
    assert len(report.quantized) == 14 and not report.skipped
    for name, layer in projections(quantized).items():
        assert isinstance(layer, bnb.nn.Linear8bitLt if method == "int8" else bnb.nn.Linear4bit), name
    assert type(quantized.head) is torch.nn.Linear and type(quantized.embed) is torch.nn.Embedding
    with torch.inference_mode():
        got = quantized(x)
    rel = float((got - ref).norm() / ref.norm())
    assert 0 < rel <= LOGIT_TOLERANCE[method], rel


def test_int8_weights_within_half_a_step():
    model = random_model()
    quantized, _ = load_quantized(model_stream(model), QuantConfig(name="int8"))
    for name, layer in projections(quantized).items():
        w = model.get_submodule(name).weight.detach()
        cb, scb = layer.weight.data, layer.weight.SCB  # int8 rows and their absmax
        assert cb.dtype == torch.int8 and torch.allclose(scb, w.abs().amax(dim=1).half().float(), rtol=1e-3)
        deq = cb.float() * scb[:, None] / 127
        step = scb[:, None] / 127
        assert ((deq - w).abs() <= step / 2 + 1e-3 * w.abs() + 1e-6).all(), name


def test_nf4_weights_within_half_the_widest_code_gap():
    model = random_model()
    quantized, _ = load_quantized(model_stream(model), QuantConfig(name="nf4"))  # no forward yet: standard layout
    for name, layer in projections(quantized).items():
        w = model.get_submodule(name).weight.detach()
        state = layer.weight.quant_state
        code = state.code.float()
        assert code.numel() == 16 and code.min() == -1 and code.max() == 1
        widest = float((code.sort().values.diff()).max()) / 2  # 0.152 for NF4
        assert 0.15 < widest < 0.155
        deq = bnb.functional.dequantize_4bit(layer.weight.data, state).float()
        absmax = w.reshape(-1, 64).abs().amax(dim=1, keepdim=True)  # blocks of 64 consecutive weights
        err = (deq - w).reshape(-1, 64).abs()
        assert (err <= widest * absmax * 1.01 + w.reshape(-1, 64).abs() * 2**-8).all(), name


def test_memory_report_counts_scales():
    model = random_model()
    full = sum(p.numel() * 4 for p in model.parameters())
    proj = projections(model)
    proj_bytes = sum(m.weight.numel() for m in proj.values())
    _, int8 = load_quantized(model_stream(model), QuantConfig(name="int8"))
    rows = sum(m.weight.shape[0] for m in proj.values())
    # int8: one byte a weight plus an fp32 absmax a row; the rest stays fp32.
    assert int8.bytes_full == full
    assert int8.bytes_after == full - proj_bytes * 4 + proj_bytes + rows * 4
    _, nf4 = load_quantized(model_stream(model), QuantConfig(name="nf4"))
    # nf4: half a byte a weight, an fp32 absmax per 64 weights, the 16-entry code per layer.
    expected = full - proj_bytes * 4 + proj_bytes // 2 + proj_bytes // 64 * 4
    assert expected <= nf4.bytes_after <= expected + len(proj) * 16 * 4
    assert 0.3 < nf4.ratio < int8.ratio < 0.6
    d = int8.to_dict()
    assert d["layers_quantized"] == 14 and d["weight_mib"] == pytest.approx(int8.bytes_after / 2**20)
    assert "quant=int8 on cpu" in int8.summary() and "14 layers quantized" in int8.summary()


def test_nf4_on_cpu_leaves_layers_it_cannot_take_and_counts_them():
    model = random_model(ffn_dim=200)  # gate/up out 200 (not a multiple of 32), down in 200 (not of 64)
    quantized, report = load_quantized(model_stream(model), QuantConfig(name="nf4"))
    assert sorted(report.skipped) == sorted(
        f"layers.{i}.ffn.{p}" for i in range(2) for p in ("w_gate", "w_up", "w_down")
    )
    assert len(report.quantized) == 8 and "6 left unquantized" in report.summary()
    assert type(quantized.layers[0].ffn.w_gate) is torch.nn.Linear
    x = torch.randint(0, 512, (2, 16))
    with torch.inference_mode():
        got = quantized(x)
    with torch.no_grad():
        ref = model(x)
    assert float((got - ref).norm() / ref.norm()) <= LOGIT_TOLERANCE["nf4"]
    _, int8 = load_quantized(model_stream(model), QuantConfig(name="int8"))  # int8 takes any shape
    assert len(int8.quantized) == 14 and not int8.skipped


@pytest.mark.parametrize(
    "method, linear, embedding",
    [
        ("int8", "Linear8bitLt", "Embedding8bit"),
        ("nf4", "Linear4bit", "EmbeddingNF4"),
    ],
)
def test_head_and_embedding_on_request(method, linear, embedding):
    model = random_model()
    quantized, report = load_quantized(
        model_stream(model), QuantConfig(name=method, quantize_head=True, quantize_embedding=True)
    )
    assert type(quantized.head).__name__ == linear and type(quantized.embed).__name__ == embedding
    assert len(report.quantized) == 16
    x = torch.randint(0, 512, (2, 16))
    with torch.inference_mode():
        got = quantized(x)
    with torch.no_grad():
        ref = model(x)
    assert got.dtype == torch.float32
    assert float((got - ref).norm() / ref.norm()) <= 2 * LOGIT_TOLERANCE[method]


def test_full_precision_projection_released_before_the_next_is_read():
    model = random_model()
    stream = model_stream(model)
    clones = WeightStream(stream.config, stream.specs, lambda: ((n, t.clone()) for n, t in stream.tensors()))
    alive: list[weakref.ref] = []
    most = 0

    def tensors():
        nonlocal most
        for name, t in clones.tensors():
            most = max(most, sum(r() is not None for r in alive))
            if name.rpartition(".")[0].endswith(tuple(PROJECTIONS)):
                alive.append(weakref.ref(t))
            yield name, t
            del t

    quantized, _ = load_quantized(WeightStream(stream.config, stream.specs, tensors), QuantConfig(name="int8"))
    assert len(alive) == 14 and most == 0  # no full-precision projection outlives its quantization
    assert all(r() is None for r in alive)
    assert weight_bytes(quantized) < weight_bytes(model)


def test_quantized_batched_generation_equals_one_by_one():
    model = random_model()
    with torch.no_grad():
        model.head.weight.mul_(30.0)
    quantized, _ = load_quantized(model_stream(model), QuantConfig(name="int8"))
    prompts = [[1, 17, 42, 99, 5], [1], list(range(3, 40))]
    cfg = SamplingConfig(temperature=0, max_new_tokens=12)
    assert generate_batch(quantized, prompts, cfg) == [generate_batch(quantized, [p], cfg)[0] for p in prompts]


def test_missing_bitsandbytes_is_one_clear_error(monkeypatch, tmp_path):
    save_checkpoint(random_model(), tmp_path / "ckpt")
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import bitsandbytes -> ImportError
    with pytest.raises(QuantError, match="quant=int8 needs bitsandbytes, which failed to import"):
        load_for_inference(tmp_path / "ckpt", QuantConfig(name="int8"))
    model, tokenizer, report = load_for_inference(tmp_path / "ckpt", QuantConfig())  # none needs no bitsandbytes
    assert tokenizer is None and report.ratio == 1.0


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["int8", "nf4"])
def test_gpu_load_never_holds_the_full_precision_model(method, tmp_path):
    model = random_model(ffn_dim=1024)  # projections are most of the weights
    save_checkpoint(model, tmp_path / "ckpt")
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    quantized, _, report = load_for_inference(tmp_path / "ckpt", QuantConfig(name=method), "cuda", torch.float16)
    peak = torch.cuda.max_memory_allocated() - base
    assert peak < report.bytes_full  # the fp16 model never existed on the GPU
    x = torch.randint(0, 512, (2, 16))
    with torch.inference_mode():
        got = quantized(x.cuda()).float().cpu()
    with torch.no_grad():
        ref = model(x)
    assert float((got - ref).norm() / ref.norm()) <= LOGIT_TOLERANCE[method] + 0.01


def test_hf_directory_loads_quantized(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(
        vocab_size=512,
        hidden_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=256,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    hf.save_pretrained(tmp_path / "hf")
    model, tokenizer, report = load_for_inference(tmp_path / "hf", QuantConfig(name="int8"))
    assert tokenizer is None and len(report.quantized) == 14
    x = torch.randint(0, 512, (2, 16))
    with torch.no_grad():
        ref = hf(x).logits
    with torch.inference_mode():
        got = model(x)
    assert float((got - ref).norm() / ref.norm()) <= LOGIT_TOLERANCE["int8"]


def test_bitsandbytes_is_imported_without_asking_the_hub_for_a_kernel(tmp_path):
    """On a CPU with AVX512-BF16, a plain `import bitsandbytes` calls kernels.get_kernel (a download
    from the Hugging Face hub); llama_zh's import does not. A stand-in `kernels` module records calls."""
    script = tmp_path / "probe.py"
    script.write_text(
        "import sys, types\n"
        "calls = []\n"
        "stub = types.ModuleType('kernels')\n"
        "stub.get_kernel = lambda *a, **k: calls.append(a) or (_ for _ in ()).throw(RuntimeError('offline'))\n"
        "sys.modules['kernels'] = stub\n"
        "if sys.argv[1] == 'plain':\n"
        "    import bitsandbytes\n"
        "else:\n"
        "    from llama_zh.quant import import_bitsandbytes\n"
        "    import_bitsandbytes('nf4')\n"
        "    assert sys.modules['kernels'] is stub  # put back as it was\n"
        "print('calls', len(calls))\n"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO))
    plain, ours = (
        subprocess.run([sys.executable, str(script), how], capture_output=True, text=True, env=env, timeout=300)
        for how in ("plain", "ours")
    )
    assert plain.returncode == 0 and ours.returncode == 0, plain.stderr[-2000:] + ours.stderr[-2000:]
    if "calls 0" in plain.stdout:
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes asks for no hub kernel here")
    assert "calls 0" in ours.stdout
    assert "Failed to load CPU gemm_4bit_forward" not in ours.stderr
