"""Hostile and broken inputs, interrupted and concurrent runs: lic-convert fails cleanly or not at all.

Complements tests/test_convert_cli.py (missing, empty, text, truncated files, bad state dicts, a legacy
hostile pickle).  Every refusal is one ``lic-convert: error:`` line, exit code 2, and no file under a
final output name.  Processes that must be killed or starved run the real console script.
"""

from __future__ import annotations

import ctypes
import json
import os
import resource
import signal
import struct
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from conftest import SMALL, configuration, remove_tree, upstream_state_dict
from lic_checkpoints.convert import api
from lic_checkpoints.convert.cli import main

NAME = SMALL  # the smallest published configuration keeps these tests quick
CONF = configuration(NAME)


def run(args, **env):
    result = CliRunner().invoke(main, [str(a) for a in args], env=env or None)
    return result.exit_code, result.stdout, result.stderr


def run_process(args, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(["lic-convert", *map(str, args)], capture_output=True, text=True, **kwargs)


def error_line(code: int, stderr: str, needle: str) -> str:
    """The single error line of a clean failure, checked to contain ``needle``."""
    assert code == 2, stderr
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.strip().splitlines() if line.startswith("lic-convert: error:")]
    assert len(lines) == 1, stderr
    assert needle.lower() in lines[0].lower(), lines[0]
    return lines[0]


def no_output(out_dir: Path) -> bool:
    return not out_dir.exists() or not any(out_dir.iterdir())


@pytest.fixture(scope="module")
def state():
    return upstream_state_dict(NAME)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, state) -> Path:
    folder = tmp_path_factory.mktemp("ckpt")
    path = folder / "checkpoint.pth.tar"
    torch.save({"state_dict": state}, path)
    yield path
    remove_tree(folder)


@pytest.fixture(scope="module")
def converted(tmp_path_factory, checkpoint) -> Path:
    out = tmp_path_factory.mktemp("converted")
    api.convert_checkpoint(checkpoint, out)
    yield out
    remove_tree(out)


@pytest.fixture(scope="module")
def same_name_weights(checkpoint, state) -> list[str]:
    """Convolution weights the mapping keeps under their upstream name, in the conversion's order."""
    plan = api.convert_in_memory(checkpoint)[1].plan
    return [s.target for s in plan.steps if s.action == "rename" and tuple(s.sources) == (s.target,)
            and state[s.target].dim() == 4]


@pytest.fixture(scope="module")
def reference(converted) -> dict[str, torch.Tensor]:
    return load_file(str(converted / api.MODEL_FILE))


# --- hostile pickles -------------------------------------------------------------------------------


class _RunsCommand:
    """Unpickling this runs a shell command (here: creating a marker file)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _BenignExtra:
    """A harmless custom class, as training scripts sometimes store next to the weights."""

    def __init__(self):
        self.note = "trained for 50 epochs"


def _hostile(kind: str, folder: Path) -> tuple[Path, Path, str]:
    marker = folder / f"pwned-{kind}"
    path = folder / f"{kind}.pth.tar"
    small = {"g_a.0.conv1.weight": torch.zeros(2, 2)}
    if kind == "zip-reduce":
        torch.save({"state_dict": small, "hook": _RunsCommand(marker)}, path)
        return path, marker, "system"
    if kind == "legacy-reduce":
        torch.save({"state_dict": small, "hook": _RunsCommand(marker)}, path, _use_new_zipfile_serialization=False)
        return path, marker, "system"
    torch.save({"state_dict": small, "hook": os.getcwd}, path)  # imports os, calls nothing
    return path, marker, "getcwd"


@pytest.mark.parametrize("kind", ["zip-reduce", "legacy-reduce", "zip-import-only"])
def test_hostile_pickle_refused_naming_the_global(tmp_path, kind):
    path, marker, culprit = _hostile(kind, tmp_path)
    code, _, stderr = run([path, "-o", tmp_path / "out"])
    line = error_line(code, stderr, "refused to unpickle")
    assert culprit in line and "--unsafe-trust-pickle" in line
    assert not marker.exists() and no_output(tmp_path / "out")


@pytest.mark.parametrize("extra", [["--json"], ["--full-report"], ["--format", "pth"], ["--family", CONF.family.family],
                                   ["--variant", CONF.variant.name]])
def test_no_other_option_implies_trusting_the_pickle(tmp_path, extra):
    path, marker, _ = _hostile("zip-reduce", tmp_path)
    code, _, stderr = run([path, "-o", tmp_path / "out", *extra])
    error_line(code, stderr, "refused to unpickle")
    assert not marker.exists() and no_output(tmp_path / "out")


def test_torch_environment_override_does_not_weaken_loading(tmp_path):
    """TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD only changes torch.load calls that do not say weights_only."""
    path, marker, _ = _hostile("legacy-reduce", tmp_path)
    done = run_process([path, "-o", tmp_path / "out"], env={**os.environ, "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"})
    error_line(done.returncode, done.stderr, "refused to unpickle")
    assert not marker.exists() and no_output(tmp_path / "out")


def test_unsafe_trust_pickle_loads_a_custom_class_only_when_asked(tmp_path, state, reference):
    path = tmp_path / "with_extra.pth.tar"
    torch.save({"state_dict": state, "extra": _BenignExtra()}, path)
    code, _, stderr = run([path, "-o", tmp_path / "refused"])
    assert "_BenignExtra" in error_line(code, stderr, "refused to unpickle")
    assert no_output(tmp_path / "refused")

    code, stdout, stderr = run([path, "-o", tmp_path / "out", "--unsafe-trust-pickle"])
    assert code == 0, stderr
    assert "WARNING: --unsafe-trust-pickle" in stderr and "can run code" in stderr
    assert "ignored container entries: extra" in stdout
    got = load_file(str(tmp_path / "out" / api.MODEL_FILE))
    assert sorted(got) == sorted(reference) and all(torch.equal(got[k], v) for k, v in reference.items())


# --- broken files ----------------------------------------------------------------------------------


def _corrupt_header(model: bytes, how: str) -> bytes:
    size = struct.unpack("<Q", model[:8])[0]
    header, body = model[8 : 8 + size], model[8 + size :]
    if how == "missing-field":
        return model[:8] + header.replace(b'"data_offsets"', b'"data_offsetz"', 1) + body
    if how == "huge-length":
        return struct.pack("<Q", 1 << 40) + model[8:]
    if how == "offsets-past-end":
        return model[: 8 + size] + body[: len(body) // 2]
    return model[:8] + b"\xff" * size + body  # not UTF-8


@pytest.mark.parametrize("how", ["missing-field", "huge-length", "offsets-past-end", "not-utf8"])
@pytest.mark.parametrize("direction", ["inverse", "forward"])
def test_corrupt_safetensors(tmp_path, converted, how, direction):
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(_corrupt_header((converted / api.MODEL_FILE).read_bytes(), how))
    out = tmp_path / "out"
    args = ["--inverse", bad, "-o", out / "upstream.pth.tar"] if direction == "inverse" else [bad, "-o", out]
    code, _, stderr = run(args)
    error_line(code, stderr, "not a valid safetensors file")
    assert no_output(out)


def _largest_record(path: Path) -> tuple[int, int]:
    """(offset, size) of the data of the largest record of a torch zip."""
    with zipfile.ZipFile(path) as archive:
        info = max(archive.infolist(), key=lambda i: i.file_size)
    with open(path, "rb") as fh:
        fh.seek(info.header_offset + 26)
        name_len, extra_len = struct.unpack("<HH", fh.read(4))
    return info.header_offset + 30 + name_len + extra_len, info.file_size


@pytest.mark.parametrize("damage", ["flipped-bytes", "cut-record"])
def test_damaged_zip_record_with_intact_directory(tmp_path, checkpoint, damage):
    """torch maps tensor records without checking their CRC; the reader checks them first."""
    data = bytearray(checkpoint.read_bytes())
    start, size = _largest_record(checkpoint)
    if damage == "flipped-bytes":
        data[start + size // 2] ^= 0xFF
    else:
        del data[start + size // 2 : start + size // 2 + 4096]
    bad = tmp_path / "damaged.pth.tar"
    bad.write_bytes(bytes(data))
    code, _, stderr = run([bad, "-o", tmp_path / "out"])
    error_line(code, stderr, "download the file again")
    assert no_output(tmp_path / "out")


def _without_read_override():
    """preexec_fn: stay root but lose the capabilities that bypass file permissions (DAC override/search)."""
    libc = ctypes.CDLL(None, use_errno=True)
    for capability in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
        if libc.prctl(24, capability, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            os._exit(97)


def test_unreadable_file(tmp_path, checkpoint):
    locked = tmp_path / "locked.pth.tar"
    locked.write_bytes(checkpoint.read_bytes()[:4096])
    locked.chmod(0)
    as_reader = _without_read_override if os.geteuid() == 0 else None
    probe = subprocess.run(["cat", str(locked)], capture_output=True, preexec_fn=as_reader)
    if probe.returncode == 97:
        pytest.skip("this container does not let root drop CAP_DAC_OVERRIDE, so no file is unreadable to it")
    assert probe.returncode != 0, "the file must really be unreadable to the child"
    done = run_process([locked, "-o", tmp_path / "out"], preexec_fn=as_reader)
    # today click's own path check answers ("... is not readable."); the reader's line is the other form
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert "is not readable" in done.stderr or "permission denied" in done.stderr, done.stderr
    assert no_output(tmp_path / "out")
    script = ("from lic_checkpoints.convert.checkpoint import read_checkpoint as r\n"
              "from lic_checkpoints.convert.errors import CheckpointError\n"
              f"try: r({str(locked)!r})\nexcept CheckpointError as e: print(e)\n")
    direct = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, preexec_fn=as_reader)
    assert direct.stdout.strip() == f"{locked}: permission denied; make the file readable", direct.stderr


def test_non_finite_values_are_converted_and_flagged(tmp_path, state, reference, same_name_weights):
    first, second = same_name_weights[0], same_name_weights[len(same_name_weights) // 2]
    poisoned = dict(state)
    poisoned[first] = state[first].clone()
    poisoned[first][0, 0, 0, 0] = float("nan")
    poisoned[second] = state[second].clone()
    poisoned[second][0, 0, 0, 0] = float("-inf")
    path = tmp_path / "nan.pth.tar"
    torch.save({"state_dict": poisoned}, path)
    code, stdout, stderr = run([path, "-o", tmp_path / "out"])
    assert code == 0, stderr
    assert f"WARNING: 2 tensors hold NaN or Inf, e.g. {first}" in stdout
    config = json.loads((tmp_path / "out" / api.CONFIG_FILE).read_text())
    assert config["non_finite_tensors"] == [first, second]
    got = load_file(str(tmp_path / "out" / api.MODEL_FILE))
    assert torch.isnan(got[first][0, 0, 0, 0]) and got[second][0, 0, 0, 0] == float("-inf")
    assert torch.equal(got[first].flatten()[1:], reference[first].flatten()[1:])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_half_precision_is_preserved_bit_exactly(tmp_path, state, reference, dtype):
    """Floating tensors keep the checkpoint's dtype: no silent up- or down-cast; the round trip is exact."""
    half = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    path = tmp_path / "half.pth.tar"
    torch.save({"state_dict": half}, path)
    result = api.convert_checkpoint(path, tmp_path / "out")
    got = load_file(str(tmp_path / "out" / api.MODEL_FILE))
    assert sorted(got) == sorted(reference)
    from_source = set(result.config["dtypes_preserved"])
    assert from_source and from_source <= set(got)
    for key, value in got.items():
        if key in from_source:
            # renames, permutes, reshapes and copies commute with the cast, so this is exact
            assert value.dtype == dtype and torch.equal(value, reference[key].to(dtype)), key
        else:  # synthesized tensors are made in the layout's own dtype
            assert torch.equal(value, reference[key]), key
    back, _ = api.restore_checkpoint(tmp_path / "out", tmp_path / "back.pth.tar")
    saved = torch.load(tmp_path / "back.pth.tar", weights_only=True)["state_dict"]
    assert list(saved) == list(half)
    assert all(saved[k].dtype == v.dtype and torch.equal(saved[k], v) for k, v in half.items())


# --- interrupted runs ------------------------------------------------------------------------------

# Runs the real CLI, but pauses inside the safetensors writer after a few tensors and says so: the
# parent then kills it at a known point in the middle of the write.
_PAUSING_CHILD = """
import sys, time
from pathlib import Path
from lic_checkpoints.convert import writer
flag, real, written = Path(sys.argv[1]), writer._raw_bytes, []
def slow(tensor):
    written.append(1)
    if len(written) == 50:
        flag.write_text("writing")
        time.sleep(600)
    return real(tensor)
writer._raw_bytes = slow
from lic_checkpoints.convert.cli import main
main(sys.argv[2:])
"""


def _temp_files(folder: Path) -> list[Path]:
    return sorted(folder.glob(f".{api.MODEL_FILE}.*.tmp"))


def _wait_for(predicate, child: subprocess.Popen, limit: float = 120.0) -> None:
    deadline = time.monotonic() + limit
    while not predicate():
        assert child.poll() is None, child.communicate()
        assert time.monotonic() < deadline, "the child never reached the write"
        time.sleep(0.01)


@pytest.mark.parametrize("previous", [False, True], ids=["no-previous-output", "previous-output"])
def test_kill_in_the_middle_of_the_write(tmp_path, checkpoint, converted, previous):
    out = tmp_path / "out"
    out.mkdir()
    before = None
    if previous:
        for name in (api.MODEL_FILE, api.CONFIG_FILE):
            (out / name).write_bytes((converted / name).read_bytes())
        before = {name: (out / name).read_bytes() for name in (api.MODEL_FILE, api.CONFIG_FILE)}
    flag = tmp_path / "flag"
    child = subprocess.Popen([sys.executable, "-c", _PAUSING_CHILD, str(flag), str(checkpoint), "-o", str(out)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        _wait_for(flag.exists, child)
        temps = _temp_files(out)
        assert len(temps) == 1 and 0 < temps[0].stat().st_size < len((converted / api.MODEL_FILE).read_bytes())
    finally:
        child.kill()
        child.communicate()
    assert child.returncode == -signal.SIGKILL
    if previous:
        assert {name: (out / name).read_bytes() for name in before} == before
    else:
        assert not (out / api.MODEL_FILE).exists() and not (out / api.CONFIG_FILE).exists()
    # what a kill cannot clean: the temporary file, under a hidden name that no reader picks up
    assert [p.name.startswith(".") for p in out.iterdir() if p.name not in (before or {})] == [True]


def test_kill_as_soon_as_the_write_starts(tmp_path, checkpoint, converted, reference):
    """The real console script, killed the moment its temporary file appears: no partial final file."""
    out = tmp_path / "out"
    out.mkdir()
    child = subprocess.Popen(["lic-convert", str(checkpoint), "-o", str(out)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        _wait_for(lambda: bool(_temp_files(out)) or (out / api.MODEL_FILE).exists(), child)
    finally:
        child.kill()
        child.communicate()
    if (out / api.MODEL_FILE).exists():  # the write won the race: then the file is complete
        got = load_file(str(out / api.MODEL_FILE))
        assert sorted(got) == sorted(reference) and all(torch.equal(got[k], v) for k, v in reference.items())


def _small_disk():
    """preexec_fn: files may grow to 8 MB; past that, write() fails with EFBIG instead of a signal."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (8 << 20, 8 << 20))


@pytest.mark.parametrize("mode", ["safetensors", "pth", "inverse"])
def test_disk_full(tmp_path, checkpoint, converted, mode):
    out = tmp_path / "out"
    out.mkdir()
    previous = b"an earlier file that must survive"
    target = out / ("upstream.pth.tar" if mode == "inverse" else "model.pth" if mode == "pth" else api.MODEL_FILE)
    target.write_bytes(previous)
    args = {"safetensors": [checkpoint, "-o", out], "pth": [checkpoint, "-o", out, "--format", "pth"],
            "inverse": ["--inverse", converted, "-o", target]}[mode]
    done = run_process(args, preexec_fn=_small_disk)
    assert done.stderr.strip().count("\n") == 0, done.stderr
    line = error_line(done.returncode, done.stderr, "writing failed")
    assert str(target) in line and ("File too large" in line or "disk full" in line), line
    assert target.read_bytes() == previous
    assert [p.name for p in out.iterdir()] == [target.name]  # no temporary file, no config.json


# --- two writers, one folder -----------------------------------------------------------------------


def test_two_processes_writing_one_folder(tmp_path, checkpoint, state, reference):
    """The folder is locked while written: afterwards both files are complete and from the same run."""
    half = tmp_path / "half.pth.tar"
    torch.save({"state_dict": {k: v.half() if v.is_floating_point() else v for k, v in state.items()}}, half)
    out = tmp_path / "out"
    runs = [subprocess.Popen(["lic-convert", str(src), "-o", str(out)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for src in (checkpoint, half)]
    for child in runs:
        _, stderr = child.communicate(timeout=300)
        assert child.returncode == 0, stderr
    got = load_file(str(out / api.MODEL_FILE))
    assert sorted(got) == sorted(reference)
    dtype = got[next(k for k, v in reference.items() if v.is_floating_point() and v.dim() == 4)].dtype
    assert dtype in (torch.float32, torch.float16)
    assert all(torch.equal(got[k], v.to(got[k].dtype)) for k, v in reference.items())
    config = json.loads((out / api.CONFIG_FILE).read_text())
    assert config["source"]["file"] in (checkpoint.name, half.name)
    assert (config["source"]["file"] == half.name) == (dtype == torch.float16)  # model and config agree
    from safetensors import safe_open

    with safe_open(str(out / api.MODEL_FILE), framework="pt") as fh:
        assert fh.metadata()["lic.source_sha256"] == config["source"]["sha256"]
    assert not _temp_files(out) and not list(out.glob(".*.tmp"))


_LOCK_HOLDER = """
import sys, time
from pathlib import Path
from lic_checkpoints.convert.writer import output_lock
with output_lock(Path(sys.argv[1])):
    Path(sys.argv[2]).write_text("locked")
    time.sleep(float(sys.argv[3]))
"""


def test_output_lock_serialises_writers_and_dies_with_its_process(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", _LOCK_HOLDER, str(tmp_path), str(tmp_path / "flag"), "600"])
    try:
        _wait_for((tmp_path / "flag").exists, holder)
        waiter = subprocess.Popen([sys.executable, "-c", _LOCK_HOLDER, str(tmp_path), str(tmp_path / "flag2"), "0"])
        time.sleep(1.0)
        assert waiter.poll() is None and not (tmp_path / "flag2").exists()  # blocked behind the holder
    finally:
        holder.kill()
        holder.wait()
    assert waiter.wait(timeout=60) == 0 and (tmp_path / "flag2").exists()  # a killed holder frees the folder
    assert sorted(p.name for p in tmp_path.iterdir()) == ["flag", "flag2"]  # the lock leaves no file
