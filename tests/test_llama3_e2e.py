"""A Llama-3.2-shaped Hugging Face checkpoint (GQA, tied embedding and head, llama3 rope scaling, rope
theta 500000, byte-level BPE with <|eot_id|> and the llama-3 chat template) through every stage of
the entry point: convert in, pretrain from it, sft, eval, infer, export to HF and GGUF."""

import json
import math
import shutil

import pytest
import torch
from bpe_fixture import news_split
from helpers import llama_zh

transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

pytestmark = pytest.mark.slow

ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,
}
CHATS = [
    [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    for q, a in [
        ("这本书写得很好，推荐。", "正面"),
        ("质量太差了，不会再买。", "负面"),
        ("物流很快，包装也好。", "正面"),
        ("屏幕不清楚，电池不耐用。", "负面"),
    ]
    * 4
]


def hf_llama32(directory, bpe_tokenizer):
    """A random tiny LlamaForCausalLM with Llama-3.2's features, saved as Meta's HF releases are."""
    from llama_zh.data.chat_template import ChatTemplate
    from llama_zh.tokenizer import Tokenizer

    cfg = transformers.LlamaConfig(
        vocab_size=Tokenizer(bpe_tokenizer).vocab_size,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        rms_norm_eps=1e-5,
        max_position_embeddings=128,
        tie_word_embeddings=True,
        rope_parameters=ROPE,
        bos_token_id=3000,
        eos_token_id=[3001, 3009],
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(directory)
    shutil.copyfile(bpe_tokenizer, directory / "tokenizer.json")
    config = json.loads((bpe_tokenizer.parent / "tokenizer_config.json").read_text(encoding="utf-8"))
    config["chat_template"] = ChatTemplate.named("llama-3").source
    (directory / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False), encoding="utf-8")


def test_llama3_checkpoint_through_every_stage(bpe_tokenizer, tmp_path):
    from llama_zh.convert import load_checkpoint
    from llama_zh.data.chat_template import ChatTemplate, checkpoint_template
    from llama_zh.generate import SamplingConfig, generate

    hf_in, native = tmp_path / "hf_in", tmp_path / "native"
    hf_llama32(hf_in, bpe_tokenizer)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "news.txt").write_text("\n".join(news_split(False, 150) + news_split(True, 20)) + "\n", encoding="utf-8")
    (corpus / "chats.jsonl").write_text(
        "".join(json.dumps({"messages": m}, ensure_ascii=False) + "\n" for m in CHATS), encoding="utf-8"
    )
    data = [
        "data.name=llama3_e2e",
        f"data.sources.news.files=[{corpus / 'news.txt'}]",
        "data.sources.news.format=text",
        "~data.sources.reviews",
        "data.seq_len=64",
        "data.batch_size=2",
    ]
    env = {"LLAMA_ZH_DATA": str(tmp_path / "data")}
    short = [
        "trainer.max_steps=2",
        "trainer.val_check_interval=2",
        "trainer.limit_val_batches=1",
        "trainer.enable_progress_bar=false",
        "optim.warmup_steps=1",
    ]

    # HF -> native: the shape, the scaling and the tokenizer come along.
    llama_zh(
        "stage=convert",
        f"stage.src={hf_in}",
        "stage.src_format=hf",
        f"stage.dst={native}",
        "stage.dst_format=native",
        run_dir=tmp_path / "convert_in",
    )
    model, tok = load_checkpoint(native)
    c = model.config
    assert (c.n_heads, c.n_kv_heads, c.tie_word_embeddings, c.rope_theta, c.rope_type) == (
        4,
        2,
        True,
        500000.0,
        "llama3",
    )
    assert c.rope_scaling["original_max_position_embeddings"] == 32
    assert tok.kind == "bpe" and tok.stop_ids == [3001, 3009]
    assert checkpoint_template(native) == ChatTemplate.named("llama-3").source

    # Pretraining continues from it, on the checkpoint's own tokenizer and shape.
    llama_zh("stage=pretrain", f"stage.init_from={native}", *data, *short, run_dir=tmp_path / "pretrain", env_extra=env)
    pretrained = tmp_path / "pretrain" / "checkpoints" / "final"
    p_model, p_tok = load_checkpoint(pretrained)
    assert p_model.config == c and p_tok.sha256() == tok.sha256()
    assert not torch.equal(p_model.embed.weight, model.embed.weight)  # it trained
    assert p_model.head.weight.data_ptr() == p_model.embed.weight.data_ptr()  # and stayed tied

    # SFT with the llama-3 template: answers end with <|eot_id|>.
    llama_zh(
        "stage=sft",
        f"stage.checkpoint={pretrained}",
        f"stage.data={corpus / 'chats.jsonl'}",
        "template=llama-3",
        "stage.seq_len=64",
        "stage.batch_size=2",
        "stage.val_fraction=0.25",
        *short,
        run_dir=tmp_path / "sft",
        env_extra=env,
    )
    sft = tmp_path / "sft" / "checkpoints" / "final"
    assert checkpoint_template(sft) == ChatTemplate.named("llama-3").source

    llama_zh(
        "stage=eval",
        f"stage.checkpoint={sft}",
        *data,
        "stage.max_batches=2",
        "stage.speed_probe_tokens=0",
        run_dir=tmp_path / "eval",
        env_extra=env,
    )
    ppl = json.loads((tmp_path / "eval" / "eval_results.json").read_text())["perplexity"]["all"]
    assert ppl["tokens"] > 0 and math.isclose(ppl["ppl"], math.exp(ppl["loss"])) and math.isfinite(ppl["ppl"])

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("这本书写得很好，推荐。\n质量太差了，不会再买。\n", encoding="utf-8")
    out = tmp_path / "answers.txt"
    llama_zh(
        "stage=infer",
        f"stage.checkpoint={sft}",
        f"stage.prompts={prompts}",
        f"stage.output={out}",
        "stage.max_new_tokens=6",
        "stage.apply_template=true",
        "template=llama-3",
        run_dir=tmp_path / "infer",
    )
    s_model, s_tok = load_checkpoint(sft)
    greedy = SamplingConfig(temperature=0, max_new_tokens=6)
    template = ChatTemplate.named("llama-3")
    answers = [
        s_tok.decode(
            generate(s_model, template.prompt_ids([{"role": "user", "content": p}], s_tok), greedy, tokenizer=s_tok)
        )
        for p in prompts.read_text(encoding="utf-8").splitlines()
    ]
    assert out.read_text(encoding="utf-8") == "".join(a + "\n\n" for a in answers)

    # Export: transformers loads the HF directory with the same ids and logits.
    llama_zh(
        "stage=convert",
        f"stage.src={sft}",
        "stage.src_format=native",
        f"stage.dst={tmp_path / 'hf_out'}",
        "stage.dst_format=hf",
        run_dir=tmp_path / "convert_hf",
    )
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf_out").eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf_out")
    assert hf.config.tie_word_embeddings and hf.config.rope_parameters["rope_type"] == "llama3"
    messages = CHATS[0][:1]
    ids = template.prompt_ids(messages, s_tok)
    assert (
        hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
        == ids
    )
    x = torch.tensor([ids])
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, s_model(x), atol=1e-5, rtol=0)
    assert json.loads((tmp_path / "hf_out" / "generation_config.json").read_text())["eos_token_id"] == [3001, 3009]

    # GGUF: the BPE vocabulary, Llama-3's rope theta and the scaling as rope_freqs.
    llama_zh(
        "stage=convert",
        f"stage.src={sft}",
        "stage.src_format=native",
        f"stage.dst={tmp_path / 'model'}",
        "stage.dst_format=gguf",
        run_dir=tmp_path / "convert_gguf",
    )
    reader = gguf.GGUFReader(tmp_path / "model.gguf")
    fields = {k: f.contents() for k, f in reader.fields.items()}
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "llama-bpe"
    assert len(fields["tokenizer.ggml.tokens"]) == s_tok.vocab_size
    assert fields["tokenizer.ggml.eot_token_id"] == s_tok.eot_id
    assert fields["llama.rope.freq_base"] == 500000.0 and fields["llama.attention.head_count_kv"] == 2
    tensors = {t.name for t in reader.tensors}
    assert "rope_freqs.weight" in tensors and "output.weight" not in tensors
