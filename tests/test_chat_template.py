"""Chat templates: what SFT trains on is what transformers' apply_chat_template gives on the exported
model (ids and the assistant mask), and the GGUF file carries the same Jinja text."""

import json
import logging

import pytest
import yaml
from helpers import llama_zh
from tiny_checkpoints import tiny_config

from llama_zh.checkpoint import save_checkpoint
from llama_zh.convert import convert
from llama_zh.data.chat_template import TEMPLATE_DIR, ChatTemplate, TemplateError, template_names, template_record
from llama_zh.data.corpus import DataError
from llama_zh.data.sft import tokenize_record
from llama_zh.model import build_model

NAMES = ["alpaca", "chat", "raw", "llama-2-chat", "chatml"]
BPE_NAMES = ["llama-3"]  # their markers are special tokens of Llama-3's byte-level BPE
SEPARATORS = {"alpaca": "\n\n### Input:\n"}

# No text starts with a space: transformers 5 tokenizes a leading space after a special token
# differently from sentencepiece until the export carries a tokenizer.json.
SINGLE = [{"role": "user", "content": "这本书写得很好，推荐。"}, {"role": "assistant", "content": "正面"}]
MULTI = [
    {"role": "system", "content": "你是一个有用的助手。"},
    {"role": "user", "content": "你好"},
    {"role": "assistant", "content": "你好！有什么可以帮你？"},
    {"role": "user", "content": "质量太差了，不会再买。\n这条评论是正面还是负面？"},
    {"role": "assistant", "content": "负面"},
]
NO_SYSTEM = MULTI[1:]
ALPACA_RECORD = {"instruction": "判断这条评论的情感。", "input": "质量太差了，不会再买。", "output": "负面"}


@pytest.fixture(scope="module")
def plain_checkpoint(tmp_path_factory, tok):
    """A tiny native checkpoint that carries no chat template (as from stage=pretrain)."""
    path = tmp_path_factory.mktemp("ckpt") / "plain"
    save_checkpoint(build_model(tiny_config(vocab_size=tok.vocab_size), seed=0), path, tokenizer=tok.path)
    return path


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tok):
    """Per template: a native checkpoint recording it (as stage=sft writes), converted to HF and GGUF."""
    root = tmp_path_factory.mktemp("exports")
    model = build_model(tiny_config(vocab_size=tok.vocab_size), seed=0)
    out = {}
    for name in NAMES:
        template = ChatTemplate.named(name, SEPARATORS.get(name, "\n"))
        native = save_checkpoint(model, root / name / "native", tokenizer=tok.path, extra=template_record(template))
        hf = convert(native, "native", root / name / "hf", "hf")
        gguf_file = convert(native, "native", root / name / "model", "gguf")
        out[name] = (template, native, hf, gguf_file)
    return out


def hf_encode(hf_dir, messages, add_generation_prompt=False):
    from transformers import AutoTokenizer

    hf_tok = AutoTokenizer.from_pretrained(hf_dir)
    out = hf_tok.apply_chat_template(
        messages,
        tokenize=True,
        return_dict=True,
        return_assistant_tokens_mask=True,
        add_generation_prompt=add_generation_prompt,
    )
    return list(out["input_ids"]), [bool(m) for m in out["assistant_masks"]]


def test_the_packaged_templates_are_the_config_choices():
    assert sorted(NAMES + BPE_NAMES) == template_names()


def test_llama3_template_is_what_transformers_gives_and_answers_end_with_eot(bpe_tokenizer, tmp_path):
    from llama_zh.tokenizer import Tokenizer

    bpe = Tokenizer(bpe_tokenizer)
    template = ChatTemplate.named("llama-3")
    model = build_model(tiny_config(vocab_size=bpe.vocab_size), seed=0)
    native = save_checkpoint(model, tmp_path / "native", tokenizer=bpe.path, extra=template_record(template))
    hf_dir = convert(native, "native", tmp_path / "hf", "hf")
    header = [bpe.token_id("<|start_header_id|>"), *bpe.encode("assistant"), bpe.token_id("<|end_header_id|>")]
    for messages in (SINGLE, MULTI, NO_SYSTEM):
        ids, trained = template.encode(messages, bpe)
        assert (ids, trained) == hf_encode(hf_dir, messages)
        assert ids[0] == bpe.bos_id and ids.count(bpe.eot_id) == len(messages) and bpe.eos_id not in ids
        # Each answer is trained up to and including its <|eot_id|>, so the model learns to stop there.
        answers = [m["content"] for m in messages if m["role"] == "assistant"]
        assert [bpe.decode([i for i, t in zip(ids, trained, strict=False) if t])] == ["".join(answers)]
        assert sum(t for i, t in zip(ids, trained, strict=False) if i == bpe.eot_id) == len(answers)
        prompt = template.prompt_ids(messages[:-1], bpe)
        assert prompt == hf_encode(hf_dir, messages[:-1], add_generation_prompt=True)[0]
        assert prompt[-len(header) - 1 :] == header + bpe.encode("\n\n")


@pytest.mark.parametrize("name", NAMES)
def test_training_ids_and_mask_are_what_transformers_gives(exported, tok, name):
    template, _, hf_dir, _ = exported[name]
    for messages in (SINGLE, MULTI, NO_SYSTEM):
        ids, trained = template.encode(messages, tok)
        assert (ids, trained) == hf_encode(hf_dir, messages), (name, template.render(messages))
        assert ids[0] == tok.bos_id and ids[-1] in (tok.eos_id, *tok.encode("\n")[-1:])
        # The SFT examples are these ids and this mask, cut in runs.
        segments = tokenize_record({"conversation": [(m["role"], m["content"]) for m in messages]}, template, tok, 512)
        assert [t for seg, _ in segments for t in seg] == ids
        assert [flag for seg, flag in segments for _ in seg] == trained
        assert sum(trained) >= sum(m["role"] == "assistant" for m in messages)  # every answer has trained tokens


@pytest.mark.parametrize("name", NAMES)
def test_generation_prompt_is_what_training_saw(exported, tok, name):
    template, _, hf_dir, _ = exported[name]
    for messages in (SINGLE, MULTI):
        prompt = template.prompt_ids(messages[:-1], tok)
        assert prompt == hf_encode(hf_dir, messages[:-1], add_generation_prompt=True)[0]
        ids, trained = template.encode(messages, tok)
        # A token prefix of the trained example, the answer's first token the first one trained after it.
        assert ids[: len(prompt)] == prompt and trained[len(prompt)] and not trained[len(prompt) - 1]


@pytest.mark.parametrize("name", NAMES)
def test_alpaca_record_is_one_user_message(exported, tok, name):
    template, _, hf_dir, _ = exported[name]
    segments = tokenize_record(ALPACA_RECORD, template, tok, max_len=512)
    user = ALPACA_RECORD["instruction"] + template.input_separator + ALPACA_RECORD["input"]
    messages = [{"role": "user", "content": user}, {"role": "assistant", "content": ALPACA_RECORD["output"]}]
    ids, trained = hf_encode(hf_dir, messages)
    assert [t for seg, _ in segments for t in seg] == ids
    assert [flag for seg, flag in segments for _ in seg] == trained
    prompt = tok.encode(template.format(ALPACA_RECORD["instruction"], ALPACA_RECORD["input"]), bos=True)
    assert segments[0] == (prompt, False)  # what eval and infer prompt with


def test_alpaca_keeps_the_stanford_texts():
    alpaca = ChatTemplate.named("alpaca", "\n\n### Input:\n")
    assert alpaca.format("翻译", "hello") == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n### Instruction:\n翻译\n\n### Input:\nhello"
        "\n\n### Response:"
    )
    assert alpaca.format("问候") == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        "\n\n### Instruction:\n问候\n\n### Response:"
    )


def test_exports_carry_the_checkpoint_template(exported):
    import gguf

    for name, (template, native, hf_dir, gguf_file) in exported.items():
        assert yaml.safe_load((native / "model_config.yaml").read_text())["chat_template"] == template.source
        assert json.loads((hf_dir / "tokenizer_config.json").read_text())["chat_template"] == template.source
        field = gguf.GGUFReader(gguf_file).fields["tokenizer.chat_template"]
        assert bytes(field.parts[field.data[0]]).decode("utf-8") == template.source, name


def test_convert_overrides_or_exports_none(plain_checkpoint, exported, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="llama_zh.data.chat_template"):
        hf_dir = convert(plain_checkpoint, "native", tmp_path / "none", "hf")
    assert "chat_template" not in json.loads((hf_dir / "tokenizer_config.json").read_text())
    assert any("carries none, so none is exported" in r.getMessage() for r in caplog.records)

    chatml = ChatTemplate.named("chatml").source
    hf_dir = convert(exported["alpaca"][1], "native", tmp_path / "override", "hf", template="chatml")
    assert json.loads((hf_dir / "tokenizer_config.json").read_text())["chat_template"] == chatml
    # hf -> native keeps it, so that a later export finds it.
    native = convert(hf_dir, "hf", tmp_path / "back", "native")
    assert yaml.safe_load((native / "model_config.yaml").read_text())["chat_template"] == chatml


def test_custom_templates_from_config(tmp_path):
    text = "{{ bos_token }}{% for m in messages %}{% generation %}{{ m.content }}{% endgeneration %}{% endfor %}"
    inline = ChatTemplate.from_config({"name": "mine", "chat_template": text, "input_separator": "|"})
    assert (inline.source, inline.name, inline.format("a", "b")) == (text, "mine", "a|b")
    (tmp_path / "mine.jinja").write_text(text, encoding="utf-8")
    assert ChatTemplate.from_config({"path": str(tmp_path / "mine.jinja")}).source == text
    assert ChatTemplate.from_config({"name": "chatml"}).source == (TEMPLATE_DIR / "chatml.jinja").read_text()


def test_bad_templates_are_one_line_errors(tmp_path, tok):
    with pytest.raises(TemplateError, match=r"chat template 'nope': unknown; expected one of alpaca, chat, chatml"):
        ChatTemplate.named("nope")
    bad = tmp_path / "bad.jinja"
    bad.write_text("{{ bos_token }}\n{% for m in messages %}{{ m.content }}\n", encoding="utf-8")
    with pytest.raises(TemplateError, match=r"chat template .*bad\.jinja: line 2: .*endfor") as e:
        ChatTemplate.named(str(bad))
    assert "\n" not in str(e.value)
    with pytest.raises(TemplateError, match=r"template: unknown field\(s\) prompt_input"):
        ChatTemplate.from_config({"prompt_input": "{instruction}", "name": "alpaca"})
    with pytest.raises(TemplateError, match=r"llama-2-chat: a system message is only allowed first"):
        ChatTemplate.named("llama-2-chat").render(NO_SYSTEM + [{"role": "system", "content": "x"}])
    nothing = ChatTemplate("{{ bos_token }}{% for m in messages %}{{ m.content }}{% endfor %}", name="plain")
    with pytest.raises(DataError, match=r"chat template plain: marks nothing to train on"):
        tokenize_record({"instruction": "a", "output": "b"}, nothing, tok, 64)


def test_stage_errors_name_the_template(plain_checkpoint, tmp_path):
    bad = llama_zh(
        "stage=convert",
        f"stage.src={plain_checkpoint}",
        "stage.src_format=native",
        "stage.dst_format=hf",
        f"stage.dst={tmp_path / 'out'}",
        "stage.template=nope",
        run_dir=tmp_path / "run",
        check=False,
    )
    assert bad.returncode == 1 and "chat template 'nope': unknown" in bad.stderr and "Traceback" not in bad.stderr
    assert not (tmp_path / "out").exists()
