"""Build the node container image offline: debootstrap rootfs -> ``docker import`` -> Dockerfile.

No registry is reachable here, so ``docker pull`` and ``FROM debian`` are impossible.  The
image is made from a Debian 12 (bookworm) rootfs built with ``debootstrap --variant=minbase``
from the apt mirror this machine already uses, imported with the Docker SDK, then finished
with ``nodes/image/Dockerfile`` (``pull=False``, ``network_mode=none``).

Python, the project, its dependencies and the model cache are *not* copied into the image:
the host's venv (made from Debian's ``/usr/bin/python3`` 3.11, the same interpreter the
bookworm rootfs has), the repository and the model cache are bind-mounted read-only at the
same paths (see :mod:`testbed.hosts.docker_host`).  That keeps the image ~300 MB, needs no
network at build time and makes containers run exactly the code and weights of the host.

Caching: the rootfs tarball lives in ``/var/cache/edgellm-testbed/`` keyed by the package
list, so ``--force`` rebuilds the image without re-running debootstrap; the image carries a
content hash of all build inputs as the label ``edgellm-testbed.inputs``, so a rebuild with
nothing changed is a single API call.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from testbed.hosts.docker_engine import HASH_LABEL, LABEL, engine
from testbed.spec.errors import SpecError

IMAGE_REPO = "edgellm-testbed/node"
BASE_REPO = "edgellm-testbed/rootfs"
SUITE = "bookworm"
VARIANT = "minbase"
BUILD_VERSION = "1"  # bump to force new images when this module's recipe changes
IMAGE_DIR = Path(__file__).resolve().parents[2] / "nodes" / "image"
CACHE_DIR = Path(os.environ.get("EDGELLM_IMAGE_CACHE", "/var/cache/edgellm-testbed"))
DEFAULT_MIRROR = "http://deb.debian.org/debian"


@dataclass
class BuildResult:
    """What :func:`ensure_image` did."""

    tag: str
    image_id: str
    size_bytes: int
    reused: bool
    rootfs_cached: bool
    seconds: float


def packages(image_dir: Path = IMAGE_DIR) -> list[str]:
    """The Debian packages listed in ``nodes/image/packages.txt``."""
    lines = (image_dir / "packages.txt").read_text().splitlines()
    return [ln.split("#", 1)[0].strip() for ln in lines if ln.split("#", 1)[0].strip()]


def rootfs_key(pkgs: list[str]) -> str:
    """Cache key of the debootstrap rootfs (suite, variant, package list)."""
    text = "\n".join([SUITE, VARIANT, *sorted(pkgs)])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def inputs_hash(image_dir: Path = IMAGE_DIR) -> str:
    """Content hash of every build input: the recipe version and the files of ``nodes/image``."""
    h = hashlib.sha256(f"{BUILD_VERSION}\n{SUITE}\n{VARIANT}\n".encode())
    for f in sorted(p for p in image_dir.rglob("*") if p.is_file() and p.name != "README.md"):
        h.update(str(f.relative_to(image_dir)).encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def image_tag(image_dir: Path = IMAGE_DIR) -> str:
    return f"{IMAGE_REPO}:{inputs_hash(image_dir)}"


def apt_mirror() -> str:
    """The Debian mirror apt uses here (deb822 or one-line sources), else deb.debian.org."""
    if os.environ.get("EDGELLM_DEBIAN_MIRROR"):
        return os.environ["EDGELLM_DEBIAN_MIRROR"]
    files = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]
    for f in files:
        try:
            text = f.read_text()
        except OSError:
            continue
        for stanza in text.split("\n\n"):
            fields = dict(
                ln.split(":", 1) for ln in stanza.splitlines() if ":" in ln and not ln.startswith(("#", " "))
            )
            uris = fields.get("URIs", "").split()
            if SUITE in fields.get("Suites", "").split() and uris and uris[0].rstrip("/").endswith("/debian"):
                return uris[0]
        for ln in text.splitlines():
            parts = ln.split()
            if len(parts) >= 3 and parts[0] == "deb" and parts[2] == SUITE and parts[1].endswith("/debian"):
                return parts[1]
    return DEFAULT_MIRROR


def _fail(what: str, message: str) -> SpecError:
    return SpecError(str(IMAGE_DIR / "packages.txt"), what, message)


def rootfs_tarball(pkgs: list[str], cache_dir: Path = CACHE_DIR) -> Path:
    """Where the cached debootstrap rootfs for ``pkgs`` lives."""
    return cache_dir / f"rootfs-{SUITE}-{VARIANT}-{rootfs_key(pkgs)}.tar"


def build_rootfs(pkgs: list[str], cache_dir: Path = CACHE_DIR) -> tuple[Path, bool]:
    """The rootfs tarball for ``pkgs`` (debootstrap + tar when not cached); returns (path, cached)."""
    tarball = rootfs_tarball(pkgs, cache_dir)
    if tarball.exists():
        return tarball, True
    if shutil.which("debootstrap") is None:
        raise _fail("debootstrap", "not installed (run bash vagrant/provision.sh)")
    cache_dir.mkdir(parents=True, exist_ok=True)  # `make vm-box` may be its first user
    work = cache_dir / f"build-{os.getpid()}"
    log = cache_dir / "debootstrap.log"
    shutil.rmtree(work, ignore_errors=True)
    try:
        root = str(work / "root")
        include = ",".join(pkgs)
        cmd = ["debootstrap", f"--variant={VARIANT}", f"--include={include}", SUITE, root, apt_mirror()]
        with open(log, "wb") as out:
            rc = subprocess.call(cmd, stdout=out, stderr=subprocess.STDOUT)
        if rc != 0:
            raise _fail("debootstrap", f"failed with exit code {rc}; see {log}")
        # apt lists and caches are not needed in a node
        for junk in ("var/cache/apt/archives", "var/lib/apt/lists"):
            for p in (work / "root" / junk).glob("*"):
                if p.is_file():
                    p.unlink()
        part = work / "rootfs.tar"
        subprocess.run(["tar", "--numeric-owner", "--xattrs", "-C", root, "-cf", str(part), "."], check=True)
        part.rename(tarball)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return tarball, False


def _find_image(client: Any, tag: str) -> Any | None:
    import docker.errors

    try:
        return client.images.get(tag)
    except docker.errors.ImageNotFound:
        return None


def ensure_image(force: bool = False, image_dir: Path = IMAGE_DIR, cache_dir: Path = CACHE_DIR,
                 client: Any | None = None, quiet: bool = True) -> BuildResult:
    """The node image for the current build inputs, built if missing (or if ``force``)."""
    t0 = time.monotonic()
    client = client or engine(str(image_dir / "Dockerfile"), "image")
    tag = image_tag(image_dir)
    want = inputs_hash(image_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    with open(cache_dir / "build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one builder at a time (parallel tests)
        img = _find_image(client, tag)
        if img is not None and not force and img.labels.get(HASH_LABEL) == want:
            return BuildResult(tag, img.id, int(img.attrs["Size"]), True, True, time.monotonic() - t0)
        pkgs = packages(image_dir)
        if not quiet:
            print(f"building {tag} (debootstrap {SUITE} {VARIANT} + {len(pkgs)} packages)", file=sys.stderr)
        tarball, cached = build_rootfs(pkgs, cache_dir)
        base = f"{BASE_REPO}:{rootfs_key(pkgs)}"
        repo, base_tag = base.split(":")
        client.api.import_image_from_file(str(tarball), repository=repo, tag=base_tag,
                                          changes=[f"LABEL {LABEL}=1"])
        img, _logs = client.images.build(
            path=str(image_dir), tag=tag, buildargs={"BASE": base}, labels={LABEL: "1", HASH_LABEL: want},
            pull=False, network_mode="none", rm=True, forcerm=True, nocache=force,
        )
        img.tag(IMAGE_REPO, "latest")
        img.reload()
        # the image a --force rebuild replaced is now untagged: drop it (unless a container uses it)
        client.images.prune(filters={"dangling": True, "label": LABEL})
        return BuildResult(tag, img.id, int(img.attrs["Size"]), False, cached, time.monotonic() - t0)


def images(args: argparse.Namespace) -> int:
    """``testbed images [--force]``: build (or reuse) the node image and print what happened."""
    r = ensure_image(force=bool(getattr(args, "force", False)), quiet=False)
    how = "reused (inputs unchanged)" if r.reused else (
        "built" + (" from the cached rootfs" if r.rootfs_cached else " (debootstrap + import)"))
    print(f"{r.tag}  {r.image_id[7:19]}  {r.size_bytes / 1e6:.0f} MB  {how} in {r.seconds:.1f} s")
    return 0
