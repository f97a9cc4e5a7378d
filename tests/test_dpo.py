"""stage=dpo: the DPO / SimPO / ORPO losses against hand computation, the reference policy, response-only
log-probs, preference records, and short real runs through the entry point."""

import copy
import csv
import json
import math
import random
import sys
from pathlib import Path

import pytest
import torch

from llama_zh.config import ModelConfig
from llama_zh.data.chat_template import ChatTemplate
from llama_zh.data.corpus import DataError, is_held_out
from llama_zh.data.datasets import IGNORE_INDEX
from llama_zh.data.preference import (
    PreferenceData,
    PreferenceDataset,
    build_review_preferences,
    load_preferences,
    preference_collate,
    tokenize_pair,
)
from llama_zh.dpo import PreferenceObjective, adapters_only, dpo_loss, orpo_loss, sequence_logps, simpo_loss
from llama_zh.errors import LlamaZhError
from llama_zh.model import build_model
from llama_zh.train.finetune import FinetuneConfig, LoRALinear, adapters_disabled, apply_finetune

sys.path.insert(0, str(Path(__file__).parent))
from helpers import llama_zh
from tiny_checkpoints import make_checkpoint, train_tokenizer

# Two pairs: summed log-probs of the chosen / rejected responses, their reference values and lengths.
CHOSEN, REJECTED = [-5.0, -7.0], [-6.0, -4.0]
REF_CHOSEN, REF_REJECTED = [-5.5, -6.5], [-5.8, -4.2]
CHOSEN_LEN, REJECTED_LEN = [4, 6], [2, 5]


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


def leaves():
    chosen = torch.tensor(CHOSEN, dtype=torch.float64, requires_grad=True)
    rejected = torch.tensor(REJECTED, dtype=torch.float64, requires_grad=True)
    return chosen, rejected


def check(loss, chosen, rejected, expected_loss, expected_grad_chosen, expected_grad_rejected):
    loss.backward()
    assert math.isclose(loss.item(), expected_loss, rel_tol=1e-12)
    for got, want in ((chosen.grad, expected_grad_chosen), (rejected.grad, expected_grad_rejected)):
        for g, w in zip(got.tolist(), want, strict=False):
            assert math.isclose(g, w, rel_tol=1e-9), (got, want)


# ---------------------------------------------------------------------------------- the losses


def test_dpo_loss_and_gradients_by_hand():
    beta = 0.1
    chosen, rejected = leaves()
    losses, chosen_rewards, rejected_rewards = dpo_loss(
        chosen,
        rejected,
        torch.tensor(REF_CHOSEN, dtype=torch.float64),
        torch.tensor(REF_REJECTED, dtype=torch.float64),
        beta,
    )
    z = [beta * ((c - rc) - (r - rr)) for c, r, rc, rr in zip(CHOSEN, REJECTED, REF_CHOSEN, REF_REJECTED, strict=False)]
    expected = sum(-math.log(sigmoid(v)) for v in z) / 2
    # d/dc -log sigmoid(z) = -beta sigmoid(-z); the batch mean halves it.
    grad_c = [-beta * sigmoid(-v) / 2 for v in z]
    check(losses.mean(), chosen, rejected, expected, grad_c, [-g for g in grad_c])
    assert chosen_rewards.tolist() == pytest.approx([beta * 0.5, beta * -0.5])
    assert rejected_rewards.tolist() == pytest.approx([beta * -0.2, beta * 0.2])


def test_simpo_loss_and_gradients_by_hand():
    beta, gamma = 2.0, 0.5
    chosen, rejected = leaves()
    losses, _, _ = simpo_loss(chosen, rejected, torch.tensor(CHOSEN_LEN), torch.tensor(REJECTED_LEN), beta, gamma)
    z = [
        beta * c / lc - beta * r / lr - gamma
        for c, r, lc, lr in zip(CHOSEN, REJECTED, CHOSEN_LEN, REJECTED_LEN, strict=False)
    ]
    expected = sum(-math.log(sigmoid(v)) for v in z) / 2
    grad_c = [-beta / lc * sigmoid(-v) / 2 for v, lc in zip(z, CHOSEN_LEN, strict=False)]
    grad_r = [beta / lr * sigmoid(-v) / 2 for v, lr in zip(z, REJECTED_LEN, strict=False)]
    check(losses.mean(), chosen, rejected, expected, grad_c, grad_r)


def test_orpo_loss_and_gradients_by_hand():
    lam = 0.1
    chosen, rejected = leaves()
    losses, chosen_odds, _ = orpo_loss(chosen, rejected, torch.tensor(CHOSEN_LEN), torch.tensor(REJECTED_LEN), lam)

    def odds(m):  # log(p / (1 - p)) with p = exp(m)
        p = math.exp(m)
        return math.log(p / (1 - p))

    expected, grad_c, grad_r = 0.0, [], []
    for c, r, lc, lr in zip(CHOSEN, REJECTED, CHOSEN_LEN, REJECTED_LEN, strict=False):
        mc, mr = c / lc, r / lr
        d = odds(mc) - odds(mr)
        expected += (-mc - lam * math.log(sigmoid(d))) / 2
        # d odds / d m = 1 / (1 - p); d m / d c = 1 / length
        grad_c.append((-1 / lc - lam * sigmoid(-d) / (1 - math.exp(mc)) / lc) / 2)
        grad_r.append((lam * sigmoid(-d) / (1 - math.exp(mr)) / lr) / 2)
    check(losses.mean(), chosen, rejected, expected, grad_c, grad_r)
    assert chosen_odds[0].item() == pytest.approx(odds(CHOSEN[0] / CHOSEN_LEN[0]))


def test_orpo_odds_stay_finite_near_certainty():
    chosen = torch.tensor([-1e-9, 0.0], requires_grad=True)
    losses, odds, _ = orpo_loss(chosen, torch.tensor([-3.0, -3.0]), torch.tensor([3, 3]), torch.tensor([3, 3]), 0.1)
    losses.sum().backward()
    assert torch.isfinite(losses).all() and torch.isfinite(odds).all() and torch.isfinite(chosen.grad).all()


@pytest.mark.parametrize(
    "values,message",
    [
        (dict(loss="ipo"), "stage.loss='ipo'; expected one of dpo, simpo, orpo"),
        (dict(loss="dpo", beta=0), "stage.beta=0"),
        (dict(loss="simpo", gamma=-1), "stage.gamma=-1"),
        (dict(loss="orpo", lam=0), "stage.lambda=0"),
    ],
)
def test_bad_objective_settings(values, message):
    with pytest.raises(LlamaZhError, match=message.replace("(", r"\(").replace(")", r"\)")):
        PreferenceObjective(**values)


def test_objective_defaults_per_loss():
    assert PreferenceObjective("dpo").beta == 0.1 and PreferenceObjective("simpo").beta == 2.0
    assert PreferenceObjective("dpo").needs_reference and not PreferenceObjective("orpo").needs_reference


# ------------------------------------------------------------------------- log-probs and reference


CONFIG = ModelConfig(name="t", vocab_size=300, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=160, max_seq_len=64)


def test_reference_with_lora_switched_off_is_the_base_model_exactly():
    base = build_model(CONFIG, seed=0)
    model = apply_finetune(
        copy.deepcopy(base), FinetuneConfig(method="lora", rank=4, alpha=8, dropout=0.0, modules_to_save=[])
    )
    for module in model.modules():
        if isinstance(module, LoRALinear):  # B starts at zero: give it values so the adapters matter
            module.lora_b.data.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
    ids = torch.randint(0, CONFIG.vocab_size, (4, 20), generator=torch.Generator().manual_seed(2))
    labels = torch.where(torch.arange(20) >= 12, ids.roll(-1, 1), IGNORE_INDEX)
    with torch.no_grad():
        expected, _ = sequence_logps(base(ids), labels)
        tuned, _ = sequence_logps(model(ids), labels)
        with adapters_disabled(model):
            reference, _ = sequence_logps(model(ids), labels)
        after, _ = sequence_logps(model(ids), labels)
    assert torch.equal(reference, expected)
    assert not torch.allclose(tuned, expected, atol=1e-3)  # the adapters do change the model
    assert torch.equal(after, tuned)  # and are back on after the block
    assert adapters_only(model)
    with_head = apply_finetune(copy.deepcopy(base), FinetuneConfig(method="lora", modules_to_save=["head"]))
    assert not adapters_only(with_head)  # a trained head: switching adapters off is not the start
    assert not adapters_only(base)


def test_summed_log_prob_counts_labelled_positions_only():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 6, 11, generator=generator)
    labels = torch.tensor(
        [[IGNORE_INDEX, IGNORE_INDEX, 3, 4, IGNORE_INDEX, IGNORE_INDEX], [IGNORE_INDEX, 7, 1, 2, 9, IGNORE_INDEX]]
    )
    sums, counts = sequence_logps(logits, labels)
    logp = logits.log_softmax(-1)
    assert counts.tolist() == [2, 4]
    assert sums[0].item() == pytest.approx(logp[0, 2, 3].item() + logp[0, 3, 4].item(), rel=1e-6)
    changed = logits.clone()
    changed[labels == IGNORE_INDEX] = torch.randn(int((labels == IGNORE_INDEX).sum()), 11, generator=generator) * 50
    assert torch.equal(sequence_logps(changed, labels)[0], sums)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return train_tokenizer(tmp_path_factory.mktemp("tok"))


def labelled(labels):
    return [t for t in labels.tolist() if t != IGNORE_INDEX]


def test_only_the_response_is_labelled(tokenizer, tmp_path):
    template = ChatTemplate.named("chat")
    data = tmp_path / "p.jsonl"
    records = [
        {"prompt": "这家店的衣服很好看", "chosen": "正面", "rejected": "负面"},
        {"prompt": "房间很脏，服务员的态度也很差，不会再来了", "chosen": "正面", "rejected": "负面"},
        {
            "conversations": [
                {"from": "human", "value": "你好"},
                {"from": "gpt", "value": "负面负面负面"},
                {"from": "human", "value": "这家店的衣服很好看"},
            ],
            "chosen": "正面",
            "rejected": "负面",
        },
    ]
    data.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in records), encoding="utf-8")
    pairs = [tokenize_pair(r, template, tokenizer, 64) for r in load_preferences(data)]
    dataset = PreferenceDataset(pairs, list(range(len(pairs))))
    batch = preference_collate(0)([dataset[i] for i in range(len(dataset))])
    answer = {
        key: template.encode([{"role": "user", "content": "x"}, {"role": "assistant", "content": key}], tokenizer)
        for key in ("正面", "负面")
    }
    answer = {key: [t for t, trained in zip(*value, strict=False) if trained] for key, value in answer.items()}
    rows = [labelled(row) for row in batch["labels"]]
    # Rows: the chosen responses of the three pairs, then the rejected ones: whatever the prompt
    # (short, long, a conversation holding an earlier answer), exactly the response's tokens.
    assert rows == [answer["正面"]] * 3 + [answer["负面"]] * 3
    assert tokenizer.decode(answer["正面"]).strip().startswith("正面")


@pytest.mark.parametrize(
    "text,line,message",
    [
        (
            '{"prompt": "好", "chosen": "a", "rejected": "b"}\n{"prompt": "好", "chosen": "a"}',
            2,
            "missing or non-string field 'rejected'",
        ),
        ('{"prompt": "好", "rejected": "b"}', 1, "missing or non-string field 'chosen'"),
        ('\n\n{"prompt": "好", "chosen": "一样", "rejected": "一样"}', 3, "'chosen' and 'rejected' are identical"),
        ('{"prompt": "  ", "chosen": "a", "rejected": "b"}', 1, "empty prompt"),
        ('{"instruction": "", "input": "", "chosen": "a", "rejected": "b"}', 1, "empty prompt"),
        ('{"chosen": "a", "rejected": "b"}', 1, "no prompt"),
        (
            '{"messages": [{"role": "user", "content": "好"}, {"role": "assistant", "content": "嗯"}], '
            '"chosen": "a", "rejected": "b"}',
            1,
            "the context must end with a user turn",
        ),
        ('{"prompt": "好", "chosen": "", "rejected": "b"}', 1, "field 'chosen' is empty"),
        (
            '[\n  {"prompt": "好", "chosen": "a", "rejected": "b"},\n  {"prompt": "好",\n   "chosen": "a"}\n]',
            3,
            "missing or non-string field 'rejected'",
        ),
        ('{"prompt": "好", "chosen": "a", "rejected": "b"}\n{"prompt": ', 2, "invalid JSON line"),
    ],
)
def test_bad_records_are_refused_naming_the_line(tmp_path, text, line, message):
    path = tmp_path / "prefs.json"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(DataError) as error:
        load_preferences(path)
    assert str(error.value).startswith(f"{path}:{line}: ") and message in str(error.value), str(error.value)
    assert "\n" not in str(error.value)


def test_review_preferences_leave_out_the_held_out_reviews(tmp_path):
    path = build_review_preferences(tmp_path)
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert len(records) > 10000
    assert not any(is_held_out(r["input"]) for r in records)
    assert {(r["chosen"], r["rejected"]) for r in records} == {("正面", "负面"), ("负面", "正面")}
    assert records[0]["instruction"] == "判断这条评论的情感是正面还是负面。"


def test_validation_pairs_are_indexed_apart_from_training(tokenizer, tmp_path):
    path = cue_preferences(tmp_path / "cues.jsonl")
    data = PreferenceData(path, ChatTemplate.named("chat"), tokenizer, 64, 4, val_fraction=0.25, seed=3)
    data.setup()
    val, train = (
        {data.val[i]["index"] for i in range(len(data.val))},
        {data.train[i]["index"] for i in range(len(data.train))},
    )
    assert not val & train and val | train == set(range(len(data.all)))
    again = PreferenceData(path, ChatTemplate.named("chat"), tokenizer, 64, 4, val_fraction=0.25, seed=3)
    again.setup()
    assert again.fingerprint == data.fingerprint
    other = PreferenceData(path, ChatTemplate.named("chat"), tokenizer, 32, 4, val_fraction=0.25, seed=3)
    other.setup()
    assert other.fingerprint != data.fingerprint  # the stored reference is tied to the tokens scored


# ------------------------------------------------------------------------------- runs end to end

POSITIVE = ["很喜欢", "非常满意", "值得推荐", "质量很好"]
NEGATIVE = ["很讨厌", "非常失望", "不会再买", "质量很差"]
SUBJECTS = [
    "这家店的衣服",
    "酒店的房间",
    "手机的屏幕",
    "这本书",
    "客服的态度",
    "早餐",
    "快递的速度",
    "这双鞋",
    "电脑的键盘",
    "餐厅的菜",
    "耳机的声音",
    "宾馆的服务",
]


def cue_preferences(path: Path) -> Path:
    """A small set whose preference a tiny model can learn: the sentiment word decides the label;
    validation pairs are unseen subject x word combinations."""
    rows = []
    for subject in SUBJECTS:
        for words, label, other in ((POSITIVE, "正面", "负面"), (NEGATIVE, "负面", "正面")):
            for word in words:
                rows.append(
                    {
                        "instruction": "判断这条评论的情感是正面还是负面。",
                        "input": f"{subject}{word}。",
                        "chosen": label,
                        "rejected": other,
                    }
                )
    random.Random(0).shuffle(rows)
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def base_checkpoint(tmp_path_factory, tokenizer):
    directory, _ = make_checkpoint(tmp_path_factory.mktemp("ckpt") / "base", tokenizer, sharpen=1.0)
    return directory


def metrics(run: Path) -> list[dict]:
    with open(run / "metrics.csv") as f:
        return list(csv.DictReader(f))


def column(rows, name):
    return [(int(r["step"]), float(r[name])) for r in rows if r.get(name)]


COMMON = [
    "stage=dpo",
    "template=chat",
    "logger=csv",
    "trainer.enable_progress_bar=false",
    "trainer.log_every_n_steps=1",
    "stage.seq_len=64",
    "optim.warmup_steps=0",
]


@pytest.mark.slow
@pytest.mark.parametrize("loss,settings", [("dpo", ["stage.beta=0.5"]), ("simpo", []), ("orpo", [])])
def test_preference_tuning_learns_the_preference(base_checkpoint, tmp_path, loss, settings):
    data = cue_preferences(tmp_path / "cues.jsonl")
    run = tmp_path / "run"
    llama_zh(
        *COMMON,
        f"stage.checkpoint={base_checkpoint}",
        f"stage.data={data}",
        "stage.val_fraction=0.25",
        "stage.batch_size=8",
        "trainer.max_steps=60",
        "trainer.val_check_interval=20",
        "trainer.limit_val_batches=null",
        "optim.lr=2e-3",
        f"stage.loss={loss}",
        *settings,
        run_dir=run,
    )
    rows = metrics(run)
    accuracy = column(rows, "val/rewards/accuracy")
    margin = column(rows, "val/rewards/margin")
    assert [s for s, _ in accuracy] == [19, 39, 59]
    assert accuracy[-1][1] > 0.8, accuracy
    assert margin[0][1] < margin[-1][1] and margin[-1][1] > 0, margin
    train = column(rows, "rewards/accuracy")
    assert len(train) >= 50 and all(column(rows, f"rewards/{name}") for name in ("chosen", "rejected", "margin"))
    if loss == "dpo":
        # The stored reference is the starting model: the first step's rewards are ~0 (only padding differs).
        first = {name: column(rows, f"rewards/{name}")[0] for name in ("chosen", "rejected")}
        assert all(step == 0 and abs(value) < 1e-4 for step, value in first.values()), first
    assert (run / "checkpoints" / "final" / "model.safetensors").is_file()


@pytest.mark.slow
def test_resumed_dpo_keeps_the_stored_reference(base_checkpoint, tmp_path):
    data = cue_preferences(tmp_path / "cues.jsonl")
    run = tmp_path / "run"
    args = [
        *COMMON,
        f"stage.checkpoint={base_checkpoint}",
        f"stage.data={data}",
        "stage.batch_size=4",
        "trainer.val_check_interval=2",
        "trainer.limit_val_batches=1",
        "state_every_n_steps=2",
        "optim.lr=1e-2",
    ]
    first = llama_zh(*args, "trainer.max_steps=2", run_dir=run)
    computing = "DPO reference: log-probs of"
    assert computing in first.stdout + first.stderr
    resumed = llama_zh(*args, "trainer.max_steps=4", run_dir=run)
    # Computed again here, it would be of the trained weights the state restored, not of the start.
    assert "resuming from" in resumed.stdout + resumed.stderr and computing not in resumed.stdout + resumed.stderr
    other = llama_zh(*args, "trainer.max_steps=6", "stage.max_records=40", run_dir=run, check=False)
    assert other.returncode == 1 and "DPO reference log-probs are of other preference data" in other.stderr


@pytest.mark.slow
def test_dpo_with_lora_writes_a_checkpoint_the_other_stages_read(base_checkpoint, tmp_path):
    data = cue_preferences(tmp_path / "cues.jsonl")
    run = tmp_path / "run"
    llama_zh(
        *COMMON,
        f"stage.checkpoint={base_checkpoint}",
        f"stage.data={data}",
        "stage.batch_size=4",
        "finetune=lora",
        "finetune.modules_to_save=[]",
        "finetune.dropout=0.0",
        "finetune.rank=4",
        "trainer.max_steps=4",
        "trainer.val_check_interval=2",
        "trainer.limit_val_batches=1",
        "optim.lr=1e-2",
        run_dir=run,
    )
    rows = metrics(run)
    # Adapters start at zero: the policy is exactly the reference (the adapters switched off) at step 0.
    assert column(rows, "rewards/chosen")[0] == (0, 0.0) and column(rows, "rewards/margin")[0] == (0, 0.0)
    assert column(rows, "rewards/margin")[-1][1] != 0.0  # and moves off it once trained
    final = run / "checkpoints" / "final"
    assert "stage: dpo" in (final / "model_config.yaml").read_text()
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("这本书很喜欢。\n", encoding="utf-8")
    llama_zh(
        "stage=infer",
        f"stage.checkpoint={final}",
        f"stage.prompts={prompts}",
        "stage.max_new_tokens=4",
        "stage.apply_template=true",
        "template=chat",
        f"stage.output={tmp_path / 'answers.txt'}",
        run_dir=tmp_path / "infer",
    )
    assert (tmp_path / "answers.txt").read_text(encoding="utf-8").strip()


@pytest.mark.slow
def test_bad_preference_file_is_one_line_and_nothing_is_written(base_checkpoint, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        '{"prompt": "好", "chosen": "a", "rejected": "b"}\n{"prompt": "好", "chosen": "a", "rejected": "a"}\n',
        encoding="utf-8",
    )
    result = llama_zh(
        *COMMON, f"stage.checkpoint={base_checkpoint}", f"stage.data={bad}", run_dir=tmp_path / "run", check=False
    )
    assert result.returncode == 1 and f"{bad}:2: 'chosen' and 'rejected' are identical" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "run" / "checkpoints").exists()
