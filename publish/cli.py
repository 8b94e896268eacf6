"""``lic-push OUT_DIR REPO_ID``: publish a converted, verified folder to the Hugging Face Hub.

The command only parses options and prints; :mod:`.bundle` decides what is sent and :mod:`.hub`
sends it.  User mistakes and Hub failures end with one line on stderr and exit code 2.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from lic_checkpoints import __version__
from lic_checkpoints.convert.errors import LicError

PROG = "lic-push"


def _fail(message: str) -> None:
    click.echo(f"{PROG}: error: {message}", err=True)
    sys.exit(2)


def _default_stage_dir(out_dir: Path) -> Path:
    return out_dir.parent / f"{out_dir.name}-hub-staging"


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("out_dir", type=click.Path(path_type=Path))
@click.argument("repo_id")
@click.option("--private", is_flag=True, help="Create the repository as private (no effect if it exists).")
@click.option("--revision", metavar="BRANCH", help="Commit to this branch (created from main if missing).")
@click.option("--commit-message", metavar="TEXT", help="Commit title (default says family, variant and parity).")
@click.option("--token", metavar="TOKEN", default=None,
              help="Hub token; default: HF_TOKEN, then the `hf auth login` cache. Prefer those over this "
                   "option, which shows in the process list.")
@click.option("--endpoint", metavar="URL", help="Hub address (e.g. a staging server); default: huggingface.co.")
@click.option("--dry-run", is_flag=True,
              help="Contact nobody: write the exact files of the commit into a staging folder and list them.")
@click.option("--stage-dir", type=click.Path(path_type=Path), metavar="DIR",
              help="Where --dry-run writes the files (default: OUT_DIR-hub-staging next to OUT_DIR).")
@click.option("--allow-failing-parity", is_flag=True,
              help="Publish even without a passing parity report; the model card then opens with a warning.")
@click.option("-v", "--verbose", is_flag=True,
              help="Show huggingface_hub's own messages (retries, progress details) on stderr.")
@click.version_option(__version__, prog_name=PROG)
def main(out_dir, repo_id, private, revision, commit_message, token, endpoint, dry_run, stage_dir,
         allow_failing_parity, verbose):
    """Publish OUT_DIR (written by lic-convert, checked by lic-verify) to the model repo REPO_ID.

    Sends model.safetensors, config.json, parity_report.json and a generated README.md model card
    in one commit, so a failed push leaves the repository as it was.
    """
    from huggingface_hub.utils import logging as hf_logging

    from . import bundle as bundle_mod
    from . import hub

    if not verbose:  # a failure is reported once, by us; the client's retry chatter stays quiet
        hf_logging.set_verbosity_error()
    try:
        hub.check_repo_id(repo_id)
        bundle = bundle_mod.collect(out_dir, repo_id, allow_failing_parity=allow_failing_parity)
        if not bundle.parity_passed:
            click.echo(f"{PROG}: WARNING: publishing without a passing parity report "
                       "(--allow-failing-parity); the card says so at the top", err=True)
        if dry_run:
            staging = stage_dir or _default_stage_dir(out_dir)
            rows = bundle_mod.stage(bundle, staging)
            click.echo(f"dry run: nothing sent; the commit to {repo_id} would hold these files, staged in {staging}/")
            for name, size, digest in rows:
                click.echo(f"  {name:<20} {size:>12} bytes  sha256 {digest}")
            return
        result = hub.push(bundle, repo_id, private=private, revision=revision, commit_message=commit_message,
                          token=token, endpoint=endpoint)
    except LicError as exc:
        _fail(str(exc))
    except KeyboardInterrupt:
        _fail("interrupted; the commit is all-or-nothing, so the repository holds either all files or none")
    click.echo(f"pushed {', '.join(bundle.names())} to {result.repo_url} (branch {result.revision})")
    click.echo(f"  commit {result.commit_url}")


if __name__ == "__main__":  # pragma: no cover
    main()
