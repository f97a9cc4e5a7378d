"""Every stage through the real entry point (`python -m llama_zh`), chained on one pretrained checkpoint."""

import csv
import json
import math
from pathlib import Path

import pytest
import torch
from helpers import llama_zh

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, data_dir):
    run = tmp_path_factory.mktemp("runs") / "pretrain"
    llama_zh(
        "trainer.max_steps=60",
        "trainer.val_check_interval=30",
        "trainer.limit_val_batches=4",
        "trainer.enable_progress_bar=false",
        run_dir=run,
        data_dir=data_dir,
    )
    return run


def read_metrics(run: Path) -> list[dict]:
    with open(run / "metrics.csv") as f:
        return list(csv.DictReader(f))


def test_pretrain_learns_and_leaves_checkpoint_and_logs(pretrained):
    ckpt = pretrained / "checkpoints" / "final"
    assert (ckpt / "model.safetensors").is_file() and (ckpt / "tokenizer.model").is_file()
    meta = (ckpt / "model_config.yaml").read_text()
    assert "format_version: 1" in meta and "vocab_size: 8000" in meta
    rows = read_metrics(pretrained)
    losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    assert len(losses) >= 5
    assert math.isclose(losses[0], math.log(8000), rel_tol=0.05)  # a random model starts near ln(vocab)
    assert losses[-1] < losses[0] - 1.0, losses
    val = [float(r["val/loss"]) for r in rows if r.get("val/loss")]
    assert len(val) == 2 and val[1] < val[0]
    assert any(r.get("train/tokens_per_s") for r in rows) and any(r.get("lr") for r in rows)
    assert list((pretrained / "wandb").glob("offline-run-*/run-*.wandb"))


def test_eval_reports_perplexity_per_source(pretrained, data_dir, tmp_path):
    ckpt = pretrained / "checkpoints" / "final"
    llama_zh(
        "stage=eval", f"stage.checkpoint={ckpt}", "stage.max_batches=3", run_dir=tmp_path / "eval", data_dir=data_dir
    )
    report = json.loads((tmp_path / "eval" / "eval_results.json").read_text())
    ppl = report["perplexity"]
    assert set(ppl) == {"news", "reviews", "all"}
    for r in ppl.values():
        assert r["tokens"] > 0 and math.isclose(r["ppl"], math.exp(r["loss"]))
        assert r["ppl"] < 8000 / 4  # far better than a uniform guess after 60 steps


def test_sft_then_infer_with_template(pretrained, data_dir, tmp_path):
    ckpt = pretrained / "checkpoints" / "final"
    llama_zh(
        "stage=sft",
        f"stage.checkpoint={ckpt}",
        "trainer.max_steps=8",
        "trainer.val_check_interval=4",
        "trainer.limit_val_batches=2",
        "stage.batch_size=4",
        run_dir=tmp_path / "sft",
        data_dir=data_dir,
    )
    sft_ckpt = tmp_path / "sft" / "checkpoints" / "final"
    # The template it trained with travels with the weights (the default template=alpaca).
    from llama_zh.data.chat_template import ChatTemplate, checkpoint_template

    assert checkpoint_template(sft_ckpt) == ChatTemplate.named("alpaca").source
    rows = read_metrics(tmp_path / "sft")
    assert any(r.get("val/loss") for r in rows)

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("这本书写得很好，推荐。\n\n质量太差了，不会再买。\n", encoding="utf-8")
    out = tmp_path / "answers.txt"
    llama_zh(
        "stage=infer",
        f"stage.checkpoint={sft_ckpt}",
        f"stage.prompts={prompts}",
        f"stage.output={out}",
        "stage.max_new_tokens=5",
        "stage.apply_template=true",
        run_dir=tmp_path / "infer",
    )
    text = out.read_text(encoding="utf-8")
    assert text.endswith("\n\n") and text.count("\n\n") >= 2


def test_infer_greedy_matches_the_python_api(pretrained, tmp_path):
    from llama_zh import load_checkpoint
    from llama_zh.generate import SamplingConfig, generate

    ckpt = pretrained / "checkpoints" / "final"
    prompts = ["中国人民", "今天的天气"]
    (tmp_path / "p.txt").write_text("\n".join(prompts) + "\n", encoding="utf-8")
    out = tmp_path / "a.txt"
    llama_zh(
        "stage=infer",
        f"stage.checkpoint={ckpt}",
        f"stage.prompts={tmp_path / 'p.txt'}",
        f"stage.output={out}",
        "stage.max_new_tokens=12",
        run_dir=tmp_path / "infer",
    )
    model, tok = load_checkpoint(ckpt)
    expected = "".join(
        tok.decode(
            generate(model, tok.encode(p, bos=True), SamplingConfig(temperature=0, max_new_tokens=12), tokenizer=tok)
        )
        + "\n\n"
        for p in prompts
    )
    assert out.read_text(encoding="utf-8") == expected


def test_export_to_hf_loads_in_transformers(pretrained, tmp_path):
    transformers = pytest.importorskip("transformers")
    from llama_zh import load_checkpoint

    ckpt = pretrained / "checkpoints" / "final"
    llama_zh(
        "stage=convert",
        f"stage.src={ckpt}",
        "stage.src_format=native",
        f"stage.dst={tmp_path / 'hf'}",
        "stage.dst_format=hf",
        run_dir=tmp_path / "convert",
    )
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    model, tok = load_checkpoint(ckpt)
    text = "１２月３１日，中共中央总书记发表新年讲话。"
    ids = tok.encode(text, bos=True)
    assert hf_tok(text)["input_ids"] == ids
    x = torch.tensor([ids])
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, model(x), atol=1e-5, rtol=0)


def test_multirun_gives_one_job_per_value(data_dir, tmp_path):
    llama_zh(
        "--multirun",
        "debug=fast",
        "optim.lr=1e-4,3e-3",
        "trainer.enable_progress_bar=false",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
        data_dir=data_dir,
    )
    jobs = sorted(p for p in (tmp_path / "sweep").iterdir() if p.is_dir() and p.name.isdigit())
    assert [j.name for j in jobs] == ["0", "1"]
    import yaml

    lrs = [yaml.safe_load((j / ".hydra" / "config.yaml").read_text())["optim"]["lr"] for j in jobs]
    assert lrs == [1e-4, 3e-3]
    for job in jobs:
        assert (job / "checkpoints" / "final" / "model.safetensors").is_file()
        assert float(read_metrics(job)[0]["lr"]) > 0


EXPERIMENTS = sorted((Path(__file__).resolve().parents[1] / "llama_zh" / "conf" / "experiment").glob("*.yaml"))


@pytest.mark.parametrize("experiment", [p.stem for p in EXPERIMENTS])
def test_every_experiment_file_runs(experiment, data_dir, tmp_path):
    # A stale experiment file (a renamed key, a removed group) fails here rather than in a user's hands.
    llama_zh(
        f"experiment={experiment}",
        "debug=fast",
        "trainer.enable_progress_bar=false",
        run_dir=tmp_path / "run",
        data_dir=data_dir,
    )
    assert (tmp_path / "run" / "checkpoints" / "final" / "model.safetensors").is_file()


def test_experiment_files_were_found():
    assert EXPERIMENTS


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["stage=eval", "stage.checkpoint=/nonexistent/ckpt"], "/nonexistent/ckpt: no such checkpoint directory"),
        (["stage=eval"], "stage.checkpoint"),
        (
            ["stage=convert", "stage.src=/nonexistent", "stage.src_format=gguf"],
            "stage.src_format: unknown format 'gguf'",
        ),
        (["optim.lr=0", "debug=fast"], "optim.lr must be > 0"),
        (["model.vocab_size=100", "debug=fast"], "model.vocab_size=100 but the tokenizer"),
    ],
)
def test_bad_input_is_one_line_and_nonzero(overrides, message, data_dir, tmp_path):
    result = llama_zh(*overrides, run_dir=tmp_path / "run", data_dir=data_dir, check=False)
    assert result.returncode != 0
    assert message in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr


def test_unknown_stage_is_refused_by_hydra(tmp_path):
    result = llama_zh("stage=foo", run_dir=tmp_path / "run", check=False)
    assert result.returncode != 0 and "stage" in result.stderr and "foo" in result.stderr


def test_bad_prompts_file_names_the_line(pretrained, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_bytes("好的\n".encode() + b"\xc3\x28 bad\n")
    out = tmp_path / "answers.txt"
    result = llama_zh(
        "stage=infer",
        f"stage.checkpoint={pretrained / 'checkpoints' / 'final'}",
        f"stage.prompts={prompts}",
        f"stage.output={out}",
        run_dir=tmp_path / "run",
        check=False,
    )
    assert result.returncode == 1 and f"{prompts}:2: not valid UTF-8" in result.stderr
    assert not out.exists() and not list(tmp_path.glob("answers.txt*"))


def test_sft_record_without_output_is_refused(pretrained, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"instruction": "你好", "output": "你好"}, {"instruction": "再见"}], ensure_ascii=False))
    result = llama_zh(
        "stage=sft",
        f"stage.checkpoint={pretrained / 'checkpoints' / 'final'}",
        f"stage.data={bad}",
        run_dir=tmp_path / "run",
        check=False,
    )
    assert result.returncode == 1 and f"{bad}: record 1: missing or non-string field 'output'" in result.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()
