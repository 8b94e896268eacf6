"""``lic-convert``: upstream LIC checkpoints -> CompressAI-layout safetensors (and back).

The command only parses arguments and prints; the work happens in :mod:`.api`.  User mistakes end
with one line on stderr and exit code 2; a successful run exits 0.
"""

from __future__ import annotations

import json
import sys
import time
import warnings
from pathlib import Path

import click

from .. import __version__
from . import cli_options as listed
from .cli_options import ListedOption
from .errors import LicError

PROGRESS_MIN_BYTES = 64 << 20


def _fail(message: str) -> None:
    click.echo(f"lic-convert: error: {message}", err=True)
    sys.exit(2)


def _default_out_dir(src: Path, many: bool, base: Path | None) -> Path:
    stem = src.name
    for suffix in (".pth.tar", ".safetensors", ".pth", ".pt", ".tar", ".ckpt"):
        if stem.endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    if base is None:
        return Path(f"{stem}-compressai")
    return base / stem if many else base


def _progress_for(size: int, enabled: bool):
    if not enabled or size < PROGRESS_MIN_BYTES or not sys.stderr.isatty():
        return None, None
    bar = click.progressbar(length=size, label="converting", file=sys.stderr, show_eta=True)
    bar.__enter__()
    return bar, bar.update


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("sources", nargs=-1, type=click.Path(path_type=Path, readable=False))
@click.option("-o", "--out", "out", type=click.Path(path_type=Path),
              help="Output folder (with several inputs: one sub-folder per input). Default: <name>-compressai/")
@click.option("--family", cls=ListedOption, listing=listed.families,
              help="Skip detection and treat the input as this family ({names}).")
@click.option("--variant", help="With --inverse on a file without lic-convert metadata: the variant name.")
@click.option("--format", "output_format", type=click.Choice(["safetensors", "pth"]), default="safetensors",
              show_default=True, help="Output format of the weights.")
@click.option("--inverse", is_flag=True,
              help="Convert a lic-convert output (folder or .safetensors) back to the upstream layout, with "
                   "the source's own key spelling (prefix, legacy names, order, container entry).")
@click.option("--canonical", is_flag=True,
              help="With --inverse: write upstream's plain names instead (no prefix, current compressai "
                   "names, upstream key order, {'state_dict': ...}).")
@click.option("--without-dropped", is_flag=True,
              help="With --inverse: when the conversion dropped keys no rule can restore (e.g. a training-only "
                   "branch), write the checkpoint without them instead of refusing.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary instead of the table.")
@click.option("--full-report", is_flag=True, help="Show every row of the load report, not only problems and totals.")
@click.option("--demo", "demo", metavar="NAME", cls=ListedOption, listing=listed.configurations,
              help="Synthesize an upstream checkpoint of a published configuration ({names}), "
                   "convert it and convert it back: no download needed.")
@click.option("--unsafe-trust-pickle", is_flag=True,
              help="DANGEROUS: fully unpickle the input, which can run code stored in it. Only for files "
                   "from a source you trust that torch's safe loader refuses.")
@click.version_option(__version__, prog_name="lic-convert")
def main(sources, out, family, variant, output_format, inverse, canonical, as_json, full_report, demo,
         unsafe_trust_pickle, without_dropped):
    """Convert upstream checkpoints to the CompressAI layout.

    Writes OUT/model.safetensors and OUT/config.json for each SOURCE, after checking that every
    source tensor is used exactly once and every target tensor of the CompressAI layout is produced.
    """
    try:
        if demo:
            _run_demo(demo, out or Path("lic-demo"), as_json)
            return
        if not sources:
            _fail("give a checkpoint to convert (or --demo NAME); see lic-convert --help")
        if canonical and not inverse:
            _fail("--canonical only applies to --inverse; add --inverse or drop --canonical")
        if without_dropped and not inverse:
            _fail("--without-dropped only applies to --inverse; add --inverse or drop --without-dropped")
        if inverse:
            _run_inverse(sources, out, family, variant, canonical, as_json, without_dropped)
            return
        many = len(sources) > 1
        summaries = []
        # Start checking each file's integrity before the conversion imports torch (seconds), so the
        # check (one read of the file in a background thread) is done by the time it is needed.
        from .integrity import prefetch

        prefetch(sources[0])
        for i, src in enumerate(sources):
            if i + 1 < len(sources):
                prefetch(sources[i + 1])
            summaries.append(_convert_one(src, _default_out_dir(src, many, out), family, output_format,
                                          unsafe_trust_pickle, as_json, full_report))
        if as_json:
            click.echo(json.dumps(summaries if many else summaries[0], indent=2))
    except LicError as exc:
        _fail(str(exc))
    except KeyboardInterrupt:
        _fail("interrupted; no partial output was left behind")


def _convert_one(src, out_dir, family, output_format, trust_pickle, as_json, full_report) -> dict:
    from . import api, report
    from .checkpoint import read_checkpoint

    if trust_pickle:
        click.echo("lic-convert: WARNING: --unsafe-trust-pickle: the file is fully unpickled and can run code",
                   err=True)
    started = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the warning above already said it, once
        source = read_checkpoint(src, trust_pickle=trust_pickle, lazy=True)
    bar, progress = _progress_for(source.size_bytes, not as_json)
    try:
        result = api.convert_checkpoint(src, out_dir, family=family, output_format=output_format,
                                        progress=progress, source=source)
    except Exception as exc:
        plan = getattr(exc, "report", None)
        if plan is not None and not as_json:
            click.echo(report.render_table(plan, problems_only=True), err=True)
        raise
    finally:
        source.close()
        if bar is not None:
            bar.__exit__(None, None, None)
    elapsed = time.perf_counter() - started
    summary = {
        "source": str(src),
        "family": result.family,
        "variant": result.variant,
        "variables": result.detection.variables,
        "out_dir": str(out_dir),
        "files": [str(f) for f in result.files],
        "report": result.summary(),
        "non_finite_tensors": result.non_finite,
        "dtypes_preserved": result.plan.dtype_notes,
        "ignored_container_entries": result.source.ignored_entries,
        "seconds": round(elapsed, 3),
    }
    if not as_json:
        click.echo(f"{src}: {result.detection.describe()}")
        if result.source.ignored_entries:
            click.echo(f"  ignored container entries: {', '.join(result.source.ignored_entries)}")
        if result.source.stripped_prefix_keys:
            click.echo(f"  removed 'module.' from {result.source.stripped_prefix_keys} keys")
        click.echo(report.render_table(result.plan) if full_report else _totals(result.plan))
        if result.plan.dtype_notes:
            click.echo(f"  note: {len(result.plan.dtype_notes)} tensors keep their dtype "
                       f"({result.plan.steps[0].dtype}) instead of the layout's float32")
        if result.non_finite:
            click.echo(f"  WARNING: {len(result.non_finite)} tensors hold NaN or Inf, e.g. {result.non_finite[0]}")
        click.echo(f"  wrote {', '.join(str(f) for f in result.files)} ({result.bytes_written / 1e6:.1f} MB, {elapsed:.2f} s)")
    return summary


def _totals(plan) -> str:
    from . import report

    counts = report.summary(plan)
    return "  " + ", ".join(f"{status.lower()} {n}" for status, n in counts.items())


def _run_inverse(sources, out, family, variant, canonical, as_json, without_dropped=False):
    from . import api

    if len(sources) != 1:
        _fail("--inverse takes one converted folder or file")
    src = sources[0]
    out_file = out if out is not None and out.suffix else (out or Path(".")) / "upstream.pth.tar"
    result = api.restore_checkpoint(src, out_file, family=family, variant=variant, canonical=canonical,
                                    without_dropped=without_dropped)
    detection = result.detection
    if as_json:
        click.echo(json.dumps({"source": str(src), "out": str(out_file), "keys": len(result.state_dict),
                               "family": detection.family, "variant": detection.variant.name,
                               "spelling": "source" if result.recorded else "canonical",
                               "restored": result.spelling.to_json()}, indent=2))
    else:
        click.echo(f"{src}: {detection.describe()} -> upstream layout, {len(result.state_dict)} tensors")
        how = "the source's spelling" if result.recorded else (
            "canonical names" if canonical else "canonical names (no spelling recorded)")
        click.echo(f"  keys: {how}: {result.spelling.describe()}")
        click.echo(f"  wrote {out_file}")


def _run_demo(name, out, as_json):
    import torch

    from . import api, demo
    from .checkpoint import read_checkpoint

    name = demo.resolve(name)
    upstream = demo.demo_checkpoint(name, out / f"{name}-upstream.pth.tar")
    result = api.convert_checkpoint(upstream, out / f"{name}-compressai")
    restored_path = out / f"{name}-roundtrip.pth.tar"
    restored = api.restore_checkpoint(result.out_dir, restored_path, without_dropped=True).state_dict
    source = read_checkpoint(upstream)
    lost = {key for key, rule in result.plan.dropped if rule.restore_value is None}  # no way back for these
    original = {source.stored_key(k): v for k, v in source.state_dict.items() if k not in lost}
    exact = list(restored) == list(original) and all(
        restored[k].dtype == original[k].dtype and torch.equal(restored[k], original[k]) for k in original
    )
    if as_json:
        click.echo(json.dumps({"demo": name, "upstream": str(upstream), "converted": str(result.out_dir),
                               "roundtrip": str(restored_path), "roundtrip_bit_exact": exact,
                               "report": result.summary()}, indent=2))
    else:
        click.echo(f"demo {name}: synthesized upstream checkpoint {upstream}")
        click.echo(f"  detected {result.detection.describe()}")
        click.echo(_totals(result.plan))
        click.echo(f"  converted -> {result.out_dir}/ ({', '.join(f.name for f in result.files)})")
        click.echo(f"  converted back -> {restored_path}: "
                   + ("bit-exact round trip" if exact else "ROUND TRIP DIFFERS")
                   + (f" (without the {len(lost)} keys dropped for good)" if lost else ""))
    if not exact:
        sys.exit(1)


if __name__ == "__main__":  # pragma: no cover
    main()
