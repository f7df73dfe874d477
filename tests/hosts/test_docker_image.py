"""The node image: built offline (or reused by content hash), labelled, with the node tools."""

from __future__ import annotations

import time

import pytest

from testbed.hosts import docker_engine as de
from testbed.hosts import images

pytestmark = [pytest.mark.root, pytest.mark.docker, pytest.mark.slow]


def test_image_is_built_then_reused_by_hash(client) -> None:
    first = images.ensure_image(client=client)
    t0 = time.monotonic()
    again = images.ensure_image(client=client)
    assert again.reused and again.tag == first.tag and again.image_id == first.image_id
    assert time.monotonic() - t0 < 5  # a rebuild with nothing changed: seconds at most
    img = client.images.get(first.tag)
    assert img.labels[de.LABEL] == "1"
    assert img.labels[de.HASH_LABEL] == images.inputs_hash()
    assert first.tag == f"{images.IMAGE_REPO}:{images.inputs_hash()}"


def test_image_has_python_and_node_tools(client) -> None:
    tag = images.ensure_image(client=client).tag
    out = client.containers.run(
        tag, ["sh", "-c", "python3 -c 'import sys, yaml; print(sys.version.split()[0])'; "
              "iperf3 --version | head -1; for t in ping ip tc ethtool ifconfig; do command -v $t; done"],
        network_mode="none", remove=True, labels={de.LABEL: "1"},
    ).decode()
    assert out.splitlines()[0] == "3.11.2"  # the venv's interpreter version (Debian's python3)
    assert out.splitlines()[1].startswith("iperf 3")
    for tool in ("ping", "ip", "tc", "ethtool", "ifconfig"):
        assert f"/{tool}\n" in out


def test_forced_rebuild_reuses_the_cached_rootfs(client) -> None:
    """--force rebuilds the image from the cached debootstrap tarball (no debootstrap run)."""
    before = images.ensure_image(client=client)
    tarball = images.rootfs_tarball(images.packages())
    assert tarball.exists()
    mtime = tarball.stat().st_mtime
    forced = images.ensure_image(force=True, client=client)
    assert not forced.reused and forced.rootfs_cached
    assert forced.tag == before.tag and tarball.stat().st_mtime == mtime
    assert forced.seconds < 60


def test_inputs_hash_follows_the_build_files(tmp_path) -> None:
    d = tmp_path / "image"
    d.mkdir()
    for f in images.IMAGE_DIR.iterdir():
        (d / f.name).write_bytes(f.read_bytes())
    assert images.inputs_hash(d) == images.inputs_hash()
    (d / "packages.txt").write_text((d / "packages.txt").read_text() + "curl\n")
    assert images.inputs_hash(d) != images.inputs_hash()
    assert images.rootfs_key(images.packages(d)) != images.rootfs_key(images.packages())
