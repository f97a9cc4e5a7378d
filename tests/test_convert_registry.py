"""The format registry (llama_zh.convert.registry): each format recognised from a tiny checkpoint of its
own, a clear one-line refusal of anything else, the same bytes and tensors as each format module's own
reader and writer, and no import circle between the converters and llama_zh.checkpoint."""

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_checkpoints import make_checkpoint, train_tokenizer

from llama_zh.checkpoint import CONFIG_FILE, read_native, write_native
from llama_zh.convert import (
    DESTINATION_FORMATS,
    FORMATS,
    SOURCE_FORMATS,
    FormatError,
    convert,
    detect,
    gguf,
    hf,
    load_checkpoint,
    meta,
    native,
    read,
    read_any,
    tencentpretrain,
    write,
)
from llama_zh.convert.keys import halves_to_interleaved, rope_permuter
from llama_zh.data.chat_template import CHECKPOINT_KEY
from llama_zh.tensor_io import CheckpointError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory):
    """One tiny checkpoint per format, all of the same model: {format name: path}."""
    root = tmp_path_factory.mktemp("formats")
    tokenizer = train_tokenizer(root / "tok")
    native_dir, _ = make_checkpoint(root / "native", tokenizer)
    paths = {"native": native_dir}
    paths["hf"] = convert(native_dir, "native", root / "hf", "hf")
    paths["tencentpretrain"] = convert(native_dir, "native", root / "tp" / "model.bin", "tencentpretrain")
    paths["gguf"] = convert(native_dir, "native", root / "model.gguf", "gguf")
    paths["meta"] = write_meta(read_native(native_dir), root / "meta")
    peft_dir = root / "adapter"
    peft_dir.mkdir()
    (peft_dir / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8}))
    paths["peft"] = peft_dir
    return paths


def write_meta(stream, directory: Path) -> Path:
    """A one-shard Meta release of `stream`: Meta's names, q/k rows in the interleaved RoPE layout."""
    config = stream.config
    permute = rope_permuter(config.n_heads, config.n_kv_heads, halves_to_interleaved)
    state = {meta.KEYS.to_outside(name): permute(name, t).clone() for name, t in stream.tensors()}
    directory.mkdir()
    torch.save(state, directory / "consolidated.00.pth")
    params = {"dim": config.dim, "n_layers": config.n_layers, "n_heads": config.n_heads}
    params |= {"n_kv_heads": config.n_kv_heads, "norm_eps": config.norm_eps, "rope_theta": config.rope_theta}
    (directory / "params.json").write_text(json.dumps(params))
    return directory


def tensors(stream) -> dict[str, torch.Tensor]:
    return dict(stream.tensors())


def assert_same_tensors(a: dict, b: dict) -> None:
    assert list(a) == list(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name


def files(directory: Path) -> dict[str, bytes]:
    if directory.is_file():
        return {directory.name: directory.read_bytes()}
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


# ------------------------------------------------------------------------------------- the table


def test_the_table_names_every_format_once():
    names = [f.name for f in FORMATS]
    assert names == ["native", "hf", "meta", "tencentpretrain", "gguf", "peft"]
    assert SOURCE_FORMATS == ("native", "hf", "meta", "tencentpretrain")
    assert DESTINATION_FORMATS == ("native", "hf", "tencentpretrain", "gguf")
    # Each format module holds its own entry: the table only orders them.
    modules = (native, hf, meta, tencentpretrain, gguf)
    assert all(m.FORMAT in FORMATS for m in modules)
    for f in FORMATS:
        assert f.read is not None or f.unreadable, f"{f.name}: no reader and no reason given"


@pytest.mark.parametrize("name", ["native", "hf", "meta", "tencentpretrain", "gguf", "peft"])
def test_each_format_is_recognised_by_its_own_detector_alone(fixtures, name):
    path = fixtures[name]
    assert detect(path).name == name
    accepted = [f.name for f in FORMATS if f.detect(path)]
    assert accepted == [name], f"{path} is also taken for {accepted}"


def test_a_lora_checkpoint_is_native_not_an_adapter(fixtures, tmp_path):
    """A finetune=lora checkpoint keeps adapter_config.json beside model_config.yaml: it is read as native."""
    lora = tmp_path / "lora"
    write_native(read_native(fixtures["native"]), lora)
    (lora / "adapter_config.json").write_text("{}")
    assert detect(lora).name == "native"


# ------------------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("what", ["directory", "file"])
def test_an_unknown_layout_is_one_line_naming_the_path_and_every_format(tmp_path, what):
    odd = tmp_path / "odd"
    if what == "directory":
        odd.mkdir()
        (odd / "weights.txt").write_text("not a model")
    else:
        odd.write_text("not a model")
    assert detect(odd) is None
    for load in (read_any, load_checkpoint):
        with pytest.raises(CheckpointError) as e:
            load(odd)
        message = str(e.value)
        assert "\n" not in message and message.startswith(f"{odd}: ")
        for f in FORMATS:
            assert f"{f.name}: " in message, f"{f.name} missing from: {message}"
        assert CONFIG_FILE in message and "config.json" in message and "params.json" in message


def test_a_missing_path_is_named(tmp_path):
    with pytest.raises(CheckpointError, match=f"^{tmp_path / 'nothing'}: no such checkpoint"):
        read_any(tmp_path / "nothing")


@pytest.mark.parametrize("name,why", [("gguf", "does not read"), ("peft", "stage.adapter")])
def test_a_format_without_a_reader_says_why(fixtures, name, why):
    with pytest.raises(CheckpointError) as e:
        read_any(fixtures[name])
    message = str(e.value)
    assert message.startswith(f"{fixtures[name]}: ") and why in message and "\n" not in message


def test_a_tencentpretrain_file_needs_its_shape(fixtures):
    """read_any has no model= to give it: the refusal names the file and the option."""
    with pytest.raises(FormatError, match=rf"^{fixtures['tencentpretrain']}: .*model=<name>"):
        read_any(fixtures["tencentpretrain"])


@pytest.mark.parametrize("src_format", ["gguf", "peft", "onnx"])
def test_only_formats_with_a_reader_are_sources(fixtures, src_format):
    with pytest.raises(FormatError, match=rf"^stage\.src_format: unknown format '{src_format}'; expected one of"):
        read(fixtures["native"], src_format)


@pytest.mark.parametrize("dst_format", ["meta", "peft", "onnx"])
def test_only_formats_with_a_writer_are_destinations(fixtures, tmp_path, dst_format):
    with pytest.raises(FormatError, match=rf"^stage\.dst_format: unknown format '{dst_format}'; expected one of"):
        write(read_native(fixtures["native"]), tmp_path / "out", dst_format)
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------- same as the modules


@pytest.mark.parametrize("name", ["native", "hf", "meta"])
def test_read_any_gives_what_the_format_module_reads(fixtures, name):
    module_read = {"native": read_native, "hf": hf.read, "meta": meta.read}[name]
    by_layout, by_module = read_any(fixtures[name]), module_read(fixtures[name])
    assert by_layout.config == by_module.config and by_layout.specs == by_module.specs
    assert_same_tensors(tensors(by_layout), tensors(by_module))
    # and every reader gives back the weights the native checkpoint was written with
    assert_same_tensors(tensors(by_layout), tensors(read_native(fixtures["native"])))


def test_tencentpretrain_read_by_name_equals_the_module(fixtures):
    config = read_native(fixtures["native"]).config
    by_name = read(fixtures["tencentpretrain"], "tencentpretrain", config)
    assert_same_tensors(tensors(by_name), tensors(tencentpretrain.read(fixtures["tencentpretrain"], config)))


@pytest.mark.parametrize("name", ["native", "hf", "tencentpretrain", "gguf"])
def test_writing_by_name_writes_the_bytes_the_module_writes(fixtures, tmp_path, name):
    stream = read_native(fixtures["native"])
    suffix = {"tencentpretrain": ".bin", "gguf": ".gguf"}.get(name, "")
    by_name = write(stream, tmp_path / f"by_name{suffix}", name, chat_template="{{ messages }}")
    direct = tmp_path / f"direct{suffix}"
    if name == "native":
        write_native(stream, direct, extra={CHECKPOINT_KEY: "{{ messages }}"})
    elif name == "hf":
        hf.write(stream, direct, chat_template="{{ messages }}")
    elif name == "tencentpretrain":
        tencentpretrain.write(stream, direct)
    else:
        gguf.write(stream, direct, chat_template="{{ messages }}")
    assert files(by_name) == {k.replace("direct", "by_name"): v for k, v in files(direct).items()}


@pytest.mark.parametrize("via", ["hf", "tencentpretrain"])
def test_a_round_trip_through_the_registry_keeps_every_tensor(fixtures, tmp_path, via):
    original = read_native(fixtures["native"])
    out = tmp_path / ("out.bin" if via == "tencentpretrain" else "out")
    write(original, out, via)
    back = read(out, via, original.config)
    write(back, tmp_path / "native", "native")
    assert_same_tensors(tensors(read_any(tmp_path / "native")), tensors(original))


# ------------------------------------------------------------------------------------- imports


def _modules() -> dict[str, Path]:
    found = {"llama_zh.checkpoint": ROOT / "llama_zh" / "checkpoint.py"}
    found["llama_zh.tensor_io"] = ROOT / "llama_zh" / "tensor_io.py"
    for path in sorted((ROOT / "llama_zh" / "convert").glob("*.py")):
        found["llama_zh.convert" + ("" if path.stem == "__init__" else f".{path.stem}")] = path
    return found


def _module_level_imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """The modules of `modules` that `path` imports while it loads (imports inside functions run later)."""
    out = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            for a in node.names:  # `from package import submodule` imports the submodule
                out.add(f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module)
    return out & set(modules)


def test_no_import_cycle_among_checkpoint_and_the_converters():
    modules = _modules()
    graph = {name: _module_level_imports(path, modules) for name, path in modules.items()}
    assert not {m for m in graph["llama_zh.checkpoint"] if m.startswith("llama_zh.convert")}
    done, path = set(), []

    def visit(name):
        if name in path:
            raise AssertionError(f"import cycle: {' -> '.join(path[path.index(name) :] + [name])}")
        if name in done:
            return
        path.append(name)
        for dep in sorted(graph[name]):
            visit(dep)
        path.pop()
        done.add(name)

    for name in graph:
        visit(name)


@pytest.mark.parametrize("module", ["checkpoint.py", "tensor_io.py"])
def test_the_modules_below_the_converters_import_them_nowhere(module):
    """Not even inside a function: a deferred import is the circle waiting for its first caller
    (load_checkpoint, which reads any format, sits in the registry above them)."""
    tree = ast.parse((ROOT / "llama_zh" / module).read_text())
    imported = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module]
    imported += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    assert imported and not [m for m in imported if m.startswith("llama_zh.convert")]


def test_no_private_name_of_checkpoint_or_tensor_io_is_imported():
    offenders = []
    for path in [
        *(ROOT / "llama_zh").rglob("*.py"),
        *(ROOT / "tests").glob("*.py"),
        *(ROOT / "experiments").glob("*.py"),
    ]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module in ("llama_zh.checkpoint", "llama_zh.tensor_io"):
                offenders += [f"{path.relative_to(ROOT)}: {a.name}" for a in node.names if a.name.startswith("_")]
    assert not offenders


# The modules the old circle ran through, and the table that now imports every format: each must load
# first in a fresh interpreter (a circle shows there as a partly initialised module), and the table
# must not pull in the training stack that the PEFT merge uses.
@pytest.mark.parametrize(
    "name", ["llama_zh.checkpoint", "llama_zh.convert.hf", "llama_zh.convert.peft", "llama_zh.convert.registry"]
)
def test_each_module_imports_first_in_a_fresh_interpreter(name):
    script = (
        "import importlib, sys\n"
        f"importlib.import_module({name!r})\n"
        "assert 'llama_zh.train.finetune' not in sys.modules, 'the training stack was loaded'\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, f"import {name}:\n{result.stderr[-2000:]}"
