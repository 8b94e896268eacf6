"""The seal: ``config.json`` records the sha256 of ``model.safetensors``'s tensor data, and every
tool that reads a converted folder back (``lic.load``, ``lic-verify``, ``lic-push``,
``lic-convert --inverse``) refuses a file that no longer hashes to it, in one line."""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
import threading
from pathlib import Path

import pytest
from click.testing import CliRunner

import lic_checkpoints as lic
from conftest import SMALL
from lic_checkpoints.convert import api
from lic_checkpoints.convert.cli import main as convert_main
from lic_checkpoints.convert.seal import SealMismatchError, recorded_seal
from lic_checkpoints.convert.writer import write_safetensors
from lic_checkpoints.publish import bundle
from lic_checkpoints.publish.errors import PublishError
from lic_checkpoints.verify.cli import main as verify_main


def _data_region(path: Path) -> tuple[int, int]:
    """(start, end) of the tensor data, read with the safetensors format's own definition."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return 8 + n, len(raw)


@pytest.fixture(scope="module")
def sealed(checkpoints, tmp_path_factory):
    """The smallest configuration converted once: (source checkpoint, output folder)."""
    src = checkpoints.path(SMALL)
    out = tmp_path_factory.mktemp("sealed") / "converted"
    api.convert_checkpoint(src, out)
    yield src, out
    shutil.rmtree(out.parent, ignore_errors=True)


@pytest.fixture
def altered(sealed, tmp_path):
    """A copy of the converted folder with one byte flipped in the middle of its tensor data."""
    _, out = sealed
    copy = tmp_path / "altered"
    shutil.copytree(out, copy)
    model = copy / api.MODEL_FILE
    start, end = _data_region(model)
    with open(model, "r+b") as fh:
        fh.seek((start + end) // 2)
        byte = fh.read(1)
        fh.seek((start + end) // 2)
        fh.write(bytes([byte[0] ^ 0x10]))
    return copy


def test_config_records_the_sha256_of_the_tensor_data(sealed):
    _, out = sealed
    model = out / api.MODEL_FILE
    start, _ = _data_region(model)
    expected = hashlib.sha256(model.read_bytes()[start:]).hexdigest()
    config = json.loads((out / api.CONFIG_FILE).read_text())
    assert recorded_seal(config) == expected
    assert config["output"]["file"] == api.MODEL_FILE


def test_an_intact_folder_loads(sealed):
    _, out = sealed
    net = lic.load(out, update=False)
    assert not net.training


def test_load_refuses_a_flipped_byte_in_one_line_naming_the_file(altered):
    with pytest.raises(lic.LicError) as info:
        lic.load(altered)
    message = str(info.value)
    assert isinstance(info.value, SealMismatchError)
    assert "\n" not in message and str(altered / api.MODEL_FILE) in message
    assert "sha256 recorded in config.json" in message and "check_integrity=False" in message
    # on request the file loads as it is
    net = lic.load(altered, update=False, check_integrity=False)
    assert not net.training


def test_lic_verify_reports_the_mismatch_before_any_tier(sealed, altered):
    src, _ = sealed
    result = CliRunner().invoke(verify_main, [str(src), str(altered), "--tiers", "T0"])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "sha256 recorded in config.json" in lines[0], result.output
    assert "--skip-integrity-check" in lines[0] and "Traceback" not in result.output
    assert not (altered / "parity_report.json").exists()  # no tier ran, no report was written


def test_lic_verify_skip_flag_runs_the_tiers_and_t0_finds_the_altered_tensor(sealed, altered):
    src, _ = sealed
    result = CliRunner().invoke(verify_main, [str(src), str(altered), "--tiers", "T0", "--skip-integrity-check"])
    assert result.exit_code == 1, result.output
    report = json.loads((altered / "parity_report.json").read_text())
    assert report["converted"]["seal"] == "not checked (skipped on request)"
    assert any("not checked, on request" in n for n in report["notes"])
    assert not report["tiers"]["T0"]["passed"]


def test_lic_verify_of_the_intact_folder_records_the_checked_seal(sealed, tmp_path):
    src, out = sealed
    copy = tmp_path / "intact"
    shutil.copytree(out, copy)
    result = CliRunner().invoke(verify_main, [str(src), str(copy), "--tiers", "T0"])
    assert result.exit_code == 0, result.output
    report = json.loads((copy / "parity_report.json").read_text())
    digest = recorded_seal(json.loads((copy / api.CONFIG_FILE).read_text()))
    assert report["converted"]["seal"] == f"matches config.json (sha256 {digest})"
    assert f"matches config.json (sha256 {digest})" in (copy / "parity_report.md").read_text()


def test_push_refuses_an_altered_folder(altered):
    with pytest.raises(PublishError, match="sha256 recorded in config.json"):
        bundle.collect(altered, "owner/name", allow_failing_parity=True)


def test_inverse_refuses_an_altered_folder(altered, tmp_path):
    result = CliRunner().invoke(convert_main, [str(altered), "--inverse", "-o", str(tmp_path / "back")])
    assert result.exit_code == 2, result.output
    assert "sha256 recorded in config.json" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "back").exists() or not any((tmp_path / "back").iterdir())


def test_a_folder_from_before_seals_still_loads(sealed, tmp_path):
    _, out = sealed
    copy = tmp_path / "old"
    shutil.copytree(out, copy)
    config = json.loads((copy / api.CONFIG_FILE).read_text())
    del config["output"]
    (copy / api.CONFIG_FILE).write_text(json.dumps(config))
    assert not lic.load(copy, update=False).training


def test_the_seal_follows_the_writer_over_many_small_and_large_tensors(tmp_path):
    import numpy as np

    rng = np.random.default_rng(0)
    sizes = [0, 1, 3, 1 << 20, 7, (1 << 22) + 5, 64]
    values = {f"t{i}": rng.standard_normal(n).astype(np.float32) for i, n in enumerate(sizes)}
    written = write_safetensors(tmp_path / "m.safetensors", [(k, v.shape, "float32") for k, v in values.items()],
                                values.__getitem__, {"format": "pt"})
    start, end = _data_region(tmp_path / "m.safetensors")
    assert written.nbytes == end
    data = b"".join(v.tobytes() for v in values.values())
    assert written.tensor_data_sha256 == hashlib.sha256(data).hexdigest()


def _bfloat16_bits(values):
    import numpy as np

    return (values.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)


@pytest.mark.parametrize("seed", range(6))
def test_the_read_back_finds_every_nan_and_inf_wherever_reads_end(tmp_path, seed):
    """The read-back hashes and checks in chunks; tensors of every width start at odd offsets and
    straddle chunk ends, and a bad value sits right at a tensor's edges or across a chunk end."""
    import numpy as np

    from lic_checkpoints.convert import readback

    rng = np.random.default_rng(seed)
    chunk = readback.CHUNK
    widths = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2}
    entries, values, bad, offset = [], {}, [], 0
    for i in range(14):
        dtype = str(rng.choice(["float64", "float32", "float16", "bfloat16", "uint8", "int64"]))
        if dtype == "uint8":
            n = int(rng.integers(1, 8))  # odd sizes move every later tensor off its alignment
            value = rng.integers(0, 255, n, dtype=np.uint8)
        elif dtype == "int64":
            n = int(rng.integers(1, 5))
            value = rng.integers(-9, 9, n).astype(np.int64)
        else:
            width = widths[dtype]
            n = int(rng.integers(chunk // width // 3, 2 * chunk // width))  # often across a chunk end
            floats = rng.standard_normal(n)
            if rng.random() < 0.5:
                # a bad value first, last, or on the element that holds the next chunk end
                across = (((offset // chunk) + 1) * chunk - offset) // width
                where = int(rng.choice([0, n - 1, min(max(across, 0), n - 1)]))
                floats[where] = rng.choice([np.nan, np.inf, -np.inf])
                bad.append(f"t{i}")
            value = _bfloat16_bits(floats) if dtype == "bfloat16" else floats.astype(dtype)
        key = f"t{i}"
        entries.append((key, value.shape, dtype))
        values[key] = value
        offset += value.nbytes
    written = write_safetensors(tmp_path / "m.safetensors", entries, values.__getitem__, {"format": "pt"})
    assert list(written.non_finite) == bad
    data = b"".join(v.tobytes() for v in values.values())
    assert written.tensor_data_sha256 == hashlib.sha256(data).hexdigest()
    start, end = _data_region(tmp_path / "m.safetensors")
    assert (tmp_path / "m.safetensors").read_bytes()[start:] == data


def test_final_metadata_hears_of_the_bad_tensors_before_the_header_is_final(tmp_path):
    import numpy as np

    values = {"a": np.ones(5, np.float32), "b": np.array([1.0, np.nan], np.float16), "c": np.zeros(3, np.float32)}
    heard = []

    def final(non_finite):
        heard.append(non_finite)
        return {"format": "pt", "bad": ",".join(non_finite)}

    write_safetensors(tmp_path / "m.safetensors", [(k, v.shape, str(v.dtype)) for k, v in values.items()],
                      values.__getitem__, {"format": "pt"}, final_metadata=final)
    assert heard == [("b",)]
    from safetensors import safe_open

    with safe_open(str(tmp_path / "m.safetensors"), "np") as fh:
        assert fh.metadata()["bad"] == "b"


def test_a_failed_write_leaves_no_hashing_thread_and_no_file(tmp_path):
    before = {t.name for t in threading.enumerate()}

    def produce(key):
        raise RuntimeError("the rule failed")

    with pytest.raises(RuntimeError):
        write_safetensors(tmp_path / "m.safetensors", [("a", (4,), "float32")], produce, {"format": "pt"})
    assert "seal" not in {t.name for t in threading.enumerate()} - before
    assert list(tmp_path.iterdir()) == []
