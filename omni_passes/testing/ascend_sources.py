"""Bring torchair's and vllm-ascend's real Python sources onto a machine without Ascend.

    python -m omni_passes.testing.ascend_sources fetch --dest .venv/ascend     (make install does this)

Why not ``pip install``: installing torch-npu registers a ``torch.backends`` entry point that
torch loads on ``import torch``, which then fails without CANN (``libhccl.so``), so a venv
with torch-npu installed cannot import torch at all. vllm-ascend pins other torch versions and
would register vLLM platform plugins. So the wheels are downloaded by name (no dependencies)
and only their Python packages are unpacked, without ``*.dist-info`` (no entry points) and
without native libraries:

    DEST/torch_npu-2.13.0/torch_npu/dynamo/torchair/...   put DEST/torch_npu-2.13.0/torch_npu/dynamo on sys.path
    DEST/vllm_ascend-0.26.0rc1/vllm_ascend/...            put DEST/vllm_ascend-0.26.0rc1 on sys.path
    DEST/manifest.json                                    versions, wheel sha256, file counts
    DEST/wheels/*.whl                                     the downloaded wheels (cache: re-runs are fast)

``omni_passes.testing.ascend`` puts those directories on ``sys.path`` and stands in for the one
native module torchair's graph building imports. Every failure names what failed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Source:
    """One wheel and the part of it the tests run."""

    project: str          # PyPI name
    version: str
    wheel_prefix: str     # file name prefix of the wheel
    package_path: str     # directory inside the wheel to unpack
    sys_path: str         # directory (relative to the unpack root) that goes on sys.path


TORCH_NPU = Source("torch-npu", "2.13.0", "torch_npu-2.13.0-", "torch_npu/dynamo/torchair/", "torch_npu/dynamo")
VLLM_ASCEND = Source("vllm-ascend", "0.26.0rc1", "vllm_ascend-0.26.0rc1-", "vllm_ascend/", "")
SOURCES = (TORCH_NPU, VLLM_ASCEND)
MANIFEST = "manifest.json"


class FetchError(RuntimeError):
    """A download or unpack step failed; the message says which and why."""


def unpack_root(dest: Path, source: Source) -> Path:
    return dest / f"{source.wheel_prefix.rstrip('-')}"


def sys_path_entry(dest: Path, source: Source) -> Path:
    root = unpack_root(dest, source)
    return root / source.sys_path if source.sys_path else root


def _find_wheel(wheels: Path, source: Source) -> Path | None:
    found = sorted(wheels.glob(f"{source.wheel_prefix}*.whl"))
    return found[-1] if found else None


def download(wheels: Path, source: Source) -> Path:
    """The wheel of ``source`` in ``wheels``, downloaded by name unless already there."""
    cached = _find_wheel(wheels, source)
    if cached is not None and zipfile.is_zipfile(cached):
        return cached
    wheels.mkdir(parents=True, exist_ok=True)
    # Only the wheel built for this project's interpreter and platform (x86_64 cp311 exist);
    # the unpacked part is pure Python, so any CPython >= 3.10 can run it.
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--python-version", "3.11", "--implementation", "cp", "--abi", "cp311",
           "--platform", "manylinux_2_28_x86_64", "--platform", "manylinux_2_34_x86_64",
           "-d", str(wheels), f"{source.project}=={source.version}"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-12:])
        raise FetchError(f"downloading {source.project}=={source.version} from PyPI failed "
                         f"(pip exit {proc.returncode}):\n  {' '.join(cmd)}\n{tail}")
    wheel = _find_wheel(wheels, source)
    if wheel is None:
        raise FetchError(f"pip reported success but no {source.wheel_prefix}*.whl is in {wheels}")
    return wheel


def unpack(wheel: Path, dest: Path, source: Source) -> int:
    """Unpack the Python files under ``source.package_path``; returns how many."""
    root = unpack_root(dest, source)
    try:
        archive = zipfile.ZipFile(wheel)
    except zipfile.BadZipFile as exc:
        raise FetchError(f"{wheel} is not a readable wheel ({exc}); delete it and re-run") from None
    with archive:
        names = [n for n in archive.namelist() if n.startswith(source.package_path) and not n.endswith("/")]
        # native libraries stay out: they need CANN, and the one graph building imports is stood in
        wanted = [n for n in names if not n.endswith(".so") and ".so." not in n]
        if not wanted:
            raise FetchError(f"{wheel} has no files under {source.package_path}: not the expected wheel layout")
        for name in wanted:
            target = root / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(archive.read(name))
    return len(wanted)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch(dest: Path) -> dict:
    """Download (cached) and unpack every source; writes and returns the manifest."""
    dest.mkdir(parents=True, exist_ok=True)
    manifest = {"sources": {}}
    for source in SOURCES:
        wheel = download(dest / "wheels", source)
        count = unpack(wheel, dest, source)
        manifest["sources"][source.project] = {
            "version": source.version, "wheel": wheel.name, "sha256": _sha256(wheel), "files": count,
            "sys_path": str(sys_path_entry(dest, source).relative_to(dest)),
        }
    (dest / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    fetch_parser = sub.add_parser("fetch", help="download the wheels (cached) and unpack their Python sources")
    fetch_parser.add_argument("--dest", required=True, type=Path)
    args = parser.parse_args(argv)
    try:
        manifest = fetch(args.dest)
    except (FetchError, OSError) as exc:
        print(f"ascend sources: {exc}", file=sys.stderr)
        return 1
    for project, entry in manifest["sources"].items():
        print(f"ascend sources: {project} {entry['version']}: {entry['files']} files from {entry['wheel']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
