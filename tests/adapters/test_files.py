"""LoRA files on disk: the safetensors reader (dtypes, damaged files, pickles), A1111's hash, and
``<lora:NAME>`` look-ups in a folder (stems with dots, spaces, aliases with brackets, subfolders)."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from engine.adapters import AdapterError, find_lora, list_loras, lora_hash, read_lora
from tests.adapters.lora_files import save_lora

REPO = Path(__file__).resolve().parents[2]


def one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message and message
    return message


def test_reads_tensors_of_every_float_dtype_and_metadata(tmp_path, rng):
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file

    values = torch.from_numpy(rng.standard_normal((3, 5)).astype(np.float32))
    tensors = {
        "a.f32": values,
        "a.f16": values.half(),
        "a.bf16": values.bfloat16(),
        "a.alpha": torch.tensor(4.0, dtype=torch.float16),
        "a.empty": torch.zeros((0, 4)),
    }
    path = tmp_path / "dtypes.safetensors"
    save_file(tensors, str(path), metadata={"ss_output_name": "Alias [x]", "other": "1"})
    lora = read_lora(path)
    assert (lora.name, lora.alias, lora.metadata["other"]) == ("dtypes", "Alias [x]", "1")
    for key, tensor in tensors.items():
        expected = tensor.float().numpy()
        assert lora.tensors[key].shape == expected.shape
        np.testing.assert_array_equal(lora.tensors[key].astype(np.float32), expected)
    assert lora.tensors["a.f16"].dtype == np.float16 and lora.tensors["a.bf16"].dtype == np.float32
    assert lora.tensors["a.alpha"].shape == () and float(lora.tensors["a.alpha"]) == 4.0
    assert not lora.tensors["a.f32"].flags.writeable  # a view of the mapped file, not a copy


def write_valid(path: Path) -> Path:
    tensors = {
        "lora_unet_x.lora_down.weight": np.ones((2, 4), np.float32),
        "lora_unet_x.alpha": np.float32(1),
    }
    return save_lora(path, tensors, {"k": "v"})


def damaged_files(tmp_path: Path) -> dict[str, Path]:
    valid = write_valid(tmp_path / "valid.safetensors").read_bytes()
    header_length = int.from_bytes(valid[:8], "little")
    header = json.loads(valid[8 : 8 + header_length])
    header["lora_unet_x.lora_down.weight"]["data_offsets"] = [0, 4]  # 4 bytes for 8 floats
    wrong = json.dumps(header).encode()
    cases = {
        "empty": b"",
        "short": valid[:5],
        "truncated": valid[:-3],
        "garbage": b"\x00" * 64,
        "huge-header": (2**62).to_bytes(8, "little") + valid[8:],
        "not-json": (10).to_bytes(8, "little") + b"{not json!" + valid[8 + 10 :],
        "wrong-size": len(wrong).to_bytes(8, "little") + wrong + valid[8 + header_length :],
        "text": b"this is a text file, not a LoRA at all, but it is long enough",
    }
    paths = {}
    for name, data in cases.items():
        paths[name] = tmp_path / f"{name}.safetensors"
        paths[name].write_bytes(data)
    return paths


def test_damaged_files_are_one_line_errors_naming_the_file(tmp_path):
    for name, path in damaged_files(tmp_path).items():
        with pytest.raises(AdapterError) as error:
            read_lora(path)
        assert path.name in one_line(error), name
        with pytest.raises(AdapterError):
            lora_hash(path)


def test_pickles_and_missing_files_are_refused_in_one_line(tmp_path):
    for suffix in (".ckpt", ".pt", ".bin"):
        path = tmp_path / f"lora{suffix}"
        path.write_bytes(b"\x80\x02}q\x00.")  # a pickle: it is never opened
        with pytest.raises(AdapterError) as error:
            read_lora(path)
        assert "pickle" in one_line(error) and path.name in str(error.value)
    with pytest.raises(AdapterError, match="no LoRA file"):
        read_lora(tmp_path / "absent.safetensors")


def test_lora_hash_is_sha256_after_the_header(tmp_path):
    path = write_valid(tmp_path / "a.safetensors")
    data = path.read_bytes()
    after_header = data[8 + int.from_bytes(data[:8], "little") :]
    assert lora_hash(path) == hashlib.sha256(after_header).hexdigest()
    # metadata is not part of it (A1111's addnet hash), the tensor bytes are
    renamed = save_lora(tmp_path / "b.safetensors", read_lora(path).tensors, {"ss_output_name": "other"})
    assert lora_hash(renamed) == lora_hash(path) != hashlib.sha256(data).hexdigest()


def lora_folder(root: Path) -> Path:
    tensors = {"lora_unet_x.lora_down.weight": np.ones((1, 2), np.float32)}
    names = {
        "PAseer.GoldenWind-SD1.5-V1": None,
        "double__under": None,
        "with space": None,
        "sub/aliased": "[XL]Bloodborne",
        "Mixed": None,
        "named-b": "b",  # an alias that is another file's stem
        "b": None,
        "deep/er/same": None,
        "other/same": None,
    }
    for name, alias in names.items():
        save_lora(root / f"{name}.safetensors", tensors, {"ss_output_name": alias} if alias else None)
    (root / "pickled.pt").write_bytes(b"\x80\x02}q\x00.")
    (root / "notes.txt").write_text("not a LoRA")
    return root


def test_find_lora_by_stem_alias_path_and_case(tmp_path):
    root = lora_folder(tmp_path / "loras")
    assert find_lora("PAseer.GoldenWind-SD1.5-V1", root).name == "PAseer.GoldenWind-SD1.5-V1.safetensors"
    assert find_lora("double__under", root).stem == "double__under"
    assert find_lora("with space", root).stem == "with space"
    assert find_lora("[XL]Bloodborne", root) == root / "sub" / "aliased.safetensors"
    assert find_lora("[xl]bloodborne", root) == root / "sub" / "aliased.safetensors"  # case-insensitive last
    assert find_lora("aliased", root) == root / "sub" / "aliased.safetensors"  # subfolders are searched
    assert find_lora("mixed", root).stem == "Mixed"
    assert find_lora("b", root) == root / "b.safetensors"  # an exact stem wins over an alias
    assert find_lora("deep/er/same", root) == root / "deep" / "er" / "same.safetensors"
    save_lora(root / "top.safetensors", {"a.alpha": np.float32(1)})
    save_lora(root / "sub" / "top.safetensors", {"a.alpha": np.float32(1)})
    assert find_lora("top", root) == root / "top.safetensors"  # its path in the folder is its stem
    assert find_lora("sub/top", root) == root / "sub" / "top.safetensors"
    assert find_lora("with space.safetensors", root).stem == "with space"
    assert find_lora("pickled", root).suffix == ".pt"  # found, so that reading it says why it is refused
    with pytest.raises(AdapterError, match="pickle"):
        read_lora(find_lora("pickled", root))


def test_find_lora_errors(tmp_path):
    root = lora_folder(tmp_path / "loras")
    with pytest.raises(AdapterError) as error:
        find_lora("nope", root)
    assert one_line(error).startswith(f"no LoRA named 'nope' in {root} (have: Mixed, PAseer.GoldenWind")
    with pytest.raises(AdapterError) as error:
        find_lora("same", root)
    assert "deep/er/same.safetensors, other/same.safetensors" in one_line(error)
    with pytest.raises(AdapterError, match="does not exist"):
        find_lora("x", tmp_path / "absent")
    for i in range(12):
        save_lora(tmp_path / "many" / f"l{i:02d}.safetensors", {"a.alpha": np.float32(1)})
    with pytest.raises(AdapterError) as error:
        find_lora("x", tmp_path / "many")
    assert one_line(error).endswith("l09, ... (12 in all))")


def test_list_loras_reads_headers(tmp_path):
    root = lora_folder(tmp_path / "loras")
    (root / "broken.safetensors").write_bytes(b"garbage")
    infos = {info.name: info for info in list_loras(root)}
    assert "pickled" not in infos and "notes" not in infos
    assert (
        infos["aliased"].alias == "[XL]Bloodborne"
        and infos["aliased"].path == root / "sub" / "aliased.safetensors"
    )
    assert infos["with space"].alias is None and infos["broken"].alias is None


def test_runtime_imports_no_torch_or_safetensors():
    code = (
        "import sys, engine.adapters; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('torch', 'safetensors', 'diffusers', 'transformers', 'onnx', 'peft')))"
    )
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert run.stdout.strip() == "[]"
