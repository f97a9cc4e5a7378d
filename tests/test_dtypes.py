"""llama_zh.dtypes: the one place dtype names live; each table agrees with the tool that owns the name."""

import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from llama_zh.dtypes import (
    FLOAT_DTYPES,
    PRECISION_DTYPES,
    SAFETENSORS_CODES,
    SAFETENSORS_DTYPES,
    dtype_name,
    is_sixteen_bit,
)
from llama_zh.tensor_io import SafetensorsWriter, iter_safetensors, safetensors_header


def header_of(path) -> dict:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n])


@pytest.mark.parametrize("code", list(SAFETENSORS_DTYPES))
def test_safetensors_codes_are_the_librarys(tmp_path, code):
    """A tensor the safetensors library writes is read back with our table as the same dtype, and ours
    writes the code the library writes."""
    dtype = SAFETENSORS_DTYPES[code]
    tensor = torch.arange(6).reshape(2, 3).to(dtype)
    theirs = tmp_path / "theirs.safetensors"
    save_file({"t": tensor}, theirs)
    assert header_of(theirs)["t"]["dtype"] == code
    assert safetensors_header(theirs)[0]["t"]["dtype"] == code
    ((_, read),) = list(iter_safetensors(theirs))
    assert read.dtype == dtype and torch.equal(read, tensor)

    ours = tmp_path / "ours.safetensors"
    writer = SafetensorsWriter(ours, [("t", dtype, (2, 3))])
    writer.write("t", tensor)
    writer.close()
    assert header_of(ours)["t"]["dtype"] == SAFETENSORS_CODES[dtype] == code
    assert torch.equal(load_file(ours)["t"], tensor)


def test_float_names_are_torchs_and_every_option_takes_them():
    assert {dtype_name(d): d for d in FLOAT_DTYPES.values()} == FLOAT_DTYPES
    assert all(getattr(torch, name) is dtype for name, dtype in FLOAT_DTYPES.items())
    # the zero_checkpoint command line offers the same names
    help_text = subprocess.run(
        [sys.executable, "-m", "llama_zh.train.zero_checkpoint", "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert "{" + ",".join(FLOAT_DTYPES) + "}" in help_text


def test_precisions_name_a_16_bit_or_32_bit_dtype():
    for precision, dtype in PRECISION_DTYPES.items():
        expected = torch.bfloat16 if precision.startswith("bf16") else torch.float16
        assert dtype == (torch.float32 if precision.startswith("32") else expected), precision


def test_sixteen_bit_precisions_are_the_ones_the_table_holds_in_16_bits():
    for name, dtype in PRECISION_DTYPES.items():
        assert is_sixteen_bit(name) == (dtype.itemsize == 2), name
    assert not is_sixteen_bit("64-true")  # not a name the table knows: fp32 arithmetic


def test_no_module_spells_dtype_names_outside_the_table():
    """`str(dtype).removeprefix(...)` and tuples of Lightning precision names are the table's job."""
    import llama_zh

    package = Path(llama_zh.__file__).parent
    offenders = []
    for path in sorted(package.rglob("*.py")):
        if path.name == "dtypes.py":
            continue
        text = path.read_text()
        if 'removeprefix("torch.")' in text or '"bf16-mixed"' in text or '"16-mixed"' in text:
            offenders.append(path.relative_to(package).as_posix())
    assert offenders == []
