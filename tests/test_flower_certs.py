"""Credentials for a deployment: private keys readable by their owner alone from the first byte,
never written through a symbolic link, into a folder only the owner can enter; a node's key made
on the node."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from fedlora.cli import main
from fedlora.flower.certs import make_certificates, make_node_key, write_private


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def test_keys_are_owner_only_in_an_owner_only_folder(tmp_path: Path) -> None:
    folder = tmp_path / "creds"

    ca, cert, key = make_certificates(folder)
    private, public = make_node_key(folder, "node-0")

    assert mode(folder) == 0o700
    assert mode(key) == 0o600 and mode(private) == 0o600
    assert b"PRIVATE KEY" in key.read_bytes() and public.read_bytes().startswith(b"ecdsa-sha2")
    assert ca.exists() and cert.exists()


def test_a_symbolic_link_is_refused_never_written_through(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.write_bytes(b"keep me")
    folder = tmp_path / "creds"
    folder.mkdir(mode=0o700)
    (folder / "server.key").symlink_to(target)

    with pytest.raises(OSError):
        make_certificates(folder)
    assert target.read_bytes() == b"keep me"

    linked = tmp_path / "linked"
    linked.symlink_to(folder)
    with pytest.raises(FileExistsError, match="not a folder"):
        make_node_key(linked, "node-0")


def test_a_folder_others_can_enter_is_refused(tmp_path: Path) -> None:
    open_folder = tmp_path / "open"
    open_folder.mkdir()
    open_folder.chmod(0o755)

    with pytest.raises(PermissionError, match="mode 755"):
        make_node_key(open_folder, "node-0")
    assert not (open_folder / "node-0").exists()


def test_an_existing_file_is_made_owner_only_before_the_key_is_written(tmp_path: Path) -> None:
    path = tmp_path / "key"
    path.write_bytes(b"old")
    path.chmod(0o644)

    write_private(path, b"secret")

    assert mode(path) == 0o600 and path.read_bytes() == b"secret"


def test_a_node_makes_its_own_key_and_ships_only_the_public_half(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["flower", "node-key", str(tmp_path / "mine"), "--name", "node-3"]) == 0

    out = capsys.readouterr().out
    assert "node-3 (private: keep it on this host)" in out and "node-3.pub: send it" in out
    assert mode(tmp_path / "mine" / "node-3") == 0o600
