"""``lic-verify``: prove that a converted checkpoint computes what the authors' model computes.

Exit codes: 0 every tier passed; 1 a parity failure (or a regression against ``--baseline``);
2 a usage or input error (one line on stderr).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from .. import __version__
from lic_checkpoints.convert import cli_options as listed
from lic_checkpoints.convert.cli_options import ListedOption
from lic_checkpoints.convert.errors import LicError


def _fail(message: str) -> None:
    click.echo(f"lic-verify: error: {message}", err=True)
    sys.exit(2)


def _tiers(value: str) -> list[str]:
    tiers = [t.strip().upper() for t in value.split(",") if t.strip()]
    unknown = [t for t in tiers if t not in ("T0", "T1", "T2", "T3")]
    if unknown or not tiers:
        raise click.BadParameter(f"unknown tier(s) {', '.join(unknown) or '(none)'}; use e.g. T0,T1,T2,T3")
    return tiers


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("paths", nargs=-1, metavar="SOURCE [CONVERTED] | CHECKPOINT... --out-dir OUT")
@click.option("--family", cls=ListedOption, listing=listed.families,
              help="Skip detection and treat SOURCE as this family ({names}).")
@click.option("--images", "images", multiple=True, type=click.Path(path_type=Path),
              help="Image files or folders (padded like the upstream eval scripts), or one .safetensors holding "
                   "x [B,3,H,W] in [0,1]. Default: a built-in deterministic set.")
@click.option("--tiers", "tiers", default="T0,T1,T2,T3", show_default=True, help="Tiers to run.")
@click.option("--target", type=click.Choice(["ours", "installed"]), default="ours", show_default=True,
              help="Target side: our CompressAI-layout classes, or the installed compressai's own (CompressAI "
                   "master: pip install compressai-temp, or PYTHONPATH=$(python tools/install_master.py)).")
@click.option("--forward-rtol", type=float, default=1e-4, show_default=True, help="T1 rtol (x_hat, y, means, scales).")
@click.option("--forward-atol", type=float, default=1e-4, show_default=True, help="T1 atol (x_hat, y, means, scales).")
@click.option("--likelihood-rtol", type=float, default=1e-5, show_default=True, help="T1 rtol of likelihoods.")
@click.option("--likelihood-atol", type=float, default=1e-5, show_default=True, help="T1 atol of likelihoods.")
@click.option("--flip-margin", type=float, default=1e-5, show_default=True,
              help="T2: a flipped decision within this distance of its boundary counts as float noise.")
@click.option("--metric-atol", type=float, default=1e-4, show_default=True, help="T3: PSNR / MS-SSIM tolerance.")
@click.option("--json", "json_out", type=click.Path(path_type=Path, allow_dash=True),
              help="Write the JSON report here ('-' for stdout).")
@click.option("--markdown", "md_out", type=click.Path(path_type=Path, allow_dash=True),
              help="Write the Markdown report here ('-' for stdout).")
@click.option("--save-outputs", type=click.Path(path_type=Path),
              help="Write each side's raw outputs (reference.safetensors, target.safetensors) here.")
@click.option("--baseline", type=click.Path(path_type=Path),
              help="A stored JSON report: exit 1 if this run regresses against it (CI).")
@click.option("--threads", type=int, default=2, show_default=True,
              help="torch CPU threads (results are compared at a fixed thread count).")
@click.option("--out-dir", type=click.Path(path_type=Path),
              help="Verify a release: every positional is a source checkpoint, each converted into OUT/<name>/ "
                   "(a valid conversion already there is reused) with its parity report; the set's report "
                   "goes to OUT/release_report.json / .md and OUT/rd.png. Exit 1 if any checkpoint fails.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="cpu", show_default=True,
              help="Where both models run the T1 forward (entropy coding stays on the CPU).")
@click.option("--quiet", is_flag=True, help="No progress output.")
@click.option("--demo", metavar="NAME", cls=ListedOption, listing=listed.configurations,
              help="Synthesize, convert and verify a published configuration ({names}): no download needed.")
@click.option("--upstream-repo", type=click.Path(path_type=Path, exists=True, file_okay=False),
              help="Reference side from your clone of the authors' repository (run in a separate process) "
                   "instead of our re-implementation.")
@click.option("--mapping", "mapping", type=click.Path(path_type=Path, exists=True, dir_okay=False),
              help="Use this mapping YAML instead of the shipped ones (e.g. while writing a new mapping).")
@click.option("--unsafe-trust-pickle", is_flag=True,
              help="DANGEROUS: fully unpickle SOURCE, which can run code stored in it.")
@click.option("--skip-integrity-check", is_flag=True,
              help="Use CONVERTED even if its tensor data no longer hashes to the sha256 its config.json records.")
@click.version_option(__version__, prog_name="lic-verify")
def main(paths, family, images, tiers, target, forward_rtol, forward_atol, likelihood_rtol,
         likelihood_atol, flip_margin, metric_atol, json_out, md_out, save_outputs, baseline, threads, out_dir,
         device, quiet, demo, upstream_repo, mapping, unsafe_trust_pickle, skip_integrity_check):
    """Verify a converted checkpoint against the upstream model, tier by tier.

    SOURCE is the upstream checkpoint; CONVERTED (a lic-convert output folder, a .safetensors file, or
    hf://REPO_ID) is converted on the fly when absent.  When CONVERTED is a folder, the report is
    also written there (parity_report.json, parity_report.md).  With --out-dir, every positional is
    a source checkpoint of one release (see --out-dir).
    """
    import torch

    from .tiers import Tolerances

    try:
        tier_list = _tiers(tiers)
    except click.BadParameter as exc:
        _fail(str(exc))
    torch.set_num_threads(max(1, threads))
    tol = Tolerances(forward_rtol=forward_rtol, forward_atol=forward_atol, likelihood_rtol=likelihood_rtol,
                     likelihood_atol=likelihood_atol, flip_margin=flip_margin, metric_atol=metric_atol)
    if out_dir is not None:
        _release(paths, out_dir, images=images, tiers=tier_list, tol=tol, device=device, family=family,
                 target=target, trust_pickle=unsafe_trust_pickle, upstream_repo=upstream_repo,
                 check_integrity=not skip_integrity_check, quiet=quiet,
                 single_only={"--json": json_out, "--markdown": md_out, "--save-outputs": save_outputs,
                              "--baseline": baseline, "--demo": demo, "--mapping": mapping})
    if len(paths) > 2:
        _fail(f"{len(paths)} paths given: give SOURCE [CONVERTED], or several checkpoints with --out-dir OUT")
    source = Path(paths[0]) if paths else None
    converted = paths[1] if len(paths) > 1 else None
    try:
        if demo:
            source, converted = _prepare_demo(demo)
        if source is None:
            _fail("give the upstream checkpoint to verify (or --demo NAME); see lic-verify --help")
        report_dir = None
        if converted is not None and str(converted).startswith("hf://"):
            converted = _download(str(converted)[len("hf://"):])  # a cache folder: the report stays out of it
        elif converted is not None and Path(converted).is_dir():
            report_dir = Path(converted)
        if unsafe_trust_pickle:
            click.echo("lic-verify: WARNING: --unsafe-trust-pickle: SOURCE is fully unpickled and can run code",
                       err=True)
        from .api import verify_checkpoint

        progress = (lambda m: click.echo(f"  … {m}", err=True)) if sys.stderr.isatty() and not quiet else None
        report = verify_checkpoint(source, converted, family=family, images=list(images) or None,
                                   tiers=tier_list, tolerances=tol, target=target, save_outputs=save_outputs,
                                   trust_pickle=unsafe_trust_pickle, mapping=mapping,
                                   upstream_repo=upstream_repo, progress=progress,
                                   check_integrity=not skip_integrity_check, device=device)
    except LicError as exc:
        _fail(str(exc))
    _emit(report, json_out, md_out, report_dir)
    code = 0 if report.passed else 1
    if baseline is not None:
        code = max(code, _check_baseline(report, baseline))
    sys.exit(code)


def _release(paths, out_dir, *, single_only, **options) -> None:
    """``--out-dir``: verify every checkpoint in ``paths`` as one release (verify/release.py); exits."""
    given = [name for name, value in single_only.items() if value]
    if given:
        _fail(f"{given[0]} is for one checkpoint; it does not go with --out-dir")
    if not paths:
        _fail("give the checkpoints of the release: lic-verify A.pth.tar B.pth.tar ... --out-dir OUT")
    if options["trust_pickle"]:
        click.echo("lic-verify: WARNING: --unsafe-trust-pickle: every checkpoint is fully unpickled and can run "
                   "code", err=True)
    from .release import verify_release

    try:
        release = verify_release([Path(p) for p in paths], out_dir, images=list(options.pop("images")) or None,
                                 tolerances=options.pop("tol"), **options)
    except LicError as exc:
        _fail(str(exc))
    for row in release.rows:
        click.echo(f"{row.verdict:<7} {row.name}" + (f": {row.why}" if row.why else ""))
    click.echo(f"release: {sum(r.passed for r in release.rows)}/{len(release.rows)} passed; wrote "
               f"{out_dir / 'release_report.json'}, {out_dir / 'release_report.md'} and {out_dir / 'rd.png'}")
    sys.exit(0 if release.passed else 1)


def _emit(report, json_out, md_out, report_dir) -> None:
    to_stdout = str(json_out) == "-" or str(md_out) == "-"
    if not to_stdout:
        click.echo(report.render_table())
    for target, text in ((json_out, report.to_json() + "\n"), (md_out, report.to_markdown())):
        if target is None:
            continue
        if str(target) == "-":
            click.echo(text, nl=False)
        else:
            from lic_checkpoints.convert.writer import atomic_path

            Path(target).parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(Path(target)) as tmp:
                tmp.write_text(text)
    if report_dir is not None:
        paths = report.write(report_dir)
        if not to_stdout:
            click.echo(f"wrote {paths[0]} and {paths[1]}")


def _check_baseline(report, baseline: Path) -> int:
    from .report import compare_to_baseline

    try:
        old = json.loads(baseline.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        _fail(f"{baseline}: cannot read the baseline report ({exc})")
    changes = compare_to_baseline(json.loads(report.to_json()), old)
    if not changes:
        click.echo(f"baseline {baseline}: no regression", err=True)
        return 0
    click.echo(f"baseline {baseline}: REGRESSION ({len(changes)} difference(s))", err=True)
    for line in changes[:40]:
        click.echo(f"  {line}", err=True)
    return 1


def _download(spec: str) -> Path:
    """``hf://owner/name`` or ``hf://owner/name@revision`` -> the downloaded folder."""
    from lic_checkpoints.publish.hub import download_converted

    repo_id, _, revision = spec.partition("@")
    return download_converted(repo_id, revision=revision or None)


def _prepare_demo(name: str) -> tuple[Path, Path]:
    from lic_checkpoints.convert import api, demo

    out = Path("lic-demo")
    name = demo.resolve(name)
    upstream = demo.demo_checkpoint(name, out / f"{name}-upstream.pth.tar")
    result = api.convert_checkpoint(upstream, out / f"{name}-compressai")
    click.echo(f"demo {name}: {upstream} -> {result.out_dir}/ ({result.detection.describe()})")
    return upstream, result.out_dir


if __name__ == "__main__":  # pragma: no cover
    main()
