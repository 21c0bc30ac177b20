"""Identity and secrets at rest: keys and secrets others can read are refused, short secrets too, an exposed
bind needs authentication, the roster is strict, and the rendezvous store's values are authenticated."""

from __future__ import annotations

from datetime import timedelta

import pytest
import torch.distributed as dist

from neurofed.federated.config import Federation
from neurofed.federated.errors import FederationConfigError
from neurofed.federated.group import AuthenticatedStore
from neurofed.federated.identity import Roster, RosterEntry, SiteIdentity, verify
from neurofed.federated.simulate import free_port


def test_a_secret_file_others_can_read_or_a_short_secret_is_refused_in_one_line(tmp_path, monkeypatch):
    monkeypatch.delenv("NEUROFED_FEDERATION_SECRET", raising=False)
    loose = tmp_path / "loose"
    loose.write_text("a" * 64)
    loose.chmod(0o644)
    with pytest.raises(FederationConfigError, match=r"readable by others \(mode 644\).*chmod 600") as e:
        Federation(num_sites=2, secret_file=str(loose)).load_secret()
    assert "\n" not in str(e.value)
    short = tmp_path / "short"
    short.write_text("an 18-byte phrase!")
    short.chmod(0o600)
    with pytest.raises(FederationConfigError, match="has 18 bytes; use at least 32 random bytes"):
        Federation(num_sites=2, secret_file=str(short)).load_secret()
    loose.chmod(0o600)
    assert Federation(num_sites=2, secret_file=str(loose)).load_secret() == b"a" * 64


def test_an_exposed_bind_or_address_needs_secret_key_and_roster(tmp_path, monkeypatch):
    monkeypatch.delenv("NEUROFED_FEDERATION_SECRET", raising=False)
    exposed = Federation(num_sites=2, bind_address="0.0.0.0")  # the address is loopback, the socket is not
    assert not exposed.on_loopback
    with pytest.raises(FederationConfigError, match="listens on 0.0.0.0.*secret_file.*key_file, roster_file"):
        exposed.require_secret_or_loopback()
    assert Federation(num_sites=2, bind_address="0.0.0.0", insecure=True).require_secret_or_loopback() is None
    assert Federation(num_sites=2).require_secret_or_loopback() is None  # a loopback simulation
    with pytest.raises(FederationConfigError, match="key_file and roster_file go together"):
        Federation(num_sites=2, key_file=str(tmp_path / "k"))


def test_keys_are_private_files_and_the_roster_is_strict(tmp_path):
    identity = SiteIdentity.ephemeral()
    identity.write(tmp_path / "site.key")
    assert SiteIdentity.load(tmp_path / "site.key").public == identity.public
    assert "PRIVATE" not in repr(identity) and verify(identity.public, b"m", identity.sign(b"m"))
    assert not verify(identity.public, b"other", identity.sign(b"m"))
    (tmp_path / "site.key").chmod(0o640)
    with pytest.raises(FederationConfigError, match="key_file .* is readable by others"):
        SiteIdentity.load(tmp_path / "site.key")
    other = SiteIdentity.ephemeral()
    roster = Roster([RosterEntry(0, "ixi", identity.public), RosterEntry(1, "sald", other.public)])
    assert Roster.parse(roster.text()).digest == roster.digest
    with pytest.raises(FederationConfigError, match="line 1: expected"):
        Roster.parse("0 ixi rsa AAAA\n")
    with pytest.raises(FederationConfigError, match="same public key"):
        Roster([RosterEntry(0, "ixi", identity.public), RosterEntry(1, "sald", identity.public)])
    with pytest.raises(FederationConfigError, match=r"ranks are \[0, 2\]"):
        Roster([RosterEntry(0, "ixi", identity.public), RosterEntry(2, "sald", other.public)])


def test_a_rendezvous_value_moved_or_forged_by_a_store_outsider_is_refused_not_used():
    """Gloo finds each rank's address in the store. An outsider who reaches the store (it can list, read and
    write every key) copies rank 0's address to rank 1's key, or writes its own: neither passes the check."""
    port = free_port()
    server = dist.TCPStore("127.0.0.1", port, None, True, timedelta(seconds=10), wait_for_workers=False)
    sites = AuthenticatedStore(dist.TCPStore("127.0.0.1", port, None, False, timedelta(seconds=10), False), b"k" * 32)
    outsider = dist.TCPStore("127.0.0.1", port, None, False, timedelta(seconds=10), False)
    sites.set("gloo/0", b"address of rank 0")
    assert sites.get("gloo/0") == b"address of rank 0"
    assert outsider.list_keys() == ["gloo/0"]  # nothing is hidden from it
    outsider.set("gloo/1", outsider.get("gloo/0"))  # moved: a valid value, under another key
    with pytest.raises(RuntimeError, match="'gloo/1' is not authenticated"):
        sites.get("gloo/1")
    outsider.set("gloo/0", b"x" * 32 + b"address of the outsider")  # forged
    with pytest.raises(RuntimeError, match="'gloo/0' is not authenticated"):
        sites.get("gloo/0")
    assert sites.valid("gloo/0") is None
    del server
