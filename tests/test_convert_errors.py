"""Bad input to the converters and the loader: a clear error type, a message naming the file or field,
no code run from a pickle, and no partial output left behind."""

import json
import os
import pickle
import re

import pytest
import torch
import yaml
from helpers import llama_zh, random_hf_llama

transformers = pytest.importorskip("transformers")

from llama_zh.checkpoint import CONFIG_FILE
from llama_zh.config import ConfigError, ModelConfig
from llama_zh.convert import FormatError, convert, load_checkpoint, read, write
from llama_zh.convert.registry import BY_NAME, DESTINATION_FORMATS, ONE_FILE_FORMATS
from llama_zh.errors import LlamaZhError
from llama_zh.tensor_io import CheckpointError

# (hidden, layers, heads, kv heads, ffn, vocab): tiny, GQA, 3 layers so a stream has tensors to fail midway.
SHAPE = (64, 3, 4, 2, 128, 300)


def make_hf(tmp_path, max_shard_size=None, name="hf"):
    hidden, layers, heads, kv, ffn, vocab = SHAPE
    _, path = random_hf_llama(
        tmp_path / name,
        max_positions=128,
        vocab_size=vocab,
        hidden=hidden,
        layers=layers,
        heads=heads,
        kv_heads=kv,
        ffn=ffn,
        eps=1e-6,  # LlamaConfig's default
        random_norms=False,
        max_shard_size=max_shard_size,
    )
    return path


def model_config(**changes):
    hidden, layers, heads, kv, ffn, vocab = SHAPE
    values = dict(
        vocab_size=vocab, dim=hidden, n_layers=layers, n_heads=heads, n_kv_heads=kv, ffn_dim=ffn, max_seq_len=128
    )
    return ModelConfig(**(values | changes))


def leftovers(parent, name):
    """Temporary files or directories a writer of `name` could leave in `parent`."""
    return sorted(
        p.name for p in parent.iterdir() if p.name.startswith(f".{name}.") or p.name.startswith(f"{name}.tmp")
    )


SYSTEM = f"{os.system.__module__}.system"  # how the pickle names os.system ("posix.system")


class Evil:
    """Unpickling this runs a shell command that creates `marker`."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


# ------------------------------------------------------------------------------------- missing / unknown


def test_missing_checkpoint_dir(tmp_path):
    missing = tmp_path / "no_such_model"
    with pytest.raises(CheckpointError, match=re.escape(str(missing))) as e:
        load_checkpoint(missing)
    assert "no such" in str(e.value)


def test_missing_convert_source(tmp_path):
    missing = tmp_path / "no_such_model"
    with pytest.raises(LlamaZhError, match=re.escape(str(missing))):
        convert(missing, "hf", tmp_path / "out", "native")
    assert not (tmp_path / "out").exists()


def test_dir_neither_native_nor_hf(tmp_path):
    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "weights.txt").write_text("not a model")
    with pytest.raises(CheckpointError, match=re.escape(str(odd))) as e:
        load_checkpoint(odd)
    assert CONFIG_FILE in str(e.value) and "config.json" in str(e.value)
    # Named explicitly as either format, the reader says which file is missing.
    with pytest.raises(CheckpointError, match="config.json"):
        convert(odd, "hf", tmp_path / "out", "native")
    with pytest.raises(CheckpointError, match=CONFIG_FILE):
        convert(odd, "native", tmp_path / "out", "hf")
    assert not (tmp_path / "out").exists()


def test_unknown_formats(tmp_path):
    src = make_hf(tmp_path)
    with pytest.raises(FormatError, match=r"src_format.*'safetensorz'") as e:
        convert(src, "safetensorz", tmp_path / "out", "native")
    assert "hf" in str(e.value) and "tencentpretrain" in str(e.value)  # the valid choices are listed
    with pytest.raises(FormatError, match=r"dst_format.*'onnx'") as e:
        convert(src, "hf", tmp_path / "out", "onnx")
    assert "native" in str(e.value)
    assert not (tmp_path / "out").exists()
    # The lower-level entry points check too.
    with pytest.raises(FormatError, match="src_format"):
        read(src, "pt")
    with pytest.raises(FormatError, match="dst_format"):
        write(read(src, "hf"), tmp_path / "out", "onnx")
    assert not (tmp_path / "out").exists()


def test_tencentpretrain_without_model_config(tmp_path):
    tp = convert(make_hf(tmp_path), "hf", tmp_path / "tp" / "model.bin", "tencentpretrain")
    with pytest.raises(FormatError, match="model="):
        convert(tp, "tencentpretrain", tmp_path / "out", "native")


# ------------------------------------------------------------------------------------- wrong content


def test_hf_config_not_llama(tmp_path):
    src = make_hf(tmp_path)
    config_file = src / "config.json"
    cfg = json.loads(config_file.read_text())
    cfg["model_type"], cfg["architectures"] = "gpt2", ["GPT2LMHeadModel"]
    config_file.write_text(json.dumps(cfg))
    for call in (lambda: load_checkpoint(src), lambda: convert(src, "hf", tmp_path / "out", "native")):
        with pytest.raises(ConfigError, match=re.escape(str(config_file))) as e:
            call()
        assert "gpt2" in str(e.value) and "model_type" in str(e.value)
    assert not (tmp_path / "out").exists()


def test_hf_config_unreadable(tmp_path):
    src = make_hf(tmp_path)
    (src / "config.json").write_text("{not json")
    with pytest.raises(LlamaZhError, match=re.escape(str(src / "config.json"))):
        load_checkpoint(src)


def test_hf_config_missing_field(tmp_path):
    src = make_hf(tmp_path)
    cfg = json.loads((src / "config.json").read_text())
    del cfg["hidden_size"]
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="hidden_size") as e:
        convert(src, "hf", tmp_path / "out", "native")
    assert "config.json" in str(e.value)


def test_hf_unexpected_tensor(tmp_path):
    # A bias a LLaMA model does not have: refused by name, as a CheckpointError (not a bare KeyError).
    src = make_hf(tmp_path)
    bin_dir = tmp_path / "hf_bin"
    bin_dir.mkdir()
    (bin_dir / "config.json").write_text((src / "config.json").read_text())
    model = transformers.AutoModelForCausalLM.from_pretrained(src)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["model.layers.1.self_attn.q_proj.bias"] = torch.zeros(SHAPE[0])
    torch.save(state, bin_dir / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.self_attn\.q_proj\.bias") as e:
        convert(bin_dir, "hf", tmp_path / "out", "native")
    assert str(bin_dir) in str(e.value)
    assert not (tmp_path / "out").exists()


def test_hf_missing_tensor(tmp_path):
    src = make_hf(tmp_path)
    bin_dir = tmp_path / "hf_bin"
    bin_dir.mkdir()
    (bin_dir / "config.json").write_text((src / "config.json").read_text())
    model = transformers.AutoModelForCausalLM.from_pretrained(src)
    state = {k: v.clone() for k, v in model.state_dict().items() if k != "model.layers.2.mlp.up_proj.weight"}
    torch.save(state, bin_dir / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"missing layers\.2\.ffn\.w_up\.weight"):
        load_checkpoint(bin_dir)


def test_tencentpretrain_shapes_do_not_match_config(tmp_path):
    tp = convert(make_hf(tmp_path), "hf", tmp_path / "tp" / "model.bin", "tencentpretrain")
    with pytest.raises(CheckpointError, match=re.escape(str(tp))) as e:
        convert(tp, "tencentpretrain", tmp_path / "out", "native", model=model_config(ffn_dim=256))
    msg = str(e.value)
    assert "layers.0.ffn.w_gate.weight" in msg and "(128, 64)" in msg and "(256, 64)" in msg and "ffn_dim=256" in msg
    assert not (tmp_path / "out").exists()
    # Wrong vocabulary: the embedding is named.
    with pytest.raises(CheckpointError, match=r"embed\.weight.*vocab_size=49953"):
        convert(tp, "tencentpretrain", tmp_path / "out", "native", model=model_config(vocab_size=49953))
    # Fewer layers in the config than in the file: the extra tensors are named.
    with pytest.raises(CheckpointError, match=r"unexpected layers\.2\."):
        convert(tp, "tencentpretrain", tmp_path / "out", "native", model=model_config(n_layers=2))
    assert not (tmp_path / "out").exists()


def test_native_config_vocab_mismatch(tmp_path):
    native = convert(make_hf(tmp_path), "hf", tmp_path / "native", "native")
    config_file = native / CONFIG_FILE
    meta = yaml.safe_load(config_file.read_text())
    meta["model"]["vocab_size"] = SHAPE[5] + 1
    config_file.write_text(yaml.safe_dump(meta, sort_keys=False))
    for call in (lambda: load_checkpoint(native), lambda: convert(native, "native", tmp_path / "out", "hf")):
        with pytest.raises(CheckpointError, match=re.escape(str(native))) as e:
            call()
        assert "embed.weight" in str(e.value) and f"vocab_size={SHAPE[5] + 1}" in str(e.value)
    assert not (tmp_path / "out").exists()


def test_native_config_bad_field(tmp_path):
    native = convert(make_hf(tmp_path), "hf", tmp_path / "native", "native")
    config_file = native / CONFIG_FILE
    meta = yaml.safe_load(config_file.read_text())
    meta["model"]["hiden"] = 64
    config_file.write_text(yaml.safe_dump(meta, sort_keys=False))
    with pytest.raises(ConfigError, match=re.escape(str(config_file)) + ".*hiden"):
        load_checkpoint(native)
    meta["model"].pop("hiden")
    meta["format_version"] = 99
    config_file.write_text(yaml.safe_dump(meta, sort_keys=False))
    with pytest.raises(CheckpointError, match=re.escape(str(config_file)) + ".*format_version"):
        load_checkpoint(native)


# ------------------------------------------------------------------------------------- unsafe pickles


@pytest.mark.parametrize("zipfile", [True, False], ids=["zip", "legacy"])
def test_pickle_with_code_is_refused_tencentpretrain(tmp_path, zipfile):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.bin"
    state = {"embedding.word.embedding.weight": torch.zeros(2, 2), "payload": Evil(marker)}
    torch.save(state, evil, _use_new_zipfile_serialization=zipfile)
    assert not marker.exists()
    with pytest.raises(CheckpointError, match=re.escape(str(evil))) as e:
        convert(evil, "tencentpretrain", tmp_path / "out", "native", model=model_config())
    assert "refused" in str(e.value) and SYSTEM in str(e.value)  # says what it refused
    assert "weights_only" not in str(e.value)  # and not torch's advice to load it unsafely
    assert not marker.exists(), "the pickle's code ran"
    assert not (tmp_path / "out").exists()


def test_pickle_with_code_is_refused_hf_bin(tmp_path):
    marker = tmp_path / "pwned"
    src = make_hf(tmp_path)
    bin_dir = tmp_path / "hf_bin"
    bin_dir.mkdir()
    (bin_dir / "config.json").write_text((src / "config.json").read_text())
    torch.save({"model.embed_tokens.weight": torch.zeros(2, 2), "x": Evil(marker)}, bin_dir / "pytorch_model.bin")
    for call in (lambda: load_checkpoint(bin_dir), lambda: convert(bin_dir, "hf", tmp_path / "out", "native")):
        with pytest.raises(CheckpointError, match="refused") as e:
            call()
        assert "pytorch_model.bin" in str(e.value)
    assert not marker.exists(), "the pickle's code ran"


def test_plain_pickle_with_code_is_refused(tmp_path):
    # Not written by torch.save at all: a bare pickle stream.
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.bin"
    evil.write_bytes(pickle.dumps({"w": Evil(marker)}, protocol=2))
    with pytest.raises(CheckpointError, match=re.escape(str(evil))) as e:
        convert(evil, "tencentpretrain", tmp_path / "out", "native", model=model_config())
    assert "refused" in str(e.value) and SYSTEM in str(e.value)
    assert not marker.exists(), "the pickle's code ran"


def test_not_a_pickle(tmp_path):
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"\x00garbage" * 100)
    with pytest.raises(CheckpointError, match=re.escape(str(junk))):
        convert(junk, "tencentpretrain", tmp_path / "out", "native", model=model_config())


# ------------------------------------------------------------------------------------- damaged safetensors


def _truncate(path, size):
    with open(path, "r+b") as f:
        f.truncate(size)


@pytest.mark.parametrize("keep", ["half", "header_only", "4_bytes", "empty"])
def test_truncated_safetensors(tmp_path, keep):
    src = make_hf(tmp_path)
    weights = src / "model.safetensors"
    header_len = int.from_bytes(weights.read_bytes()[:8], "little")
    size = {"half": weights.stat().st_size // 2, "header_only": 8 + header_len, "4_bytes": 4, "empty": 0}[keep]
    _truncate(weights, size)
    for call in (lambda: load_checkpoint(src), lambda: convert(src, "hf", tmp_path / "out", "native")):
        with pytest.raises(CheckpointError, match=re.escape(str(weights))) as e:
            call()
        assert "truncated" in str(e.value) or "not a" in str(e.value)
    assert not (tmp_path / "out").exists()
    assert leftovers(tmp_path, "out") == []


def test_safetensors_header_garbage(tmp_path):
    src = make_hf(tmp_path)
    weights = src / "model.safetensors"
    # A header length far beyond the file must not be trusted (no huge read).
    data = bytearray(weights.read_bytes())
    data[:8] = (2**60).to_bytes(8, "little")
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=re.escape(str(weights))):
        load_checkpoint(src)
    # A header that is JSON but not a table of tensors.
    blob = b"[1, 2, 3]"
    weights.write_bytes(len(blob).to_bytes(8, "little") + blob)
    with pytest.raises(CheckpointError, match=re.escape(str(weights))):
        load_checkpoint(src)


def test_safetensors_unsupported_dtype(tmp_path):
    src = make_hf(tmp_path)
    weights = src / "model.safetensors"
    data = weights.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    header["model.norm.weight"]["dtype"] = "F8_E4M3"
    header["model.norm.weight"]["data_offsets"][1] = header["model.norm.weight"]["data_offsets"][0] + SHAPE[0]
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    weights.write_bytes(len(blob).to_bytes(8, "little") + blob + data[8 + n :])
    with pytest.raises(CheckpointError, match=r"model\.norm\.weight.*F8_E4M3"):
        convert(src, "hf", tmp_path / "out", "native")


def test_index_lists_missing_shard(tmp_path):
    src = make_hf(tmp_path, max_shard_size="100KB")
    shards = sorted(src.glob("model-*.safetensors"))
    assert len(shards) > 1
    shards[-1].unlink()
    with pytest.raises(CheckpointError, match=re.escape(shards[-1].name)) as e:
        load_checkpoint(src)
    assert "model.safetensors.index.json" in str(e.value)


# ------------------------------------------------------------------------------------- no partial output


@pytest.mark.parametrize("dst_format", ["native", "hf", "tencentpretrain"])
def test_failed_conversion_leaves_no_output(tmp_path, dst_format):
    # The source is checked, then damaged while the weights stream: the write fails midway.
    src = make_hf(tmp_path, max_shard_size="100KB")
    shards = sorted(src.glob("model-*.safetensors"))
    assert len(shards) > 2
    stream = read(src, "hf")
    _truncate(shards[-1], shards[-1].stat().st_size - 100)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    dst = out_dir / ("model.bin" if dst_format == "tencentpretrain" else "dst")
    with pytest.raises(CheckpointError, match=re.escape(shards[-1].name)):
        write(stream, dst, dst_format, max_shard_bytes=60_000)
    assert not dst.exists()
    assert list(out_dir.iterdir()) == [], f"leftovers: {list(out_dir.iterdir())}"


def test_failed_overwrite_keeps_the_old_checkpoint(tmp_path):
    src = make_hf(tmp_path)
    dst = convert(src, "hf", tmp_path / "dst", "native")
    before = {p.name: p.read_bytes() for p in dst.iterdir()}
    stream = read(src, "hf")
    _truncate(src / "model.safetensors", (src / "model.safetensors").stat().st_size - 100)
    with pytest.raises(CheckpointError, match="truncated"):
        write(stream, dst, "native", overwrite=True)
    assert {p.name: p.read_bytes() for p in dst.iterdir()} == before
    assert leftovers(tmp_path, "dst") == []
    load_checkpoint(dst)  # still whole


def test_existing_destination_is_not_overwritten(tmp_path):
    src = make_hf(tmp_path)
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    with pytest.raises(CheckpointError, match=re.escape(str(dst)) + ".*overwrite"):
        convert(src, "hf", dst, "native")
    assert [p.name for p in dst.iterdir()] == ["keep.txt"]
    assert leftovers(tmp_path, "dst") == []


# ------------------------------------------------------------------------------ options not honoured


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gguf_refuses_a_dtype_it_would_not_write(tmp_path, dtype):
    pytest.importorskip("gguf")
    src = make_hf(tmp_path)
    with pytest.raises(FormatError, match=rf"^stage\.dtype={str(dtype)[6:]}: the GGUF export takes its tensor types"):
        convert(src, "hf", tmp_path / "out" / "m.gguf", "gguf", dtype=dtype)
    assert not (tmp_path / "out").exists()


def test_tencentpretrain_export_refuses_a_tokenizer_it_would_drop(tmp_path):
    src = make_hf(tmp_path)
    tokenizer = tmp_path / "tokenizer.model"
    tokenizer.write_bytes(b"any")  # refused before it is read
    with pytest.raises(FormatError, match=r"^stage\.tokenizer=.*a TencentPretrain \.bin holds no tokenizer"):
        convert(src, "hf", tmp_path / "tp" / "model.bin", "tencentpretrain", tokenizer=tokenizer)
    assert not (tmp_path / "tp").exists()


def run_convert(tmp_path, *overrides):
    return llama_zh(
        "stage=convert", *overrides, run_dir=tmp_path / "run", data_dir=tmp_path / "data", check=False, timeout=300
    )


@pytest.mark.parametrize(
    "overrides,message",
    [
        (
            ["stage.dst_format=gguf", "stage.dtype=float32"],
            "stage.dtype=float32: the GGUF export takes its tensor types",
        ),
        (
            ["stage.dst_format=gguf", "stage.max_shard_gb=0.5"],
            "stage.max_shard_gb=0.5: dst_format=gguf is written as one file",
        ),
        (["stage.max_shard_gb=0"], "stage.max_shard_gb must be a number > 0, got 0"),
        (["model=llama_7b"], "model=llama_7b: only stage.src_format=tencentpretrain reads model= (a hf checkpoint"),
        (["+stage.dtyp=float16"], "stage.dtyp: unknown key (did you mean stage.dtype?)"),
    ],
)
def test_convert_cli_refuses_options_it_would_ignore(tmp_path, overrides, message):
    src = make_hf(tmp_path)
    result = run_convert(tmp_path, f"stage.src={src}", f"stage.dst={tmp_path / 'out'}", *overrides)
    assert result.returncode == 1 and f"llama_zh: error: {message}" in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert not list(tmp_path.glob("out*"))


@pytest.mark.parametrize("dst_format", DESTINATION_FORMATS)
def test_the_registry_knows_which_writers_shard(tmp_path, dst_format, tiny_checkpoint):
    """Format.sharded (what stage=convert's max_shard_gb check reads) is what each writer does."""
    # GGUF embeds a tokenizer (the tiny checkpoint's); TencentPretrain refuses to drop one (a bare HF model)
    stream = read(tiny_checkpoint[0], "native") if dst_format == "gguf" else read(make_hf(tmp_path), "hf")
    out = write(stream, tmp_path / "out", dst_format, max_shard_bytes=64 * 1024)
    weight_files = [out] if out.is_file() else [p for p in out.rglob("*") if p.suffix in (".safetensors", ".bin")]
    assert weight_files, out
    assert (len(weight_files) > 1) == BY_NAME[dst_format].sharded, weight_files
    assert (dst_format in ONE_FILE_FORMATS) == (not BY_NAME[dst_format].sharded)
