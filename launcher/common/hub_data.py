"""Hugging Face Hub datasets named in a recipe (`data.train: [{hub: org/name, split: train}]`): where their snapshot
is in the local Hub cache, whether the Hub can be asked, the download, and the data files of a split.

Both sides use it. The submitting side (`launch plan`, `launch`) checks that every Hub dataset is cached or can be
downloaded, and `launch` downloads the missing ones into the Hub cache on the machine that runs it; the ranks, which
often have no internet (and run with HF_HUB_OFFLINE=1), read the cached snapshot only (`local_files_only`). So the
Hub cache (HF_HOME / HF_HUB_CACHE) must be on storage the nodes share, as the run directory is.

huggingface_hub (no torch) and `datasets` (no torch for what is used here: resolving a repository's data files) are
imported inside the functions, so the planning side pays for them only when a recipe names a Hub dataset.
"""

from __future__ import annotations

import functools
from pathlib import Path

from launcher.config.schema import DataSource

PROBE_TIMEOUT_S = 10.0
"""How long `launch plan` waits for the Hub to answer whether a dataset that is not cached exists."""

DEFAULT_SPLIT = "train"


def cache_dir() -> Path:
    """The Hub cache huggingface_hub reads and writes: HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache/huggingface/hub
    (read by huggingface_hub when it is imported)."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def offline() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) is set: the Hub is not to be asked. huggingface_hub's own reading of
    the variables (taken when it is imported, like the cache directory), so this agrees with what it does."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def repo_cache(repo: str) -> Path:
    """Where the cache keeps this dataset (`datasets--org--name`: refs/, snapshots/<commit>/, blobs/)."""
    from huggingface_hub.file_download import repo_folder_name

    return cache_dir() / repo_folder_name(repo_id=repo, repo_type="dataset")


def local_snapshot(repo: str, revision: str | None) -> Path | None:
    """The cached snapshot directory of `repo` at `revision` (default main), or None when it is not (completely)
    cached. Never touches the network."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo, repo_type="dataset", revision=revision, cache_dir=cache_dir(),
                                      local_files_only=True))
    except FileNotFoundError:  # LocalEntryNotFoundError, IncompleteSnapshotError
        return None


def commit_of(snapshot: Path) -> str:
    """The commit hash a snapshot directory holds (huggingface_hub names it `snapshots/<commit hash>`)."""
    return snapshot.name


@functools.lru_cache(maxsize=64)
def probe(repo: str, revision: str | None) -> str | None:
    """Why `repo` cannot be downloaded from here (offline, unreachable, not found, no such revision), or None when
    the Hub answered that it exists. Asked once per process (a sweep plans many trials of one recipe)."""
    if offline():
        return "HF_HUB_OFFLINE is set, so the Hub is not asked"
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    try:
        HfApi().dataset_info(repo, revision=revision, timeout=PROBE_TIMEOUT_S)
    except GatedRepoError:
        return "the Hub says it is gated: accept its terms on its page and log in (`hf auth login`)"
    except RepositoryNotFoundError:
        return "the Hub has no such dataset (or it is private: log in with `hf auth login`)"
    except RevisionNotFoundError:
        return f"the Hub has no revision {revision!r} of it"
    except Exception as err:  # noqa: BLE001 (httpx's connection and timeout errors, HTTP 5xx: all mean unreachable)
        return f"the Hub could not be reached ({type(err).__name__}: {err})"
    return None


def download(repo: str, revision: str | None) -> Path:
    """Download the dataset's snapshot (the whole repository at that revision) into the Hub cache; its directory."""
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(repo, repo_type="dataset", revision=revision, cache_dir=cache_dir()))


def fix_hint(source: DataSource) -> str:
    """How to get a Hub dataset onto a machine that cannot download it."""
    assert source.hub is not None
    revision = f" --revision {source.revision}" if source.revision else ""
    folder = repo_cache(source.hub).name
    return (f"download it with internet access into the Hub cache this machine reads (HF_HUB_CACHE={cache_dir()}): "
            f"`hf download --repo-type dataset {source.hub}{revision}` (`huggingface-cli download` in older "
            f"huggingface_hub), or on another machine and copy its {folder} folder there; or save it with "
            "`datasets.load_dataset(...).save_to_disk(DIR)` and set path: DIR instead of hub")


SUPPORTED_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")
"""The data file types ftlaunch's readers take (launcher/train/data.py), the same as a local `path`."""


class HubDataError(ValueError):
    """A cached Hub dataset whose data cannot be read: no such subset or split, or files of another type."""

    def __init__(self, message: str, field: str) -> None:
        super().__init__(message)
        self.field = field
        """The DataSource field to change: subset, split or hub."""


def data_files(snapshot: Path, source: DataSource) -> list[Path]:
    """The files of `source.split` (default train) of the snapshot, in order, found as `datasets.load_dataset` finds
    them: the README's `configs:` (with `source.subset`), else the file and directory names (`data/train-*.parquet`,
    `test.jsonl`...). `datasets` resolves the names only here; the rows are read by ftlaunch's own readers, so a bad
    row is reported by its file and line as in a local file.

    Raises:
        HubDataError: no such subset or split, no files, or files of a type ftlaunch does not read.
    """
    import datasets

    try:
        builder = datasets.load_dataset_builder(str(snapshot), source.subset)
    except ValueError as err:  # "Config name is missing", "BuilderConfig 'x' not found. Available: [...]"
        message = " ".join(str(err).split())
        raise HubDataError(message, "subset" if "config" in message.lower() else "hub") from None
    except FileNotFoundError as err:  # no data files at all
        raise HubDataError(f"no data files found ({err})", "hub") from None
    except Exception as err:  # noqa: BLE001 (a loading script, which datasets 4+ refuses; unreadable metadata)
        raise HubDataError(f"its data files cannot be resolved ({type(err).__name__}: {err})", "hub") from None
    split = source.split or DEFAULT_SPLIT
    found = {str(name): files for name, files in (builder.config.data_files or {}).items()}  # NamedSplit keys
    if split not in found:
        raise HubDataError(f"no split {split!r} (splits: {', '.join(found) or 'none'})", "split")
    files = [Path(str(f)) for f in found[split]]
    other = sorted({f.name for f in files if not f.name.lower().endswith(SUPPORTED_SUFFIXES)})
    if other or not files:
        raise HubDataError(f"split {split!r} is stored as {', '.join(other[:3]) or 'no files'}; ftlaunch reads "
                           f"{', '.join(SUPPORTED_SUFFIXES)} files", "hub")
    return files
