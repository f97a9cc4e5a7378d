"""The inference room: model.py holds the architecture alone, the speed-ups are module swaps applied once
at load (same logits as the plain model, cached or not, no re-layout while generating), and stage=infer,
stage=eval and stage=serve load through the one loader."""

import ast
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from llama_zh import kernels
from llama_zh.checkpoint import model_stream, save_checkpoint
from llama_zh.config import ConfigError, ModelConfig
from llama_zh.generate import SamplingConfig, generate_batch
from llama_zh.infer import load, load_stream, loader, swaps
from llama_zh.model import KVCache, build_model
from llama_zh.quant import QuantConfig
from llama_zh.train.hardware import TrainerConfig

ROOT = Path(__file__).resolve().parents[1]
needs_kernel = pytest.mark.skipif(kernels.load() is None, reason="no AVX2 CPU or no C compiler: kernel not built")
BACKENDS = ["torch", pytest.param("kernel", marks=needs_kernel)]


def tiny(vocab=600, seed=0):
    # vocab 600: the head (600 x 128) and gate/up (704 x 128) are wide, q/k/v (256 x 128) is not
    return build_model(ModelConfig.from_name("tiny").with_vocab(vocab), seed=seed).eval()


def swapped(model, backend):
    out, report = load_stream(model_stream(model), backend=backend)
    assert report.backend == backend
    return out, report


# ----------------------------------------------------------------------------------- model.py alone


def test_model_py_imports_nothing_of_llama_zh_but_the_config():
    tree = ast.parse((ROOT / "llama_zh" / "model.py").read_text())
    modules = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            modules.add("." * node.level + (node.module or ""))
    ours = {m for m in modules if m.startswith(("llama_zh", "."))}
    assert ours == {"llama_zh.config"}
    others = {m.split(".")[0] for m in modules - ours}
    assert others <= set(sys.stdlib_module_names) | {"torch"}, others - set(sys.stdlib_module_names)
    assert "ctypes" not in others


def test_training_model_has_no_inference_paths():
    model = tiny()
    names = {type(m).__name__ for m in model.modules()}
    assert names == {"Transformer", "Embedding", "ModuleList", "Block", "RMSNorm", "Attention", "Linear", "FeedForward"}
    assert not any(hasattr(model, a) for a in ("fuse_projections", "head_fused", "wide_column_major"))


# ------------------------------------------------------------------------------------ swaps: numerics


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("batch", [1, 3])
def test_swapped_modules_give_the_plain_models_logits(backend, batch, small_weights_too):
    model = tiny()
    ids = torch.randint(0, 600, (batch, 7), generator=torch.Generator().manual_seed(batch))
    with torch.inference_mode():
        plain = model(ids)
    fast, report = swapped(model, backend)
    assert report.swapped["attention"] == report.swapped["feed_forward"] == model.config.n_layers
    assert {type(b.attn).__name__ for b in fast.layers} == {"FusedAttention"}
    assert {type(b.ffn).__name__ for b in fast.layers} == {"FusedFeedForward"}
    with torch.inference_mode():
        got = fast(ids)
    torch.testing.assert_close(got, plain, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_tied_head_stays_one_matrix_with_the_embedding(backend, small_weights_too):
    config = ModelConfig.from_name("tiny").with_vocab(600)
    config.tie_word_embeddings = True
    model = build_model(config, seed=0).eval()
    ids = torch.randint(0, 600, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        plain = model(ids)
    fast, _ = swapped(model, backend)
    assert fast.head.weight is fast.embed.weight  # the wide layout did not leave a second copy
    with torch.inference_mode():
        torch.testing.assert_close(fast(ids), plain, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_cached_decoding_with_swaps_equals_the_uncached_forward(backend, small_weights_too):
    model = tiny()
    fast, _ = swapped(model, backend)
    prompts = [[5, 6, 7, 8, 9], [10, 11]]  # left-padded into one cache
    follow = torch.tensor([[40, 41, 42], [50, 51, 52]])
    pad = [0, 3]
    ids = torch.tensor([[0] * n + p for n, p in zip(pad, prompts, strict=False)])
    with torch.inference_mode():
        cache = KVCache.allocate(model.config, 2, 5 + 3, left_pad=pad)
        steps = [fast(ids, cache, last_only=True)[:, -1]]
        for t in range(3):
            steps.append(fast(follow[:, t : t + 1], cache, last_only=True)[:, -1])
        for i, p in enumerate(prompts):
            alone = model(torch.tensor([p + follow[i].tolist()]))[0]  # plain, uncached
            want = alone[len(p) - 1 :]
            torch.testing.assert_close(torch.stack([s[i] for s in steps]), want, rtol=1e-5, atol=1e-5)


def test_explicit_positions_are_those_the_cache_would_give():
    model = tiny()
    ids = torch.randint(0, 600, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        implicit = model(ids, KVCache.allocate(model.config, 2, 8, left_pad=[0, 2]))
        cache = KVCache.allocate(model.config, 2, 8, left_pad=[0, 2])
        explicit = model(ids, cache, positions=torch.tensor([[0, 1, 2, 3, 4, 5], [0, 0, 0, 1, 2, 3]]))
        shifted = model(
            ids,
            KVCache.allocate(model.config, 2, 8, left_pad=[0, 2]),
            positions=torch.tensor([[1, 2, 3, 4, 5, 6], [0, 0, 1, 2, 3, 4]]),
        )
    torch.testing.assert_close(explicit, implicit, rtol=0, atol=0)
    assert cache.pos == 6
    assert not torch.allclose(shifted, implicit)  # the positions given are the ones used


def test_swapped_models_keep_the_state_dict_and_memory(tmp_path):
    model = tiny()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    fast, _ = swapped(model, "torch")
    assert fast.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in fast.state_dict().items())
    assert sum(p.numel() for p in fast.parameters()) == sum(v.numel() for v in state.values())
    fused = fast.layers[0].attn.wqkv.weight
    assert fast.layers[0].attn.wk.weight.untyped_storage().data_ptr() == fused.untyped_storage().data_ptr()
    loaded, _ = load_stream(model_stream(fast), backend="torch")  # what a swapped model saves loads back
    assert all(torch.equal(v, state[k]) for k, v in loaded.state_dict().items())


def test_fused_projections_match_separate_ones_and_keep_the_state_dict():
    config = ModelConfig.from_name("tiny").with_vocab(300)
    model = build_model(config, seed=0).eval()
    ids = torch.randint(0, 300, (2, 12))
    keys = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        separate = model(ids)
    counts = swaps.apply(model, "torch")
    assert counts["attention"] + counts["feed_forward"] == 2 * config.n_layers
    assert model.state_dict().keys() == keys.keys()
    assert all(torch.equal(v, keys[k]) for k, v in model.state_dict().items())
    assert sum(p.numel() for p in model.parameters()) == sum(v.numel() for v in keys.values())
    calls = []
    for m in model.modules():
        if isinstance(m, torch.nn.Linear):
            m.register_forward_hook(lambda mod, inp, out: calls.append(mod))
    with torch.no_grad():
        fused = model(ids)
    # wq/wk/wv and w_gate/w_up ran as two fused products per block: only wo, w_down and the head are modules
    assert len(calls) == 2 * config.n_layers + 1
    torch.testing.assert_close(fused, separate, rtol=1e-5, atol=1e-5)
    # A load into the parameters reaches the fused weights: they share memory.
    with torch.no_grad():
        model.layers[0].attn.wk.weight.mul_(2)
        model.layers[1].ffn.w_up.weight.zero_()
    calls.clear()
    with torch.no_grad():
        loaded_fused = model(ids)
    assert len(calls) == 2 * config.n_layers + 1
    plain = build_model(config, device="meta")
    plain.load_state_dict(model.state_dict(), assign=True)
    with torch.no_grad():
        torch.testing.assert_close(loaded_fused, plain(ids), rtol=1e-5, atol=1e-5)


def test_swapped_model_trains_through_the_separate_projections():
    config = ModelConfig.from_name("tiny").with_vocab(300)
    model = build_model(config, seed=0)
    swaps.apply(model, "torch")
    model(torch.randint(0, 300, (2, 8))).sum().backward()  # autograd: the fused products are not used
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "attn.w" in n)
    model.double()  # new storage for the parameters and the fused buffers alike
    with torch.no_grad():
        out = model(torch.randint(0, 300, (1, 4)))
    assert out.dtype == torch.float64


def test_column_major_wide_weights_give_the_same_logits_and_save_as_before(tmp_path):
    from llama_zh import load_checkpoint

    config = ModelConfig.from_name("tiny").with_vocab(600)  # head 600 x 128 and gate/up 704 x 128 are wide
    model = build_model(config, seed=0).eval()
    ids = torch.randint(0, 600, (3, 7))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        before = model(ids)
    swaps.apply(model, "torch")
    assert model.head.weight.stride() == (1, 600)  # laid out in-major
    assert model.layers[0].ffn.w_gate.weight.stride()[0] == 1
    assert model.layers[0].attn.wq.weight.stride()[1] == 1  # q/k/v (256 x 128) is not wide: unchanged
    with torch.no_grad():
        torch.testing.assert_close(model(ids), before, rtol=1e-5, atol=1e-5)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    saved = save_checkpoint(model, tmp_path / "ckpt")
    loaded, _ = load_checkpoint(saved)
    assert all(torch.equal(v, state[k]) for k, v in loaded.state_dict().items())


# -------------------------------------------------------------------------- swaps: applied once at load


def _layout(model) -> dict:
    tensors = list(model.named_parameters()) + list(model.named_buffers())
    return {n: (t.data_ptr(), t.stride(), t.dtype) for n, t in tensors}


@pytest.mark.parametrize("backend", BACKENDS)
def test_generation_never_relays_weights(backend, threads, small_weights_too):
    model = tiny()
    cfg = SamplingConfig(temperature=0.0, max_new_tokens=5)
    prompts = [[5, 6, 7, 8], [9, 10, 11], [12]]
    plain = generate_batch(model, prompts, cfg)
    fast, _ = swapped(model, backend)
    laid_out = _layout(fast)
    for n_threads, batch in [(1, 1), (2, 3), (1, 3), (2, 1)]:  # every case the old code re-laid weights for
        threads(n_threads)
        assert generate_batch(fast, prompts[:batch], cfg) == plain[:batch]
        assert _layout(fast) == laid_out


@needs_kernel
def test_kernel_backend_sends_every_decoding_product_to_the_kernel(threads, monkeypatch, small_weights_too):
    model = tiny()
    prompts = [[5, 6, 7, 8], [9, 10, 11]]
    cfg = SamplingConfig(temperature=0.0, max_new_tokens=6)
    separate = generate_batch(model, prompts, cfg)
    fast, report = swapped(model, "kernel")
    assert report.swapped["attention"] + report.swapped["feed_forward"] == 2 * model.config.n_layers
    assert fast.head.weight.is_contiguous() and fast.layers[0].ffn.w_gate_up.weight.is_contiguous()
    calls = []
    real = kernels.linear

    def counting(x, w):
        calls.append(kernels.applies(x, w))
        return real(x, w)

    monkeypatch.setattr(kernels, "linear", counting)
    threads(2)
    assert generate_batch(fast, prompts, cfg) == separate
    # every forward (the prefill and 5 steps): per block q/k/v, wo, gate/up and w_down, then the head
    assert len(calls) == cfg.max_new_tokens * (4 * model.config.n_layers + 1) and all(calls)
    threads(1)
    assert generate_batch(fast, prompts[:1], cfg) == separate[:1]
    torch.testing.assert_close(fast.layers[1].attn.wk.weight, tiny().layers[1].attn.wk.weight)


@needs_kernel
def test_kernel_backend_decodes_the_torch_backends_tokens_through_the_gemv(threads, monkeypatch, small_weights_too):
    config = ModelConfig.from_name("tiny").with_vocab(601)  # an odd head: 601 rows
    model = build_model(config, seed=3).eval()
    cfg = SamplingConfig(temperature=0.0, max_new_tokens=8)
    prompts = [[5, 6, 7, 8], [9, 10, 11], [12], [13, 14, 15, 16, 17]]
    by_torch, _ = swapped(model, "torch")
    by_kernel, _ = swapped(model, "kernel")
    lib = kernels.load()
    names = []

    class Spy:
        def __getattr__(self, name):
            names.append(name)
            return getattr(lib, name)

    monkeypatch.setattr(kernels, "_lib", Spy())
    threads(1)
    for batch in (1, 2, 4):  # decoding steps of 1, 2 and 4 rows: the GEMV
        names.clear()
        assert generate_batch(by_kernel, prompts[:batch], cfg) == generate_batch(by_torch, prompts[:batch], cfg)
        # every step's products, and the prefill's too where it has at most 4 rows
        assert names.count("llama_zh_gemv") >= (cfg.max_new_tokens - 1) * (4 * config.n_layers + 1)


@needs_kernel
def test_kernel_backend_copies_big_weights_into_huge_pages_once():
    config = ModelConfig.from_name("tiny").with_vocab(8000)  # head 8000 x 128: 4 MiB, the rest under 1 MiB
    model = build_model(config, seed=0).eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    fast, _ = swapped(model, "kernel")
    head = fast.head.weight
    assert head.is_contiguous() and head.data_ptr() % kernels.HUGE_PAGE == 0
    assert fast.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in fast.state_dict().items())
    ids = torch.tensor([[5, 6, 7]])
    with torch.inference_mode():
        torch.testing.assert_close(fast(ids), model(ids), rtol=1e-5, atol=1e-5)


def test_a_cpu_load_hands_the_freed_heap_back(monkeypatch):
    trims = []
    monkeypatch.setattr(kernels, "trim_heap", lambda: trims.append(1) or True)
    swapped(tiny(), "torch")
    assert trims == [1]


def test_trim_heap_runs_where_there_is_glibc():
    import platform

    assert kernels.trim_heap() is (platform.libc_ver()[0] == "glibc")


class SpacedIds:
    """A tokenizer stand-in for the engine: ids decode to their numbers, no eos."""

    eos_id = -1

    def decode(self, ids):
        return " ".join(map(str, ids)) + " "


@pytest.mark.parametrize("backend", BACKENDS)
def test_engine_steps_a_swapped_model_through_its_own_forward(backend, small_weights_too, monkeypatch):
    from llama_zh.infer import engine as engine_module

    model = tiny()
    cfg = SamplingConfig(temperature=0.0, max_new_tokens=6)
    prompts = [[5, 6, 7, 8], [9, 10, 11], [12], [13, 14]]
    solo = [generate_batch(model, [p], cfg)[0] for p in prompts]  # the plain model, alone
    fast, _ = swapped(model, backend)
    forwards = []
    real_forward = type(fast).forward
    monkeypatch.setattr(type(fast), "forward", lambda self, *a, **k: forwards.append(k) or real_forward(self, *a, **k))
    engine = engine_module.Engine(fast, SpacedIds(), max_concurrent=2, max_queue=4)
    done = []
    for p in prompts:  # staggered: rows at different positions share steps
        done.append(engine_module.Completion())
        engine.submit(p, cfg, done[-1].add)
        engine.step()
    engine.run_until_idle()
    assert [c.text for c in done] == [SpacedIds().decode(s) for s in solo]
    batched = [k["positions"] for k in forwards if k.get("positions") is not None]
    assert batched and any(len(set(p[:, 0].tolist())) > 1 for p in batched)  # explicit, different positions


def test_auto_backend_is_chosen_at_load(threads, monkeypatch):
    monkeypatch.setattr(kernels, "load", lambda: object())  # a kernel is there
    threads(1)
    assert loader.resolve_backend("auto", "cpu", None, rows=1) == "kernel"  # the one-stream GEMV beats MKL
    assert loader.resolve_backend("auto", "cpu", torch.float32, rows=8) == "kernel"
    assert loader.resolve_backend("auto", "cpu", torch.bfloat16, rows=8) == "torch"
    threads(2)
    assert loader.resolve_backend("auto", "cpu", None, rows=1) == "kernel"
    assert loader.resolve_backend("auto", "cuda", torch.float16, rows=8) == "torch"
    monkeypatch.setattr(kernels, "load", lambda: None)  # no compiler, or no AVX2
    assert loader.resolve_backend("auto", "cpu", None, rows=8) == "torch"
    with pytest.raises(ConfigError, match="stage.backend=kernel: the small-batch CPU kernel is unavailable"):
        loader.resolve_backend("kernel", "cpu", None)


def test_bad_backend_is_one_clear_error():
    with pytest.raises(ConfigError, match=r"stage.backend: 'fast'; expected one of auto, torch, kernel"):
        loader.resolve_backend("fast", "cpu", None)
    with pytest.raises(ConfigError, match="stage.backend=kernel runs fp32 on CPU only"):
        loader.resolve_backend("kernel", "cpu", torch.bfloat16)


# ------------------------------------------------------------------------------------- the one loader


def test_load_reads_a_checkpoint_and_reports_what_it_did(tmp_path):
    model = tiny()
    save_checkpoint(model, tmp_path / "ckpt")
    fast, tokenizer, report = load(tmp_path / "ckpt", backend="torch")
    assert tokenizer is None and not fast.training
    assert report.backend == "torch" and report.quant.method == "none"
    assert "backend=torch" in report.summary() and report.to_dict()["swapped"]["attention"] == 2 * 2
    assert all(not p.requires_grad for p in fast.parameters())
    ids = torch.randint(0, 600, (2, 5))
    with torch.inference_mode():
        torch.testing.assert_close(fast(ids), model(ids), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("stage", ["infer", "eval", "serve"])
def test_inference_stages_load_through_the_one_loader(stage):
    source = (ROOT / "llama_zh" / "stages" / f"{stage}.py").read_text()
    tree = ast.parse(source)
    imported = {(n.module, a.name) for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names}
    assert ("llama_zh.infer.loader", "load_for_stage") in imported
    assert not {m for m, _ in imported if m and m.startswith("llama_zh.stages.")} - {"llama_zh.stages.rundir"}
    forbidden = {"load_checkpoint", "read_any", "quantize_stream", "load_model"}
    assert not {name for _, name in imported} & forbidden
    assert "load_for_stage(" in source
    conf = OmegaConf.load(ROOT / "llama_zh" / "conf" / "stage" / f"{stage}.yaml")
    assert conf.backend == "auto"


def test_load_for_stage_takes_the_stage_options(tmp_path, monkeypatch):
    seen = {}

    def spy(path, device, dtype, quant, backend, rows):
        seen.update(path=path, device=device, quant=quant.name, backend=backend, rows=rows)
        return "model", "tokenizer", loader.LoadReport(None, backend)

    monkeypatch.setattr(loader, "load", spy)
    monkeypatch.setattr(loader.LoadReport, "summary", lambda self: "")
    trainer, quant = TrainerConfig(accelerator="cpu"), QuantConfig(name="none")
    assert loader.load_for_stage("ck", trainer, quant, "torch", None, rows=4)[:2] == ("model", "tokenizer")
    assert seen == dict(path="ck", device=torch.device("cpu"), quant="none", backend="torch", rows=4)
