"""Generation ends at every stop id of the tokenizer: eos, and a chat model's end of turn
(Llama-3's <|eot_id|>), in generate, the engine and the server alike."""

import openai
import pytest
from serve_models import InProcessServer, chain_model

from llama_zh.generate import SamplingConfig, generate, stream_generate
from llama_zh.infer.engine import Completion, Engine
from llama_zh.infer.server import ServeOptions, create_app
from llama_zh.tokenizer import Tokenizer

PROMPT, ANSWER = "价格", "很便宜"


@pytest.fixture(scope="module")
def bpe(bpe_tokenizer):
    tok = Tokenizer(bpe_tokenizer)
    assert tok.eot_id != tok.eos_id and tok.eot_id in tok.stop_ids  # the case under test
    return tok


@pytest.fixture(scope="module")
def eot_model(bpe):
    """Greedy answer to PROMPT: ANSWER, then <|eot_id|> (never eos)."""
    return chain_model(bpe, bpe.encode(PROMPT, bos=True), bpe.encode(ANSWER), end_id=bpe.eot_id)


def greedy(n=12):
    return SamplingConfig(temperature=0.0, max_new_tokens=n)


def test_generate_stops_at_end_of_turn(bpe, eot_model):
    prompt, answer = bpe.encode(PROMPT, bos=True), bpe.encode(ANSWER)
    assert generate(eot_model, prompt, greedy(), tokenizer=bpe) == answer
    assert list(stream_generate(eot_model, prompt, greedy(), tokenizer=bpe)) == answer
    # An explicit eos_id is the only stop: the model runs on past <|eot_id|> to the budget.
    past = generate(eot_model, prompt, greedy(), eos_id=bpe.eos_id, tokenizer=bpe)
    assert past[: len(answer) + 1] == answer + [bpe.eot_id] and len(past) == 12
    assert len(generate(eot_model, prompt, greedy(), eos_id=-1)) == 12


def test_engine_stops_at_end_of_turn_with_reason_stop(bpe, eot_model):
    engine = Engine(eot_model, bpe)
    done = Completion()
    engine.submit(bpe.encode(PROMPT, bos=True), greedy(), done.add)
    engine.run_until_idle()
    assert done.text == ANSWER and done.finish_reason == "stop"
    assert done.completion_tokens == len(bpe.encode(ANSWER))


def test_server_stops_at_end_of_turn(bpe, eot_model):
    engine = Engine(eot_model, bpe).start()
    server = InProcessServer(create_app(engine, bpe, ServeOptions(model_name="eot")))
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        whole = client.completions.create(model="eot", prompt=PROMPT, max_tokens=12, temperature=0)
    finally:
        server.close()
        engine.stop()
    assert whole.choices[0].text == ANSWER and whole.choices[0].finish_reason == "stop"
