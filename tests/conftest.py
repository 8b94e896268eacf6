"""Shared test helpers: the golden data in ``tests/data``, the configurations of the registry, and
upstream checkpoints rebuilt from the golden data.

Nothing here names a model family: the configurations come from ``registry.configurations()``
(one per shipped layout), and ``tests/test_registry.py`` checks that each of them has its data in
``tests/data`` (see ``tests/data/README.md``).

Disk (a test run must fit a CI runner: at most 2 GB of temporary files at any moment): full-size
checkpoints are large (up to about 0.5 GB each), so the ``checkpoints`` fixture writes each one on
first use and shares it with the rest of the module, keeps at most ``CheckpointStore.budget`` bytes
of them on disk, and removes them when the module is done (the synthesized state dicts stay cached
in memory, two at a time, so writing one again is quick). Every test's ``tmp_path`` is emptied when
the test ends (after a failure only its large files go), and whatever large file a module left in
pytest's basetemp is removed when the session ends.
"""

from __future__ import annotations

import json
import os
import shutil
from collections import OrderedDict
from functools import lru_cache
from pathlib import Path

import pytest
import torch

from lic_checkpoints.convert import registry, synth

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = Path(__file__).resolve().parent / "data"
FIXTURES_DIR = DATA_DIR / "fixtures"
TARGETS_DIR = DATA_DIR / "targets"
MAPPINGS_DIR = REPO_ROOT / "mappings"

#: every published configuration (a family's variant with a shipped layout), from the registry
CONFIGURATIONS = registry.configurations()
CONFIGURATION_NAMES = tuple(c.name for c in CONFIGURATIONS)


def configuration(name: str) -> registry.Configuration:
    return registry.configuration(name)


# --------------------------------------------------------------------------- golden data


def fixture_dir(name: str) -> Path:
    path = FIXTURES_DIR / name
    if not path.is_dir():
        pytest.fail(f"golden fixture {path} is missing (see tests/data/README.md)")
    return path


@lru_cache(maxsize=None)
def fixture_manifest(name: str):
    """``(manifest.json, constants.safetensors)`` of a fixture."""
    return synth.load_manifest_dir(fixture_dir(name))


def target_path(name: str, suffix: str = ".json") -> Path:
    path = TARGETS_DIR / f"{name}{suffix}"
    if not path.is_file():
        pytest.fail(f"target file {path} is missing (see tests/data/README.md)")
    return path


@lru_cache(maxsize=None)
def _target_manifest_text(name: str) -> str:
    return target_path(name).read_text()


def target_manifest(name: str) -> dict:
    """``targets/<name>.json``: the state-dict layout of CompressAI master's class (a fresh copy)."""
    return json.loads(_target_manifest_text(name))


def target_constants(name: str) -> dict[str, torch.Tensor]:
    """``targets/<name>.constants.safetensors``: master's persistent non-empty buffers."""
    from safetensors.torch import load_file

    return load_file(str(target_path(name, ".constants.safetensors")))


def fixture_input(name: str) -> torch.Tensor:
    from safetensors.torch import load_file

    return load_file(str(fixture_dir(name) / "input.safetensors"))["x"]


def fixture_expected(name: str) -> dict:
    from safetensors.torch import load_file

    return load_file(str(fixture_dir(name) / "expected.safetensors"))


def fixture_expected_json(name: str) -> dict:
    return json.loads((fixture_dir(name) / "expected.json").read_text())


def meta_state_dict(rows: list) -> dict[str, torch.Tensor]:
    """Storage-free tensors for ``[key, shape, dtype, ...]`` rows (a layout without values)."""
    return {key: torch.empty(shape, dtype=getattr(torch, dtype), device="meta") for key, shape, dtype, *_ in rows}


# --------------------------------------------------------------------------- rebuilt checkpoints


@lru_cache(maxsize=2)  # up to about 1 GB of memory; rebuilt in a few seconds
def _upstream_state_dict_cached(name: str):
    manifest, constants = fixture_manifest(name)
    return synth.state_dict_from_manifest(manifest, constants)


def upstream_state_dict(name: str):
    """A fresh dict (tensors shared with a small cache) of the rebuilt upstream state dict."""
    return OrderedDict(_upstream_state_dict_cached(name))


def upstream_checkpoint(name: str, **harness):
    """The upstream training-script checkpoint, with optional harness overrides (prefix, legacy names)."""
    manifest, _ = fixture_manifest(name)
    h = dict(manifest.get("harness", {}))
    return synth.checkpoint_container(
        _upstream_state_dict_cached(name),
        manifest["checkpoint_container"]["top_level_keys"],
        key_prefix=harness.get("key_prefix", h.get("key_prefix", "")),
        legacy_entropy_bottleneck=harness.get(
            "legacy_entropy_bottleneck", bool(h.get("rename_entropy_bottleneck_to_legacy", False))
        ),
    )


def checkpoint_bytes(name: str) -> int:
    """Bytes of tensor data in the upstream checkpoint of configuration ``name``."""
    return registry.configuration(name).upstream_bytes()


#: the configuration with the smallest checkpoint: the one plumbing tests use
SMALL = registry.smallest_configuration().name


def step_kinds(conf: registry.Configuration) -> frozenset[str]:
    """What a configuration's mapping does to tensors: its rule kinds, tensor ops and fan-outs."""
    kinds = set()
    for rule in conf.family.rules:
        kinds.add(rule.kind)
        kinds.update(op.name for op in rule.ops)
        if rule.fan_out:
            kinds.add("fan_out")
    return frozenset(kinds)


def covering_configurations() -> tuple[str, ...]:
    """Few small configurations whose mappings together use every rule kind and tensor op of all.

    Greedy from the smallest checkpoint: a larger configuration is added only for a kind of step
    that no smaller chosen one exercises (e.g. a block swap that only one family's rules use).
    """
    ordered = sorted(CONFIGURATIONS, key=lambda c: checkpoint_bytes(c.name))
    needed = frozenset().union(*(step_kinds(c) for c in ordered))
    chosen, covered = [], set()
    for conf in ordered:
        if step_kinds(conf) - covered:
            chosen.append(conf.name)
            covered |= step_kinds(conf)
        if covered == needed:
            break
    return tuple(chosen)


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _tree_size(path: Path) -> int:
    """Bytes of the files under ``path`` (or of ``path`` itself); links count nothing (pytest links
    ``<name>current`` to the newest numbered folder)."""
    if path.is_symlink():
        return 0
    if not path.is_dir():
        return _size(path)
    total = 0
    for folder, _, files in os.walk(path):
        total += sum(_size(Path(folder) / f) for f in files)
    return total


class CheckpointStore:
    """Upstream-format checkpoints rebuilt from the golden fixtures, written once and shared.

    ``path(name)`` writes ``<folder>/<name>/checkpoint_best.pth.tar`` (the upstream training
    script's file name) on first use. To bound the disk space, at most ``budget`` bytes of
    checkpoints stay on disk: before writing another one the least recently used ones are removed
    (and written again if asked for later).
    """

    def __init__(self, folder: Path, budget: int) -> None:
        self.folder, self.budget = folder, budget
        self._files: OrderedDict[str, Path] = OrderedDict()

    def path(self, name: str) -> Path:
        if name in self._files and self._files[name].is_file():
            self._files.move_to_end(name)
            return self._files[name]
        self._files.pop(name, None)
        size = checkpoint_bytes(name)
        while self._files and sum(_size(p) for p in self._files.values()) + size > self.budget:
            _, oldest = self._files.popitem(last=False)
            oldest.unlink(missing_ok=True)
        path = self.folder / name / "checkpoint_best.pth.tar"
        path.parent.mkdir(exist_ok=True)
        torch.save(upstream_checkpoint(name), path)
        self._files[name] = path
        return path

    def clear(self) -> None:
        for path in self._files.values():
            path.unlink(missing_ok=True)
        self._files.clear()


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """The session's :class:`CheckpointStore`: ``checkpoints.path(name)`` is a shared checkpoint file.

    Tests must not modify these files; they are removed when each module is done.
    """
    store = CheckpointStore(tmp_path_factory.mktemp("checkpoints"), budget=600 * 2**20)
    yield store
    store.clear()


@pytest.fixture(scope="module")
def one_image(tmp_path_factory):
    """The first built-in test image, as a ``--images`` file (one image: the model tiers stay short)."""
    from safetensors.torch import save_file

    from lic_checkpoints.verify import images as images_mod

    path = tmp_path_factory.mktemp("image") / "image.safetensors"
    save_file({"x": images_mod.builtin(1)[0].x.contiguous()}, str(path))
    return path


@pytest.fixture(scope="module")
def converted(checkpoints):
    """``converted(name)``: ``convert_in_memory`` of the golden checkpoint, one configuration at a time."""
    from lic_checkpoints.convert import api

    cache: dict = {}

    def get(name: str):
        if name not in cache:
            cache.clear()
            cache[name] = api.convert_in_memory(checkpoints.path(name))
        return cache[name]

    yield get
    cache.clear()


#: what one module may leave in pytest's basetemp once it is done (the whole run must stay within 2 GB)
LEFT_BEHIND_BUDGET = 512 * 2**20


@pytest.fixture(scope="module", autouse=True)
def _checkpoints_last_one_module(checkpoints, tmp_path_factory):
    """The shared checkpoints serve one module at a time: removed when a module is done.

    Then (this runs after the module's own fixtures are gone) the module must not have left more than
    :data:`LEFT_BEHIND_BUDGET` in basetemp: files a module keeps would add up over the session.
    """
    yield
    checkpoints.clear()
    base = tmp_path_factory.getbasetemp()
    sizes = {p: _tree_size(p) for p in base.iterdir()}
    left = sum(sizes.values())
    if left > LEFT_BEHIND_BUDGET:
        _remove_large_files(base)  # so that the next module is not blamed too
        largest = ", ".join(f"{p.name} {n / 2**20:.0f} MB" for p, n in sorted(sizes.items(), key=lambda i: -i[1])[:3])
        pytest.fail(f"this module left {left / 2**20:.0f} MB in {base} (at most {LEFT_BEHIND_BUDGET // 2**20} MB): "
                    f"remove its large files when it is done (largest: {largest})")


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


# --------------------------------------------------------------------------- temporary files

_LARGE = 4 * 2**20  # files above this size are removed even after a failure
_REPORT = pytest.StashKey[dict]()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    item.stash.setdefault(_REPORT, {})[report.when] = report


def _remove_large_files(folder: Path) -> None:
    for path in sorted(folder.rglob("*"), reverse=True):
        try:
            if path.is_file() and not path.is_symlink() and path.stat().st_size > _LARGE:
                path.unlink()
        except OSError:
            pass


@pytest.fixture(autouse=True)
def _empty_tmp_path_afterwards(request):
    """When a test ends, its ``tmp_path`` goes: all of it after a pass, its large files after a failure."""
    yield
    folder = getattr(request.node, "funcargs", {}).get("tmp_path")
    if folder is None:
        return
    reports = request.node.stash.get(_REPORT, {})
    if any(r.failed for r in reports.values()):
        _remove_large_files(Path(folder))
    else:
        remove_tree(Path(folder))


@pytest.fixture(scope="session", autouse=True)
def _no_large_files_left_behind(tmp_path_factory):
    """At the end of the session no large file stays in pytest's basetemp (small ones are kept)."""
    yield
    _remove_large_files(tmp_path_factory.getbasetemp())


# --------------------------------------------------------------------------- tolerances

#: the entropy tables that update(force=True) fills (upstream names), as stored in expected.safetensors
ENTROPY_TABLES = (
    "entropy_bottleneck._quantized_cdf",
    "entropy_bottleneck._offset",
    "entropy_bottleneck._cdf_length",
    "gaussian_conditional._quantized_cdf",
    "gaussian_conditional._offset",
    "gaussian_conditional._cdf_length",
    "gaussian_conditional.scale_table",
)


def entropy_table_keys(name: str) -> list[str]:
    """Every entropy table the fixture of configuration ``name`` stores (upstream names): the
    :data:`ENTROPY_TABLES` of each entropy model, wherever the model keeps it (e.g.
    ``z_entropy_bottleneck.*``, or the tables of a training-only branch)."""
    suffixes = tuple("." + table.partition(".")[2] for table in ENTROPY_TABLES)
    modules = tuple(sorted({table.partition(".")[0] for table in ENTROPY_TABLES}))
    return sorted(k for k in fixture_expected(name)
                  if k.endswith(suffixes) and k.rsplit(".", 1)[0].endswith(modules))

#: the forward tolerances recorded with the golden data (tests/data/README.md)
FORWARD_TOL = dict(rtol=1e-4, atol=1e-4)
LIKELIHOOD_TOL = dict(rtol=0.0, atol=1e-5)
#: the forward outputs the fixtures hold, in data-flow order
FORWARD_OUTPUTS = ("y", "likelihoods_z", "means", "scales", "likelihoods_y", "x_hat")


def tolerance(key: str) -> dict:
    return LIKELIHOOD_TOL if key.startswith("likelihoods") else FORWARD_TOL


def flat_forward(out: dict) -> dict[str, torch.Tensor]:
    """An upstream-shaped forward output (``para`` and ``likelihoods`` dicts) as the fixture's names."""
    return {
        "x_hat": out["x_hat"],
        "y": out["para"]["y"],
        "means": out["para"]["means"],
        "scales": out["para"]["scales"],
        "likelihoods_y": out["likelihoods"]["y"],
        "likelihoods_z": out["likelihoods"]["z"],
    }


def assert_forward_matches_fixture(name: str, out: dict) -> dict[str, float]:
    """Compare a forward output (upstream's dict shape, with ``para``) with the fixture; max |diff| per tensor."""
    expected = fixture_expected(name)
    diffs = {}
    for key, value in flat_forward(out).items():
        assert value.shape == expected[key].shape, key
        diffs[key] = (value - expected[key]).abs().max().item()
        assert torch.allclose(value, expected[key], **tolerance(key)), (key, diffs[key])
    return diffs
