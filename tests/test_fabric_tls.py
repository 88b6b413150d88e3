"""TLS on both commands: a self-signed certificate for IP 127.0.0.1 made with `openssl`."""

from __future__ import annotations

import json
import shutil
import subprocess
import urllib.request
from pathlib import Path

import grpc
import pytest

from edgecluster.net.grpc_util import TlsFiles, open_channel
from edgecluster.net.pb import edgecluster_pb2 as pb
from edgecluster.net.pb import edgecluster_pb2_grpc as pb_grpc
from tests.procs import ProcessPool, procs, unique_name, wait_until  # noqa: F401  (fixture)
from tests.tiny_llama import make_tiny_llama

pytestmark = pytest.mark.skipif(
    shutil.which("openssl") is None, reason="the openssl command is needed to make a certificate"
)


def _self_signed(directory: Path, stem: str) -> tuple[Path, Path]:
    """(cert, key) for IP 127.0.0.1; a TLS client dialing an IP checks the IP SAN."""
    cert, key = directory / f"{stem}.pem", directory / f"{stem}.key"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-nodes", "-days", "2", "-subj", "/CN=127.0.0.1",
            "-addext", "subjectAltName=IP:127.0.0.1",
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-keyout", str(key), "-out", str(cert),
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return cert, key


def test_agent_and_coordinator_talk_over_tls(procs: ProcessPool, tmp_path: Path) -> None:  # noqa: F811
    cert, key = _self_signed(tmp_path, "cluster")
    tls_args = ["--tls-cert", str(cert), "--tls-key", str(key), "--tls-ca", str(cert)]
    coord = procs.coordinator(*tls_args)
    name = unique_name("tls")
    procs.agent(coord.grpc_address, *tls_args, name=name)
    member = coord.wait_member(name, "alive", timeout_s=20)

    status = procs.status(coord, "--json", "--tls-ca", str(cert))
    assert status.returncode == 0, status.stderr
    assert [a["id"] for a in json.loads(status.stdout)["agents"]] == [member["id"]]

    # Plain text gets nowhere: the coordinator speaks only TLS.
    plain = procs.status(coord, "--json")
    assert plain.returncode != 0 and "UNAVAILABLE" in plain.stderr
    # A CA that did not sign the coordinator's certificate is not trusted.
    other_cert, _ = _self_signed(tmp_path, "other")
    untrusted = procs.status(coord, "--json", "--tls-ca", str(other_cert))
    assert untrusted.returncode != 0 and "UNAVAILABLE" in untrusted.stderr

    # The agent serves TLS too, with the token still required inside it.
    tls = TlsFiles(ca=cert)
    with open_channel(member["address"], coord.token, tls) as channel:
        assert pb_grpc.AgentStub(channel).Status(pb.Empty(), timeout=5).node_id == member["id"]
    with (
        open_channel(member["address"], "wrong", tls) as channel,
        pytest.raises(grpc.RpcError) as err,
    ):
        pb_grpc.AgentStub(channel).Status(pb.Empty(), timeout=5)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with open_channel(member["address"], coord.token) as channel, pytest.raises(grpc.RpcError):
        pb_grpc.AgentStub(channel).Status(pb.Empty(), timeout=5)


def test_tls_needs_both_cert_and_key(procs: ProcessPool, tmp_path: Path) -> None:  # noqa: F811
    cert, _ = _self_signed(tmp_path, "half")
    result = procs.cli(
        "edge-agent", "join", "127.0.0.1:1", "--token", "t", "--tls-cert", str(cert), "--no-mdns"
    )
    assert result.returncode == 2
    assert "TLS needs both --tls-cert and --tls-key" in result.stderr
    missing = procs.cli(
        "edge-agent", "join", "127.0.0.1:1", "--token", "t", "--tls-ca", str(tmp_path / "nope.pem")
    )
    assert missing.returncode == 2 and "does not exist" in missing.stderr


def _health(coord_url: str) -> int:
    try:
        with urllib.request.urlopen(coord_url + "/health", timeout=3) as resp:
            return int(resp.status)
    except OSError:
        return 0


def test_a_tls_cluster_seals_its_data_channel(procs: ProcessPool, tmp_path: Path) -> None:  # noqa: F811
    """With --tls-*, the session's data-channel frames are sealed (AEAD), and serve; the
    coordinator's --local agents get its TLS files."""
    cert, key = _self_signed(tmp_path, "cluster")
    tls_args = ["--tls-cert", str(cert), "--tls-key", str(key), "--tls-ca", str(cert)]
    model = make_tiny_llama(tmp_path / "tiny", max_positions=256)
    coord = procs.coordinator("--model", str(model), "--local", "2", *tls_args)
    wait_until(lambda: _health(coord.url) == 200, 120, f"serving\n{coord.describe()}")
    body = {"model": str(model), "prompt": [5, 6, 7], "max_tokens": 6, "temperature": 0}
    request = urllib.request.Request(
        coord.url + "/v1/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=60) as resp:
        assert resp.status == 200 and json.loads(resp.read())["usage"]["completion_tokens"] == 6
    for i in range(2):
        log = (procs.root / "cache" / "local-agents" / f"local-{i}.log").read_text()
        assert "frames sealed (AEAD)" in log, log[-3000:]
    assert "frames sealed (AEAD)" in coord.stderr()
