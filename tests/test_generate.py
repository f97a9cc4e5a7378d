"""Sampling filters, cached decoding against a no-cache loop and transformers, seeds, eos and stop strings."""

import math
import random

import pytest
import torch

from llama_zh.config import ModelConfig
from llama_zh.generate import (
    SamplingConfig, apply_repetition_penalty, generate, sample_next, stream_generate, top_k_filter, top_p_filter,
)
from llama_zh.model import build_model

NEG_INF = float("-inf")
GREEDY = dict(temperature=0.0)


def tiny_model(vocab_size=300, max_seq_len=128, seed=0, sharpen=30.0):
    model = build_model(ModelConfig(vocab_size=vocab_size, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128,
                                    max_seq_len=max_seq_len), seed=seed).eval()
    # A freshly initialised head gives nearly flat logits, where float noise could flip an argmax
    # between two equally right implementations; a sharper head makes greedy comparisons exact.
    with torch.no_grad():
        model.head.weight.mul_(sharpen)
    return model


# ------------------------------------------------------------------------------------------ filters


def test_top_k_keeps_exactly_k():
    logits = torch.tensor([[1.0, 5.0, 3.0, 3.0, -2.0], [0.0, 0.0, 0.0, 0.0, 0.0]])
    out = top_k_filter(logits, 2)
    assert out[0].tolist() == [NEG_INF, 5.0, 3.0, NEG_INF, NEG_INF] or out[0].tolist() == [NEG_INF, 5.0, NEG_INF, 3.0, NEG_INF]
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
    assert (cfg.top_k, cfg.top_p, cfg.temperature, cfg.repetition_penalty, cfg.repetition_window) == (10, 1.0, 0.85, 1.15, 1024)
    assert cfg.penalty_after_filters and cfg.max_new_tokens == 7


@pytest.mark.parametrize("field, value, message", [
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
])
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
    return ids[len(prompt):]


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
    from llama_zh.checkpoint import load_checkpoint

    vocab = 512
    hf_cfg = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=128, rms_norm_eps=1e-6, max_position_embeddings=128, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
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
            out = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                              do_sample=False, max_new_tokens=20, min_new_tokens=20, pad_token_id=0)
        ref = out[0, len(prompt):].tolist()
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
    with pytest.warns(UserWarning) as record:
        got = generate(model, prompt, cfg)
    messages = [str(w.message) for w in record]
    assert any("keeping its last 31 tokens" in m for m in messages) and any("is full" in m for m in messages)
    assert got == naive_greedy(model, prompt[-31:], 1)  # one token fits, then the context is full
    with pytest.warns(UserWarning, match="context of 32 is full"):
        assert len(generate(model, prompt[-28:], cfg)) == 4
    with pytest.warns(UserWarning) as record:  # exactly full: no room either
        assert generate(model, prompt[-32:], cfg) == got
    assert "keeping its last 31 tokens" in str(record[0].message)


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
        self.embed = torch.nn.Embedding(vocab_size, 8)
        self.script, self.prompt_len, self.calls = list(script), prompt_len, 0

    def forward(self, ids, cache):
        assert torch.is_inference_mode_enabled()  # no autograd bookkeeping while decoding
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


@pytest.mark.parametrize("script, stop, expected", [
    ([3, 4, 5, 6, 7, 8, 8], "\nU:", [3, 4]),  # stop made of three tokens: all three dropped
    ([3, 9, 7, 8], "\nU:", [3]),  # "b\nU" straddles the stop: its "b" goes with it
    ([3, 10, 8], ":", [3]),  # stop at the start of a token
    ([3, 5, 6, 8, 5, 6, 7, 3], "\nU:", [3, 5, 6, 8]),  # a partial match that failed is kept
    ([3, 5, 6, 8, 3], "\nU:", [3, 5, 6, 8, 3]),  # no stop at all: max_new_tokens ends it
    ([3, 5, 6], "\nU:", [3, 5, 6]),  # held-back partial match flushed at the end
    ([3, 4, 5, 3], ["zz", "b"], [3]),  # several stop strings: the first to appear wins
    ([3, 5, 6, 7, 8], [":", "\nU:"], [3]),  # two complete at once: the one starting earlier cuts
])
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
    corpus.write_text("\n".join(
        "".join(rng.choice(words) for _ in range(rng.randrange(5, 20))) + ("\nUser: 再见" if i % 7 == 0 else "")
        for i in range(400)
    ), encoding="utf-8")
    tok = Tokenizer(train_sentencepiece(corpus, tmp_path / "sp.model", vocab_size=300))

    answer, stop = "你好世界，中文模型。", "\nUser:"
    script = tok.encode(answer + stop + " 训练数据")
    model = ScriptedModel(script, prompt_len=1, vocab_size=tok.vocab_size)
    got = generate(model, [tok.bos_id], SamplingConfig(max_new_tokens=len(script), stop_strings=[stop], **GREEDY),
                   tokenizer=tok)
    text = tok.decode(got)
    assert stop not in text and got == script[:len(got)]
    assert answer.startswith(text)
    assert not answer.startswith(tok.decode(script[:len(got) + 1]))  # the next token reaches into the stop: got is the longest
    assert model.calls < len(script)  # it stopped early
