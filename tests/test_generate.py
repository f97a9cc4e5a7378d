"""Sampling filters, cached decoding against a no-cache loop and transformers, seeds, eos and stop strings."""

import dataclasses
import math
import random
from pathlib import Path

import pytest
import torch

from llama_zh.config import ModelConfig
from llama_zh.generate import (
    PromptTooLong,
    SamplingConfig,
    apply_repetition_penalty,
    generate,
    generate_batch,
    sample_next,
    stream_generate,
    stream_generate_batch,
    top_k_filter,
    top_p_filter,
)
from llama_zh.model import build_model

NEG_INF = float("-inf")
GREEDY = dict(temperature=0.0)


def tiny_model(vocab_size=300, max_seq_len=128, seed=0, sharpen=30.0):
    model = build_model(
        ModelConfig(
            vocab_size=vocab_size, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, max_seq_len=max_seq_len
        ),
        seed=seed,
    ).eval()
    # A freshly initialised head gives nearly flat logits, where float noise could flip an argmax
    # between two equally right implementations; a sharper head makes greedy comparisons exact.
    with torch.no_grad():
        model.head.weight.mul_(sharpen)
    return model


# ------------------------------------------------------------------------------------------ filters


def test_top_k_keeps_exactly_k():
    logits = torch.tensor([[1.0, 5.0, 3.0, 3.0, -2.0], [0.0, 0.0, 0.0, 0.0, 0.0]])
    out = top_k_filter(logits, 2)
    assert out[0].tolist() == [NEG_INF, 5.0, 3.0, NEG_INF, NEG_INF] or out[0].tolist() == [
        NEG_INF,
        5.0,
        NEG_INF,
        3.0,
        NEG_INF,
    ]
    assert (out.isfinite().sum(dim=-1) == 2).all()  # ties do not let a third token in
    assert top_k_filter(logits, 0) is logits and top_k_filter(logits, 5) is logits  # off / no-op


@pytest.mark.parametrize("p, kept", [(0.4, 1), (0.5, 1), (0.75, 2), (0.8, 2), (0.85, 3), (0.96, 4), (1.0, 4)])
def test_top_p_known_distribution(p, kept):
    probs = torch.tensor([[0.15, 0.5, 0.05, 0.3]])  # sorted: 0.5 (id 1), 0.3 (id 3), 0.15 (id 0), 0.05 (id 2)
    out = top_p_filter(probs.log(), p)
    expected_ids = [1, 3, 0, 2][:kept]
    assert sorted(out[0].isfinite().nonzero().flatten().tolist()) == sorted(expected_ids)
    torch.testing.assert_close(out[0, expected_ids], probs.log()[0, expected_ids])  # kept logits untouched


def test_top_p_always_keeps_top_token():
    logits = torch.tensor([[2.0, 1.0, 0.0]])
    assert top_p_filter(logits, 1e-6)[0].isfinite().tolist() == [True, False, False]


def test_repetition_penalty_known_values():
    logits = torch.tensor([[2.0, -1.0, 0.5, -3.0, 1.0], [2.0, -1.0, 0.5, -3.0, 1.0]])
    previous = torch.tensor([[0, 1, 0, 3, 0], [4, 4, 4, 4, 2]])  # token 0 three times, 4 four times
    out = apply_repetition_penalty(logits, previous, penalty=2.0, window=100)
    assert out.tolist() == [[1.0, -2.0, 0.5, -6.0, 1.0], [2.0, -1.0, 0.25, -3.0, 0.5]]  # each penalised once
    assert logits[0, 0] == 2.0  # input untouched


def test_repetition_penalty_window():
    logits = torch.tensor([[2.0, -1.0, 0.5, -3.0, 1.0]])
    previous = torch.tensor([[1, 2, 0, 3]])
    assert apply_repetition_penalty(logits, previous, 2.0, window=2).tolist() == [[1.0, -1.0, 0.5, -6.0, 1.0]]
    assert apply_repetition_penalty(logits, previous, 2.0, window=1).tolist() == [[2.0, -1.0, 0.5, -6.0, 1.0]]
    assert apply_repetition_penalty(logits, previous, 1.0, window=4) is logits
    assert apply_repetition_penalty(logits, previous[:, :0], 2.0, window=4) is logits


def test_greedy_is_argmax_after_penalty():
    logits = torch.tensor([[3.0, 2.0, 1.0]])
    previous = torch.tensor([[0]])
    for after in (False, True):
        cfg = SamplingConfig(temperature=0, repetition_penalty=2.0, penalty_after_filters=after)
        assert sample_next(logits, cfg, None, previous).tolist() == [1]  # 3/2 < 2
        assert sample_next(logits, cfg).tolist() == [0]  # no history: no penalty


def test_penalty_order_relative_to_top_k():
    # Penalty first pushes token 0 (3.0 -> 1.5) out of the top-1; the reference's order filters first.
    logits = torch.tensor([[3.0, 2.9, 1.0]])
    previous = torch.tensor([[0]])
    g = torch.Generator().manual_seed(0)
    first = SamplingConfig(temperature=1.0, top_k=1, repetition_penalty=2.0)
    last = SamplingConfig(temperature=1.0, top_k=1, repetition_penalty=2.0, penalty_after_filters=True)
    assert {int(sample_next(logits, first, g, previous)) for _ in range(20)} == {1}
    assert {int(sample_next(logits, last, g, previous)) for _ in range(20)} == {0}


def test_top_p_applies_before_temperature():
    # At temperature 100 the tempered distribution is nearly uniform, so a nucleus taken after the
    # temperature would keep all four tokens; taken before it, only the two that make up 0.8.
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    cfg = SamplingConfig(temperature=100.0, top_p=0.8)
    g = torch.Generator().manual_seed(0)
    assert {int(sample_next(logits, cfg, g)) for _ in range(200)} == {0, 1}


def test_sampling_follows_the_distribution():
    probs = torch.tensor([0.6, 0.3, 0.1, 0.0])
    cfg = SamplingConfig(temperature=1.0)
    g = torch.Generator().manual_seed(0)
    ids = sample_next(probs.log().expand(20000, 4), cfg, g)  # (B,) with B = 20000
    freq = torch.bincount(ids, minlength=4).float() / ids.numel()
    torch.testing.assert_close(freq, probs, atol=0.015, rtol=0)


def test_temperature_sharpens():
    logits = torch.tensor([[1.0, 0.0]]).expand(20000, 2)
    g = torch.Generator().manual_seed(0)
    hot = sample_next(logits, SamplingConfig(temperature=2.0), g).float().mean()  # P(1) = 1/(1+e^0.5) ~ 0.38
    cold = sample_next(logits, SamplingConfig(temperature=0.5), g).float().mean()  # P(1) = 1/(1+e^2) ~ 0.12
    assert abs(hot - 1 / (1 + math.exp(0.5))) < 0.015 and abs(cold - 1 / (1 + math.exp(2))) < 0.015


# --------------------------------------------------------------------------------------- config


def test_reference_preset():
    cfg = SamplingConfig.reference(max_new_tokens=7)
    assert (cfg.top_k, cfg.top_p, cfg.temperature, cfg.repetition_penalty, cfg.repetition_window) == (
        10,
        1.0,
        0.85,
        1.15,
        1024,
    )
    assert cfg.penalty_after_filters and cfg.max_new_tokens == 7


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("temperature", -0.1, "stage.temperature must be >= 0"),
        ("temperature", float("nan"), "stage.temperature must be a finite number"),
        ("top_k", -1, "stage.top_k must be an integer >= 0"),
        ("top_k", 2.5, "stage.top_k must be an integer"),
        ("top_p", 0.0, r"stage.top_p must be in \(0, 1\]"),
        ("top_p", 1.5, r"stage.top_p must be in \(0, 1\]"),
        ("repetition_penalty", 0.0, "stage.repetition_penalty must be > 0"),
        ("repetition_window", 0, "stage.repetition_window must be an integer >= 1"),
        ("max_new_tokens", 0, "stage.max_new_tokens must be an integer >= 1"),
        ("seed", "7", "stage.seed must be an integer"),
        ("stop_strings", "User:", "stage.stop_strings must be a list of strings"),
        ("stop_strings", ["ok", ""], "stage.stop_strings must hold non-empty strings"),
        ("penalty_after_filters", "yes", "stage.penalty_after_filters must be true or false"),
        ("long_prompt", "cut", "stage.long_prompt must be one of truncate, fail"),
    ],
)
def test_config_validation(field, value, message):
    with pytest.raises(ValueError, match=message):
        SamplingConfig(**{field: value})


def test_config_accepts_ints_and_tuples():
    cfg = SamplingConfig(temperature=1, top_p=1, repetition_penalty=1, stop_strings=("a",))
    assert isinstance(cfg.temperature, float) and cfg.stop_strings == ["a"]


# ---------------------------------------------------------------------------------- decoding


def naive_greedy(model, prompt, n):
    """Recompute the full forward without a cache each step."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt) :]


def test_greedy_matches_no_cache_loop():
    model = tiny_model()
    for prompt in ([1], [1, 17, 42, 99, 5], list(range(3, 40))):
        got = generate(model, prompt, SamplingConfig(max_new_tokens=30, **GREEDY))
        assert len(got) == 30
        assert got == naive_greedy(model, prompt, 30)


def test_stream_yields_what_generate_returns():
    model = tiny_model()
    cfg = SamplingConfig(max_new_tokens=12, temperature=1.0, top_k=20, seed=3)
    stream = stream_generate(model, [1, 2, 3], cfg)
    first = next(stream)
    assert torch.is_grad_enabled() and not torch.is_inference_mode_enabled()  # no mode leaks between yields
    assert [first, *stream] == generate(model, [1, 2, 3], cfg)


def test_greedy_matches_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    from llama_zh.convert import load_checkpoint

    vocab = 512
    hf_cfg = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        rms_norm_eps=1e-6,
        max_position_embeddings=128,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            if p.ndim == 1:
                p.uniform_(0.5, 1.5)  # random norms, so a misplaced norm cannot hide
        hf.lm_head.weight.mul_(30.0)  # clear argmax margins (see tiny_model)
    hf.save_pretrained(tmp_path / "hf")
    model, _ = load_checkpoint(tmp_path / "hf")

    compared = 0
    for prompt in ([1], [1, 300, 7, 2, 45], [1] + list(range(100, 130))):
        with torch.no_grad():
            out = hf.generate(
                torch.tensor([prompt]),
                attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                do_sample=False,
                max_new_tokens=20,
                min_new_tokens=20,
                pad_token_id=0,
            )
        ref = out[0, len(prompt) :].tolist()
        got = generate(model, prompt, SamplingConfig(max_new_tokens=20, **GREEDY))  # no eos: never stops early
        assert len(ref) == len(got) == 20
        assert got == ref
        compared += len(got)
    assert compared == 60


def test_seeded_sampling_is_deterministic():
    model = tiny_model(sharpen=1.0)  # flat logits: every token has a real chance
    cfg = SamplingConfig(temperature=1.0, max_new_tokens=40, seed=123)
    a = generate(model, [1, 5, 9], cfg)
    b = generate(model, [1, 5, 9], cfg)
    c = generate(model, [1, 5, 9], SamplingConfig(temperature=1.0, max_new_tokens=40, seed=124))
    assert len(a) == 40 and a == b
    assert a != c
    assert len(set(a)) > 10  # really sampled, not greedy in disguise


def test_reference_sampling_runs_and_penalises():
    model = tiny_model()
    greedy = generate(model, [1, 4], SamplingConfig(max_new_tokens=60, **GREEDY))
    assert len(set(greedy)) < 40  # a random sharp model falls into a loop
    sampled = generate(model, [1, 4], SamplingConfig.reference(max_new_tokens=60, seed=0))
    assert len(sampled) == 60 and all(0 <= t < 300 for t in sampled)
    penalised = generate(model, [1, 4], SamplingConfig(max_new_tokens=60, repetition_penalty=10.0, **GREEDY))
    assert len(set(penalised)) == 60 and not {1, 4} & set(penalised)  # prompt ids count too
    short_window = SamplingConfig(max_new_tokens=60, repetition_penalty=10.0, repetition_window=4, **GREEDY)
    assert generate(model, [1, 4], short_window) == greedy  # its loop is longer than 4 tokens


def test_long_prompt_is_truncated_from_the_left():
    model = tiny_model(max_seq_len=32)
    rng = random.Random(0)
    prompt = [rng.randrange(3, 300) for _ in range(50)]
    cfg = SamplingConfig(max_new_tokens=5, **GREEDY)
    with pytest.warns(UserWarning, match="keeping its last 27 tokens") as record:  # room for the 5 new tokens
        got = generate(model, prompt, cfg)
    assert not any("is full" in str(w.message) for w in record)
    assert got == naive_greedy(model, prompt[-27:], 5)
    with pytest.warns(UserWarning, match="keeping its last 27 tokens"):  # exactly full: no room either
        assert generate(model, prompt[-32:], cfg) == got
    with pytest.warns(UserWarning, match="stopped after 4 new tokens: the context of 32 is full"):
        assert generate(model, prompt[-28:], cfg) == naive_greedy(model, prompt[-28:], 4)  # fits, the answer does not
    long_answer = SamplingConfig(max_new_tokens=30, **GREEDY)
    with pytest.warns(UserWarning) as record:  # never less than half the context for the prompt
        assert generate(model, prompt, long_answer) == naive_greedy(model, prompt[-16:], 16)
    messages = [str(w.message) for w in record]
    assert any("keeping its last 16 tokens" in m for m in messages) and any("is full" in m for m in messages)
    with pytest.raises(PromptTooLong, match="prompt 1 has 32 tokens, the model's context is 32"):
        generate_batch(model, [prompt[:5], prompt[-32:]], SamplingConfig(long_prompt="fail", **GREEDY))
    assert generate(model, prompt[-31:], SamplingConfig(max_new_tokens=1, long_prompt="fail", **GREEDY))


def test_empty_prompt_and_missing_tokenizer():
    model = tiny_model()
    with pytest.raises(ValueError, match="prompt_ids is empty"):
        generate(model, [], SamplingConfig())
    with pytest.raises(ValueError, match="needs a tokenizer"):
        generate(model, [1], SamplingConfig(stop_strings=["x"]))


# ------------------------------------------------------------------------------ eos and stop strings


class ScriptedModel(torch.nn.Module):
    """Emits a fixed continuation whatever the input: the token after position i is script[i + 1 - prompt_len]."""

    def __init__(self, script, prompt_len, vocab_size=300):
        super().__init__()
        self.config = ModelConfig(vocab_size=vocab_size, dim=8, n_layers=1, n_heads=1, ffn_dim=8, max_seq_len=256)
        self.norm = torch.nn.LayerNorm(8)  # the engine reads the activations' device and dtype off it
        self.script, self.prompt_len, self.calls = list(script), prompt_len, 0

    def forward(self, ids, cache, last_only=False):
        assert torch.is_inference_mode_enabled()  # no autograd bookkeeping while decoding
        assert last_only  # the engine asks for the last position's logits only
        self.calls += 1
        B, T = ids.shape
        logits = torch.zeros(B, T, self.config.vocab_size)
        for t in range(T):
            step = cache.pos + t + 1 - self.prompt_len
            if 0 <= step < len(self.script):
                logits[:, t, self.script[step]] = 100.0
        cache.pos += T
        return logits


class CharTokenizer:
    """id i <-> PIECES[i]: decoding is concatenation, so expected cuts can be worked out by hand."""

    PIECES = ["<unk>", "<s>", "</s>", "a", "b", "\n", "U", ":", "x", "b\nU", ":x"]
    eos_id = 2

    def decode(self, ids):
        return "".join(self.PIECES[i] for i in ids)


def test_eos_stops_and_is_not_returned():
    model = ScriptedModel([5, 6, 2, 7, 8], prompt_len=1)
    assert generate(model, [1], SamplingConfig(max_new_tokens=10, **GREEDY), eos_id=2) == [5, 6]
    assert model.calls == 3  # prefill + two steps: nothing after eos
    model = ScriptedModel([5, 6, 2, 7, 8], prompt_len=1)
    assert generate(model, [1], SamplingConfig(max_new_tokens=10, **GREEDY), tokenizer=CharTokenizer()) == [5, 6]
    model = ScriptedModel([5, 6, 2, 7, 8], prompt_len=1)
    assert generate(model, [1], SamplingConfig(max_new_tokens=4, **GREEDY)) == [5, 6, 2, 7]  # no eos given


@pytest.mark.parametrize(
    "script, stop, expected",
    [
        ([3, 4, 5, 6, 7, 8, 8], "\nU:", [3, 4]),  # stop made of three tokens: all three dropped
        ([3, 9, 7, 8], "\nU:", [3]),  # "b\nU" straddles the stop: its "b" goes with it
        ([3, 10, 8], ":", [3]),  # stop at the start of a token
        ([3, 5, 6, 8, 5, 6, 7, 3], "\nU:", [3, 5, 6, 8]),  # a partial match that failed is kept
        ([3, 5, 6, 8, 3], "\nU:", [3, 5, 6, 8, 3]),  # no stop at all: max_new_tokens ends it
        ([3, 5, 6], "\nU:", [3, 5, 6]),  # held-back partial match flushed at the end
        ([3, 4, 5, 3], ["zz", "b"], [3]),  # several stop strings: the first to appear wins
        ([3, 5, 6, 7, 8], [":", "\nU:"], [3]),  # two complete at once: the one starting earlier cuts
    ],
)
def test_stop_strings(script, stop, expected):
    tok = CharTokenizer()
    cfg = SamplingConfig(max_new_tokens=len(script), stop_strings=[stop] if isinstance(stop, str) else stop, **GREEDY)
    model = ScriptedModel(script, prompt_len=2)
    streamed = []
    for token in stream_generate(model, [1, 3], cfg, tokenizer=tok):
        streamed.append(token)
        # Streaming never shows text that a stop string later takes back.
        assert all(s not in tok.decode(streamed) for s in cfg.stop_strings)
    assert streamed == expected
    assert generate(ScriptedModel(script, prompt_len=2), [1, 3], cfg, tokenizer=tok) == expected


def test_stop_string_in_prompt_does_not_count():
    cfg = SamplingConfig(max_new_tokens=3, stop_strings=["a"], **GREEDY)
    assert generate(ScriptedModel([4, 4, 4], prompt_len=2), [3, 3], cfg, tokenizer=CharTokenizer()) == [4, 4, 4]


def test_stop_string_with_sentencepiece(tmp_path):
    from llama_zh.tokenizer import Tokenizer, train_sentencepiece

    rng = random.Random(0)
    words = ["你好", "世界", "模型", "中文", "数据", "训练", "hello", "world", "User", "Bot", "。", "，"]
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(
        "\n".join(
            "".join(rng.choice(words) for _ in range(rng.randrange(5, 20))) + ("\nUser: 再见" if i % 7 == 0 else "")
            for i in range(400)
        ),
        encoding="utf-8",
    )
    tok = Tokenizer(train_sentencepiece(corpus, tmp_path / "sp.model", vocab_size=300))

    answer, stop = "你好世界，中文模型。", "\nUser:"
    script = tok.encode(answer + stop + " 训练数据")
    model = ScriptedModel(script, prompt_len=1, vocab_size=tok.vocab_size)
    got = generate(
        model, [tok.bos_id], SamplingConfig(max_new_tokens=len(script), stop_strings=[stop], **GREEDY), tokenizer=tok
    )
    text = tok.decode(got)
    assert stop not in text and got == script[: len(got)]
    assert answer.startswith(text)
    assert not answer.startswith(
        tok.decode(script[: len(got) + 1])
    )  # the next token reaches into the stop: got is the longest
    assert model.calls < len(script)  # it stopped early


# ------------------------------------------------------------------------------------------ batches

BATCH_PROMPTS = [[1, 17, 42, 99, 5], [1], list(range(3, 40)), [1, 250, 251, 7, 7, 7, 9, 12, 300 - 1, 44, 2]]


def test_left_padded_prefill_matches_each_prompt_alone():
    from llama_zh.model import KVCache

    model = tiny_model(sharpen=1.0)
    P = max(map(len, BATCH_PROMPTS))
    pad = [P - len(p) for p in BATCH_PROMPTS]
    ids = torch.tensor([[0] * n + p for n, p in zip(pad, BATCH_PROMPTS, strict=False)])
    with torch.no_grad():
        cache = KVCache.allocate(model.config, len(BATCH_PROMPTS), P + 1, left_pad=pad)
        batched = model(ids, cache)  # (B, P, V)
        step = model(torch.tensor([[5], [6], [7], [8]]), cache)[:, 0]  # one cached step on top
        for i, p in enumerate(BATCH_PROMPTS):
            alone = model(torch.tensor([p + [5 + i]]))[0]
            torch.testing.assert_close(batched[i, pad[i] :], alone[:-1], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(step[i], alone[-1], atol=1e-5, rtol=1e-5)
        assert batched.isfinite().all()  # padding queries see themselves: no empty softmax row


def test_batched_greedy_equals_one_by_one(monkeypatch):
    from llama_zh import model as model_module

    model = tiny_model()
    sizes = []
    allocate = model_module.KVCache.allocate.__func__
    monkeypatch.setattr(
        model_module.KVCache, "allocate", classmethod(lambda cls, *a, **k: sizes.append(a[2]) or allocate(cls, *a, **k))
    )
    cfg = SamplingConfig(max_new_tokens=30, **GREEDY)
    alone = [generate(model, p, cfg) for p in BATCH_PROMPTS]
    sizes.clear()
    assert generate_batch(model, BATCH_PROMPTS, cfg) == alone
    assert sizes == [37 + 30 - 1]  # one cache: the longest prompt plus the new tokens but the last
    assert all(len(a) == 30 for a in alone)
    assert generate_batch(model, BATCH_PROMPTS[::-1], cfg) == alone[::-1]


def test_batched_rows_end_on_their_own():
    model = tiny_model()
    cfg = SamplingConfig(max_new_tokens=30, **GREEDY)
    free = [generate(model, p, cfg) for p in BATCH_PROMPTS]
    eos = free[0][3]  # a token row 0 meets early; other rows may meet it later or never
    alone = [generate(model, p, cfg, eos_id=eos) for p in BATCH_PROMPTS]
    assert len(alone[0]) == free[0].index(eos) < 30 and any(len(a) == 30 for a in alone)
    steps = list(stream_generate_batch(model, BATCH_PROMPTS, cfg, eos_id=eos))
    assert [[t for s in steps for t in s[i]] for i in range(4)] == alone
    assert len(steps) == max(len(a) for a in alone) + (max(len(a) for a in alone) < 30)  # stops when all rows end


def test_batched_context_limit_per_row():
    model = tiny_model(max_seq_len=32)
    prompts = [list(range(3, 31)), [1, 5, 9]]  # 28 tokens leave room for 4, 3 tokens for all 10
    cfg = SamplingConfig(max_new_tokens=10, **GREEDY)
    with pytest.warns(UserWarning, match=r"prompt\(s\) \[0\] stopped after 4 new tokens"):
        got = generate_batch(model, prompts, cfg)
    assert [len(g) for g in got] == [4, 10]
    assert got == [naive_greedy(model, prompts[0], 4), naive_greedy(model, prompts[1], 10)]


def test_batched_penalty_ignores_padding():
    model = tiny_model()
    cfg = SamplingConfig(max_new_tokens=25, repetition_penalty=10.0, repetition_window=8, **GREEDY)
    # Token 0 is the padding id: a prompt that is mostly padding must not have 0 penalised.
    assert generate_batch(model, BATCH_PROMPTS, cfg) == [generate(model, p, cfg) for p in BATCH_PROMPTS]


def test_batched_seeded_sampling_equals_one_by_one():
    import dataclasses

    model = tiny_model(sharpen=3.0)
    cfg = SamplingConfig.reference(max_new_tokens=25, seed=11)
    got = generate_batch(model, BATCH_PROMPTS, cfg)
    alone = [generate(model, p, dataclasses.replace(cfg, seed=11 + i)) for i, p in enumerate(BATCH_PROMPTS)]
    assert got == alone
    assert len({tuple(g) for g in got}) == 4 and len(set(got[1])) > 5  # sampled, not constant
    assert generate_batch(model, BATCH_PROMPTS[:2], cfg, seeds=[11, 12]) == got[:2]
    assert generate_batch(model, [BATCH_PROMPTS[1]], cfg, seeds=[12]) == [got[1]]  # a row's seed is its own


# ------------------------------------------------------------------------------------------ stage=infer

from helpers import llama_zh
from omegaconf import OmegaConf
from tiny_checkpoints import make_checkpoint

from llama_zh.config import ConfigError
from llama_zh.data.corpus import DataError
from llama_zh.data.sft import Template
from llama_zh.stages import infer

INFER_YAML = OmegaConf.load(Path(__file__).resolve().parents[1] / "llama_zh" / "conf" / "stage" / "infer.yaml")


def stage_cfg(**overrides):
    cfg = OmegaConf.merge(INFER_YAML, {"checkpoint": "x", "seed": 5, "output": "x"}, overrides)
    return cfg


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, tok):
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "native", tok)


def test_presets_and_overrides():
    assert infer.sampling_config(stage_cfg()) == SamplingConfig(temperature=0.0, max_new_tokens=64, seed=5)
    ref = infer.sampling_config(stage_cfg(preset="reference", max_new_tokens=9))
    assert ref == SamplingConfig.reference(max_new_tokens=9, seed=5)
    tuned = infer.sampling_config(stage_cfg(preset="reference", temperature=0.5, stop=["User:"], long_prompt="fail"))
    assert (tuned.temperature, tuned.top_k, tuned.penalty_after_filters, tuned.stop_strings, tuned.long_prompt) == (
        0.5,
        10,
        True,
        ["User:"],
        "fail",
    )
    plain = infer.sampling_config(stage_cfg(temperature=0.7, top_p=0.9))
    assert (plain.temperature, plain.top_p, plain.top_k, plain.repetition_penalty) == (0.7, 0.9, 0, 1.0)
    with pytest.raises(ConfigError, match="stage.preset: 'hot'"):
        infer.sampling_config(stage_cfg(preset="hot"))
    with pytest.raises(ConfigError, match="stage.top_p must be in"):
        infer.sampling_config(stage_cfg(top_p=2.0))


def test_prompts_file_errors_name_the_line(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_bytes("好的\n\n".encode() + b"\xff\xfe oops\n")
    with pytest.raises(DataError, match=f"{bad}:3: not valid UTF-8"):
        infer.read_prompts(bad)
    blank = tmp_path / "blank.txt"
    blank.write_text("\n  \n", encoding="utf-8")
    with pytest.raises(DataError, match="no prompts"):
        infer.read_prompts(blank)
    ok = tmp_path / "ok.txt"
    ok.write_text("一\n\n二\r\n", encoding="utf-8")
    assert infer.read_prompts(ok) == [(1, "一"), (3, "二")]


PROMPTS = ["这本书写得很好，推荐。", "差", "质量太差了，不会再买。物流也很慢，客服态度不好。", "还行吧", "很好"]


@pytest.mark.parametrize("preset", ["greedy", "reference"])
def test_answers_do_not_depend_on_batch_size(ckpt, tok, tmp_path, preset):
    path, model = ckpt
    sampling = infer.sampling_config(stage_cfg(preset=preset, max_new_tokens=12))
    prompts = list(enumerate(PROMPTS, 1))
    outputs = []
    for batch_size in (1, 2, 8):
        out = tmp_path / f"answers{batch_size}.txt"
        infer.answer_file(model, tok, prompts, sampling, out, batch_size)
        outputs.append(out.read_text(encoding="utf-8"))
    assert outputs[0] == outputs[1] == outputs[2]
    answers = outputs[0].split("\n\n")[:-1]
    assert len(answers) == len(PROMPTS) and outputs[0].endswith("\n\n")
    seeds = [5 + i for i in range(len(PROMPTS))]
    expected = [
        tok.decode(generate(model, tok.encode(p, bos=True), dataclasses.replace(sampling, seed=s), tokenizer=tok))
        for p, s in zip(PROMPTS, seeds, strict=False)
    ]
    assert answers == expected


def test_long_prompt_policy_names_the_line(ckpt, tok, tmp_path):
    _, model = ckpt
    long = "很好" * 200
    prompts = [(1, "短"), (4, long)]
    with pytest.raises(DataError, match=r"prompts:4: prompt of \d+ tokens does not fit the context of 128"):
        infer.answer_file(
            model,
            tok,
            prompts,
            infer.sampling_config(stage_cfg(long_prompt="fail", max_new_tokens=4)),
            tmp_path / "a.txt",
            8,
            source="prompts",
        )
    assert not (tmp_path / "a.txt").exists()
    with pytest.warns(UserWarning, match="keeping its last 124 tokens"):
        infer.answer_file(
            model, tok, prompts, infer.sampling_config(stage_cfg(max_new_tokens=4)), tmp_path / "a.txt", 8
        )
    assert (tmp_path / "a.txt").read_text(encoding="utf-8").count("\n\n") == 2


class WordTokenizer:
    """One id per character ('<s>' 1, '</s>' 2): token counts can be worked out by hand."""

    bos_id, eos_id = 1, 2

    def encode(self, text, bos=False, eos=False):
        return [1] * bos + [ord(c) for c in text] + [2] * eos


def test_chat_history_is_truncated_by_tokens():
    tok = WordTokenizer()
    template = Template(
        "{{ bos_token }}S{% for m in messages %}{% if m.role == 'user' %}U{{ m.content }}:"
        "{% else %}{% generation %}{{ m.content + eos_token }}{% endgeneration %}{% endif %}{% endfor %}"
    )
    history = [("aaaa", "bb"), ("c", "dddddd")]
    # bos S | Uaaaa: bb </s> | Uc: dddddd </s> | Uxy:  ->  2 + 9 + 10 + 4 = 25 tokens
    ids, dropped = infer.chat_prompt_ids(history, "xy", template, tok, budget=25)
    assert len(ids) == 25 and dropped == 0
    assert ids[:2] == [1, ord("S")] and ids[2:11] == [ord(c) for c in "Uaaaa:bb"] + [2]
    ids, dropped = infer.chat_prompt_ids(history, "xy", template, tok, budget=24)  # the oldest exchange goes whole
    assert dropped == 1 and ids == [1, ord("S")] + [ord(c) for c in "Uc:dddddd"] + [2] + [ord(c) for c in "Uxy:"]
    ids, dropped = infer.chat_prompt_ids(history, "xy", template, tok, budget=15)  # not even the last: both go
    assert dropped == 2 and len(ids) == 6
    ids, dropped = infer.chat_prompt_ids([], "z" * 30, template, tok, budget=10)  # the turn alone: its end, bos kept
    assert ids == [1] + [ord("z")] * 8 + [ord(":")]
    # Characters are not the measure: history of many short turns.
    many = [("你", "好")] * 10  # 5 tokens each (U你: 好 </s>)
    ids, dropped = infer.chat_prompt_ids(many, "x", template, tok, budget=2 + 3 + 5 * 3)
    assert dropped == 7 and len(ids) == 20


def test_chat_loop_clear_and_exit(ckpt, tok):
    import io

    _, model = ckpt
    template = Template.named("chat")
    sampling = SamplingConfig(temperature=0.0, max_new_tokens=6, stop_strings=["User:"])
    out = io.StringIO()
    history = infer.run_chat(
        model, tok, template, sampling, io.StringIO("你好\n\n很好\nclear\n再见\nexit\n不会读到\n"), out
    )
    assert [u for u, _ in history] == ["再见"]  # cleared, then one turn; nothing after exit
    text = out.getvalue()
    assert text.count("> ") == 6 and "(conversation cleared)" in text  # one per line read, the empty one too
    first_prompt = tok.encode("User: 你好\nBot:", bos=True)  # the answer's leading space is generated
    first = tok.decode(generate(model, first_prompt, sampling, tokenizer=tok))
    assert first and text.split("\n> ")[1] == first.rstrip("\n")


@pytest.mark.slow
def test_infer_stage_end_to_end(ckpt, tok, tmp_path):
    path, model = ckpt
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n", encoding="utf-8")
    out = tmp_path / "answers.txt"
    llama_zh(
        "stage=infer",
        f"stage.checkpoint={path}",
        f"stage.prompts={prompts}",
        f"stage.output={out}",
        "stage.max_new_tokens=10",
        "stage.batch_size=3",
        run_dir=tmp_path / "run",
    )
    expected = "".join(
        tok.decode(
            generate(model, tok.encode(p, bos=True), SamplingConfig(temperature=0, max_new_tokens=10), tokenizer=tok)
        )
        + "\n\n"
        for p in PROMPTS
    )
    assert out.read_text(encoding="utf-8") == expected

    chat = llama_zh(
        "stage=infer",
        "stage.mode=chat",
        "template=chat",
        f"stage.checkpoint={path}",
        "stage.max_new_tokens=6",
        run_dir=tmp_path / "chat",
        stdin="你好\nclear\n再见\nexit\n",
    )
    assert chat.stdout.count("\n> ") == 4 and "(conversation cleared)" in chat.stdout

    bad = llama_zh(
        "stage=infer", f"stage.checkpoint={tmp_path}", f"stage.prompts={prompts}", run_dir=tmp_path / "r2", check=False
    )
    assert bad.returncode == 1 and "neither a native checkpoint" in bad.stderr and "Traceback" not in bad.stderr
    nofile = llama_zh("stage=infer", f"stage.checkpoint={path}", run_dir=tmp_path / "r3", check=False)
    assert nofile.returncode == 1 and "stage.prompts: a prompts file is needed" in nofile.stderr
