"""The controller's CA and the certificates it issues."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from targetvirt.errors import InvalidArgument
from targetvirt.transport.tls import CertificateAuthority, Credentials, agent_identity


def test_agent_certificates_prove_their_agent_id_and_nothing_else() -> None:
    ca = CertificateAuthority.create()
    assert agent_identity(ca.issue_agent("gw7").cert_pem) == "gw7"
    assert agent_identity(ca.issue_server(["ctl.example", "10.0.0.1"]).cert_pem) is None
    assert agent_identity(ca.ca_pem) is None
    assert agent_identity(b"not a certificate") is None
    with pytest.raises(InvalidArgument):
        ca.issue_agent("")


def test_ca_and_credentials_survive_a_save_with_private_keys(tmp_path: Path) -> None:
    ca = CertificateAuthority.create()
    ca.save(str(tmp_path / "ca"))
    again = CertificateAuthority.load(str(tmp_path / "ca"))
    assert again.ca_pem == ca.ca_pem
    assert os.stat(tmp_path / "ca" / "ca.key").st_mode & 0o777 == 0o600
    creds = again.issue_agent("gw1")
    creds.save(str(tmp_path / "gw1"), "agent")
    assert Credentials.load(str(tmp_path / "gw1"), "agent") == creds
    assert os.stat(tmp_path / "gw1" / "agent.key").st_mode & 0o777 == 0o600
    with pytest.raises(InvalidArgument, match="cannot read"):
        Credentials.load(str(tmp_path / "nowhere"), "agent")
