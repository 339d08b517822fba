"""The `[gateway]` policy and what the gateway derives from it before it starts: the egress allowlist (exactly the
engine hosts), the engines' key files (opened as regular files only), refusals that name the field."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from sealbox.runtime.gateway.engine_hosts import EngineHostError, read_api_key
from sealbox.runtime.gateway.startup import engine_egress
from sealbox.runtime.policy import Policy, PolicyError

ENGINE = '[[gateway.engines]]\nname = "{name}"\nurl = "{url}"\n'


def _policy(*engines: tuple[str, str], extra: str = "") -> Policy:
    text = extra + "".join(ENGINE.format(name=name, url=url) for name, url in engines)
    return Policy.from_toml(text)


def test_the_gateways_egress_allows_exactly_the_engine_hosts_on_top_of_the_policy() -> None:
    policy = _policy(("a", "https://10.200.1.2:8443"), ("b", "https://[fd00::2]:8443"),
                     extra="[egress]\nallow_ports = [9000]\n")  # fmt: skip
    egress = engine_egress(policy.egress, policy.gateway)
    assert egress.allow == ("127.0.0.0/8", "::1/128") and egress.allow_ports == (9000,)
    assert egress.peers == ("10.200.1.2:8443", "[fd00::2]:8443")  # each engine on its own port, nothing else of it


def test_an_engine_named_by_hostname_is_refused_before_start() -> None:
    policy = _policy(("a", "https://gpu-1.local:8443"))
    with pytest.raises(PolicyError, match="gateway.engines.a.url"):
        engine_egress(policy.egress, policy.gateway)


@pytest.mark.parametrize(("engines", "field"), [
    ((("a", "http://10.200.1.2:8443"),), "gateway.engines.0.url"),  # plain HTTP between hosts
    ((("a", "https://10.200.1.2:8443"), ("a", "https://10.200.2.2:8443")), "gateway"),  # one name twice
    ((("a b", "https://10.200.1.2:8443"),), "gateway.engines.0.name"),
])  # fmt: skip
def test_a_gateway_policy_that_breaks_a_rule_is_refused_naming_the_field(engines: tuple[tuple[str, str], ...],
                                                                         field: str) -> None:  # fmt: skip
    with pytest.raises(PolicyError, match=field):
        _policy(*engines)


def test_a_pinned_fingerprint_must_be_a_sha256() -> None:
    with pytest.raises(PolicyError, match="fingerprint"):
        Policy.from_toml(ENGINE.format(name="a", url="https://10.200.1.2:8443") + 'fingerprint = "md5:abc"\n')


def test_mutual_tls_on_an_engine_needs_its_own_certificate() -> None:
    with pytest.raises(PolicyError, match="tls_client_ca"):
        Policy.from_toml('[server]\ntls_client_ca = "/etc/sealbox/gateway-ca.crt"\n')


def test_the_engine_key_file_is_read_only_when_it_is_a_regular_file(tmp_path: Path) -> None:
    key = tmp_path / "e1.key"
    key.write_text("sk-sealbox-abc\n")
    assert read_api_key(str(key)) == "sk-sealbox-abc"
    link = tmp_path / "link.key"
    link.symlink_to(key)
    with pytest.raises(EngineHostError, match="cannot open"):
        read_api_key(str(link))
    fifo = tmp_path / "fifo.key"
    os.mkfifo(fifo)
    with pytest.raises(EngineHostError, match="not a regular file"):  # and no hang waiting for a writer
        read_api_key(str(fifo))
    empty = tmp_path / "empty.key"
    empty.write_text("\n")
    with pytest.raises(EngineHostError, match="holds no key"):
        read_api_key(str(empty))
