"""lic-verify on a whole release: many checkpoints in one call (--out-dir), one report and plot for the set.

Cheap on purpose: the smallest registered configuration, two demo checkpoints (different seeds), one
small image, and the tiers each test needs; the checkpoints and the acceptance run are shared by the
module.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from conftest import remove_tree
from lic_checkpoints.convert import registry
from lic_checkpoints.convert.demo import demo_checkpoint
from lic_checkpoints.verify import builders, release
from lic_checkpoints.verify.cli import main

CONF = registry.smallest_configuration()


def run(args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Two checkpoints of one configuration and one image (168x200: padded to 256x256; MS-SSIM needs > 160)."""
    from PIL import Image

    folder = tmp_path_factory.mktemp("release-inputs")
    a = demo_checkpoint(CONF.name, folder / "ckpt_lambda0.0035.pth.tar", seed=1)
    b = demo_checkpoint(CONF.name, folder / "ckpt_lambda0.013.pth.tar", seed=2)
    rng = np.random.RandomState(0)
    yy, xx = np.mgrid[0:168, 0:200] / 200.0
    rgb = np.stack([0.5 + 0.4 * np.sin(6 * xx + c) * np.cos(4 * yy) for c in range(3)], -1)
    rgb = np.clip(rgb + 0.03 * rng.standard_normal(rgb.shape), 0, 1)
    (folder / "images").mkdir()
    Image.fromarray((rgb * 255).astype(np.uint8)).save(folder / "images" / "one.png")
    yield a, b, folder / "images"
    remove_tree(folder)  # two full-size checkpoints: gone before the next module's files arrive


@pytest.fixture(scope="module")
def acceptance(inputs, tmp_path_factory):
    """The two checkpoints verified as one release (T1 forward, T3 coded rate-distortion), counting builds."""
    a, b, images = inputs
    out = tmp_path_factory.mktemp("release") / "out"
    built = []
    original = builders.build_on_meta

    def counting(cls, kwargs, state_dict):
        built.append(cls.__name__)
        return original(cls, kwargs, state_dict)

    builders.build_on_meta = counting
    try:
        code, stdout, stderr = run([a, b, "--out-dir", out, "--images", images, "--tiers", "T1,T3"])
    finally:
        builders.build_on_meta = original
    yield code, stdout, stderr, out, built
    remove_tree(out.parent)


def test_two_checkpoints_one_release(acceptance):
    code, stdout, stderr, out, _ = acceptance
    assert code == 0, stdout + stderr
    data = json.loads((out / release.RELEASE_JSON).read_text())
    assert data["schema"] == release.SCHEMA and data["passed"] and data["images"] == ["one"]
    assert data["runtime"]["device"] == "cpu" and data["runtime"]["threads"] >= 1
    rows = data["rows"]
    assert [r["name"] for r in rows] == ["ckpt_lambda0.0035", "ckpt_lambda0.013"]
    assert [r["operating_point"] for r in rows] == [{"lambda": 0.0035}, {"lambda": 0.013}]
    for row in rows:
        assert row["verdict"] == "passed" and row["why"] == ""
        assert (row["family"], row["variant"]) == (CONF.family.family, CONF.variant.name)
        assert row["metrics_from"] == "T3 (coded bytes)" and row["worst_t1"]["max_abs"] >= 0
        for side in ("reference", "target"):
            assert all(isinstance(row["metrics"][side][k], float) for k in ("bpp", "psnr", "ms_ssim", "ms_ssim_db"))
        # the release numbers are the eval_model means of the checkpoint's own report (one image here)
        report = json.loads((out / row["name"] / "parity_report.json").read_text())
        assert report["passed"] and report["runtime"]["device"] == "cpu"
        label = next(iter(report["eval_model"]))
        assert row["metrics"]["reference"]["bpp"] == pytest.approx(report["eval_model"][label]["results"]["bpp"][0])
        assert (out / row["name"] / "parity_report.md").is_file()
    # rows differ: two different checkpoints
    assert rows[0]["metrics"]["reference"]["bpp"] != rows[1]["metrics"]["reference"]["bpp"]
    md = (out / release.RELEASE_MARKDOWN).read_text()
    assert "every checkpoint passed" in md and "`ckpt_lambda0.013`" in md and "λ 0.013" in md
    assert "2/2 passed" in stdout
    assert "[1/2 images]" in stderr and "[2/2 images]" in stderr  # plain progress lines: stderr is no TTY
    # one tick per image as the model tiers finish it, then the checkpoint's verdict
    assert "[1/2 images] ckpt_lambda0.0035: one done" in stderr and "[2/2 images] ckpt_lambda0.013: one done" in stderr
    assert stderr.index("ckpt_lambda0.0035: one done") < stderr.index("ckpt_lambda0.0035: passed")


def test_rd_plot_is_a_real_png(acceptance):
    from PIL import Image

    _, _, _, out, _ = acceptance
    with Image.open(out / release.RD_PLOT) as img:
        assert img.format == "PNG" and img.size == (2 * 460, 360)
        pixels = np.asarray(img.convert("RGB")).reshape(-1, 3).astype(int)
    assert (pixels.min(axis=1) < 250).mean() > 0.02  # axes, ticks, labels, points: not blank
    from lic_checkpoints.verify.rd_plot import STYLES

    for colour, _ in STYLES[:2]:  # both series drawn
        assert (np.abs(pixels - np.array(colour)).sum(axis=1) == 0).sum() > 20


def test_models_built_once_per_configuration(acceptance):
    _, _, _, out, built = acceptance
    assert len(built) == 2, built  # one reference and one target for two checkpoints
    assert json.loads((out / release.RELEASE_JSON).read_text())["models_built"] == 2


def test_existing_valid_conversion_is_reused(acceptance, inputs):
    a, b, images = inputs
    _, _, _, out, _ = acceptance
    model = out / "ckpt_lambda0.0035" / "model.safetensors"
    before = model.stat()
    code, stdout, stderr = run([a, b, "--out-dir", out, "--images", images, "--tiers", "T0", "--quiet"])
    assert code == 0, stdout + stderr
    assert stderr == ""  # --quiet: no progress
    after = model.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    rows = json.loads((out / release.RELEASE_JSON).read_text())["rows"]
    assert all(r["conversion"].startswith("reused") for r in rows)


def test_a_broken_file_gets_its_row_and_the_others_still_run(inputs, tmp_path):
    a, _, images = inputs
    broken = tmp_path / "broken.pth.tar"
    broken.write_bytes(b"not a checkpoint at all")
    out = tmp_path / "out"
    code, stdout, stderr = run([broken, a, "--out-dir", out, "--images", images, "--tiers", "T0", "--quiet"])
    assert code == 1, stdout + stderr
    rows = {r["name"]: r for r in json.loads((out / release.RELEASE_JSON).read_text())["rows"]}
    assert rows["broken"]["verdict"] == "error" and rows["broken"]["why"]
    assert "\n" not in rows["broken"]["why"] and "Traceback" not in stdout + stderr
    assert rows["ckpt_lambda0.0035"]["verdict"] == "passed"
    assert "**error**" in (out / release.RELEASE_MARKDOWN).read_text()
    assert (out / release.RD_PLOT).is_file()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the error path cannot be shown")
def test_device_cuda_without_cuda_is_a_usage_error(inputs, tmp_path):
    a, _, images = inputs
    for args in ([a, "--out-dir", tmp_path / "out"], [a]):
        code, stdout, stderr = run(args + ["--images", images, "--device", "cuda"])
        assert code == 2
        assert stderr.startswith("lic-verify: error:") and "CUDA is not available" in stderr
        assert stderr.count("\n") == 1 and "Traceback" not in stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (torch.cuda.is_available() is false)")
def test_forward_on_cuda_passes_and_is_recorded(inputs):
    from lic_checkpoints.verify.api import verify_checkpoint

    a, _, images = inputs
    report = verify_checkpoint(a, images=[images], tiers=["T1", "T2", "T3"], device="cuda")
    assert report.passed, report.render_table()
    assert report.runtime["forward_device"].startswith("cuda") and report.runtime["coding_device"] == "cpu"
    assert report.runtime["coding_transforms_device"].startswith("cuda")
    assert "its analysis and synthesis on cuda" in report.to_markdown()


def test_auto_device_without_cuda_is_the_cpu():
    from lic_checkpoints.verify import device

    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert device.resolve("auto").type == expected


def test_single_checkpoint_options_do_not_go_with_out_dir(inputs, tmp_path):
    a, b, _ = inputs
    code, _, stderr = run([a, b, "--out-dir", tmp_path / "out", "--json", tmp_path / "r.json"])
    assert code == 2 and "--json is for one checkpoint" in stderr and stderr.count("\n") == 1
    code, _, stderr = run([a, b, a])
    assert code == 2 and "--out-dir" in stderr


def test_names_and_operating_points():
    assert release.output_names([Path("x/mse/0.05.pth.tar"), Path("x/msssim/0.05.pth.tar")]) == \
        ["mse-0.05", "msssim-0.05"]
    assert release.operating_point("model_lambda_0.0483.pth.tar") == {"lambda": 0.0483}
    assert release.operating_point("anchor_q3.pth.tar") == {"quality": 3}
    assert release.operating_point("0.013checkpoint_best.pth.tar") == {"lambda": 0.013}
    assert release.operating_point("checkpoint_best.pth.tar") == {}


def test_operating_point_from_the_container_wins_over_the_file_name(tmp_path):
    from lic_checkpoints.convert.checkpoint import read_checkpoint

    path = tmp_path / "ckpt_lambda0.5.pth.tar"
    torch.save({"epoch": 3, "state_dict": {"w": torch.zeros(2)}, "lmbda": 0.0483, "note": "x",
                "args": {"quality": 3, "lr": 1e-4, "nested": {"skip": 1}}, "optimizer": {"state": {}}}, path)
    for lazy in (False, True):
        source = read_checkpoint(path, lazy=lazy)
        assert source.container_values == {"epoch": 3, "lmbda": 0.0483, "note": "x", "args.quality": 3,
                                           "args.lr": 1e-4}, lazy
        source.close()
    assert release.operating_point(path.name, source.container_values) == {"lambda": 0.0483, "quality": 3}
    assert release.operating_point(path.name, {"epoch": 3}) == {"lambda": 0.5}
    assert release.container_operating_point({"lambda": -1, "q": 2.5, "hparams.lmbda": 0.01}) == {"lambda": 0.01}
    crowded = tmp_path / "crowded.pth.tar"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "x" * 500: 1, "note": "y" * 500,
                **{f"k{i}": i for i in range(100)}}, crowded)
    source = read_checkpoint(crowded)
    assert list(source.container_values) == [f"k{i}" for i in range(64)]  # long names and texts left out, 64 kept


def test_image_ticks_reach_every_image_once_with_or_without_a_listener():
    from lic_checkpoints.verify.api import _ImageTicks

    silent = _ImageTicks(None, 3)
    silent.tick(0)
    silent.finish()  # no listener: it must still end
    assert silent.done == 3
    seen = []
    ticks = _ImageTicks(seen.append, 4)
    ticks.tick(0)
    ticks.tick(0)  # the same image again: not counted twice
    ticks.tick(2)  # out of order: ignored until image 1 is done
    ticks.tick(1)
    ticks.finish()
    assert seen == [0, 1, 2, 3] and ticks.done == 4


def test_plot_ticks_are_round_and_cover_the_range():
    from lic_checkpoints.verify.rd_plot import nice_ticks

    ticks = nice_ticks(0.13, 0.87)
    assert ticks[0] <= 0.13 and ticks[-1] >= 0.87 and len(ticks) <= 8
    assert all(abs(t * 10 - round(t * 10)) < 1e-9 for t in ticks)


def test_progress_is_one_bar_on_a_terminal_and_lines_otherwise():
    import io

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    tty = Terminal()
    bar = release.Progress(4, stream=tty)
    bar.stage("a", "T1: forward")
    bar.advance(2, "a: passed")
    bar.advance(2, "b: passed")
    bar.close()
    assert bar.bar is not None and "4/4" in tty.getvalue() and "a: passed" in tty.getvalue()

    plain = io.StringIO()
    lines = release.Progress(4, stream=plain)
    lines.advance(2, "a: passed")
    assert lines.bar is None and plain.getvalue().startswith("[2/4 images] a: passed") and "ETA" in plain.getvalue()

    quiet = Terminal()
    silent = release.Progress(4, stream=quiet, quiet=True)
    silent.advance(4, "a: passed")
    silent.close()
    assert silent.bar is None and quiet.getvalue() == ""


def test_reuse_check_hashes_the_source_only_when_there_is_a_conversion_to_compare(tmp_path, monkeypatch):
    source = tmp_path / "ckpt.pth.tar"
    source.write_bytes(b"weights")
    hashed = []
    real = release.file_sha256
    monkeypatch.setattr(release, "file_sha256", lambda path: hashed.append(path) or real(path))
    folder = tmp_path / "out"
    assert release.reusable(folder, source) is None and hashed == []  # nothing there: no hash
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"")
    for config in ('{"source": "not a section"}', '[1, 2]', '{"source": {"sha256": "0"}}', "{broken"):
        (folder / "config.json").write_text(config)
        assert release.reusable(folder, source) is None, config  # refused, never a crash
    assert hashed == [source]  # only the well-formed section was compared
