"""SeaweedFS's own APIs behind S3 take only weed's own components (deploy.parts.weed_security).

The master, volume server and filer HTTP APIs are HTTPS with client certificates of the stack's CA; the filer
also wants a JWT; every gRPC port is mutual TLS. S3 with the stack's keys and presigned URLs works as before.
"""

from __future__ import annotations

import io
import socket
import ssl
import stat
import subprocess
import urllib.error
import urllib.request
from datetime import timedelta
from pathlib import Path

import pytest

from deploy import parts as p

pytestmark = pytest.mark.integration


def _get(url: str, ctx: ssl.SSLContext | None = None) -> int | str:
    try:
        with urllib.request.urlopen(url, timeout=5, context=ctx) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return exc.code
    except (OSError, ssl.SSLError) as exc:
        return repr(exc)


def _no_cert() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    return ctx


def test_security_files_are_private(parts: p.RunningParts) -> None:
    data = parts.cfg.state_dir / "s3"
    files = [data / "security.toml", *(data / "security").iterdir()]
    assert not (data / "security" / "ca.key").exists()  # nobody can mint another certificate
    for f in files:
        st = f.stat()
        assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == (data / "security").stat().st_uid, f
    assert stat.S_IMODE((data / "security").stat().st_mode) == 0o700
    text = (data / "security.toml").read_text()
    for section in ("[jwt.signing]", "[jwt.signing.read]", "[jwt.filer_signing]", "[jwt.filer_signing.read]",
                    "[grpc]", "[https.master]", "[https.volume]", "[https.filer]", "[https.client]"):
        assert section in text


def test_s3_and_presigned_urls_still_work(parts: p.RunningParts) -> None:
    client = p.s3_client(parts.cfg)
    client.put_object("kiln", "sec/a.bin", io.BytesIO(b"abc"), 3)
    get = client.presigned_get_object("kiln", "sec/a.bin", expires=timedelta(minutes=1))
    with urllib.request.urlopen(get, timeout=5) as resp:
        assert resp.read() == b"abc"
    put = client.presigned_put_object("kiln", "sec/b.bin", expires=timedelta(minutes=1))
    with urllib.request.urlopen(urllib.request.Request(put, data=b"xyz", method="PUT"), timeout=5) as resp:
        assert resp.status == 200
    assert client.get_object("kiln", "sec/b.bin").read() == b"xyz"
    assert {o.object_name for o in client.list_objects("kiln", "sec/")} == {"sec/a.bin", "sec/b.bin"}


def test_weed_http_apis_need_the_stacks_client_certificate(parts: p.RunningParts) -> None:
    cfg, ports = parts.cfg, p.weed_ports(parts.cfg)
    client = p.s3_client(cfg)
    client.put_object("kiln-extra", "sec/keep.bin", io.BytesIO(b"keep"), 4)
    base = {name: f"{cfg.host}:{ports[f'{name}.port']}" for name in ("master", "volume", "filer")}
    paths = {"master": ["/dir/status", "/dir/assign", "/col/delete?collection=kiln-extra"],
             "volume": ["/status", "/1,01"], "filer": ["/buckets/kiln-extra/sec/keep.bin", "/buckets/kiln-extra/"]}
    for name, ps in paths.items():
        for path in ps:
            # Plain HTTP: "Client sent an HTTP request to an HTTPS server".
            assert _get(f"http://{base[name]}{path}") == 400, (name, path)
            # HTTPS without a client certificate: the handshake fails.
            got = _get(f"https://{base[name]}{path}", _no_cert())
            assert isinstance(got, str) and "CERTIFICATE_REQUIRED" in got, (name, path, got)
    # With the stack's client certificate the master answers; the filer still wants its JWT.
    tls = p.weed_client_tls(cfg.state_dir / "s3")
    assert _get(f"https://{base['master']}/dir/status", tls) == 200
    assert _get(f"https://{base['filer']}/buckets/kiln-extra/sec/keep.bin", tls) == 401
    assert client.get_object("kiln-extra", "sec/keep.bin").read() == b"keep"


def test_weed_grpc_is_mutual_tls(parts: p.RunningParts, tmp_path: Path) -> None:
    cfg, ports = parts.cfg, p.weed_ports(parts.cfg)
    grpc_ports = [port for flag, port in ports.items() if flag.endswith(".grpc")]
    assert len(grpc_ports) == 5
    for port in grpc_ports:
        ctx = _no_cert()
        ctx.set_alpn_protocols(["h2"])
        with (pytest.raises(ssl.SSLError, match="CERTIFICATE_REQUIRED"),
              ctx.wrap_socket(socket.create_connection((cfg.host, port), timeout=5)) as sock):
            sock.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
            sock.recv(64)
    # weed's own client: with the stack's security.toml (its working dir) it gets in, without it it does not.
    argv = [p._venv_binary("weed"), "shell",
            f"-master={cfg.host}:{ports['master.port']}.{ports['master.port.grpc']}",
            f"-filer={cfg.host}:{ports['filer.port']}.{ports['filer.port.grpc']}"]
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    ok = subprocess.run(argv, input="fs.ls /buckets\n", capture_output=True, text=True, timeout=30,
                        cwd=cfg.state_dir / "s3", env=env)
    assert "kiln-extra" in ok.stdout, (ok.stdout, ok.stderr)
    try:
        bad = subprocess.run(argv, input="fs.ls /buckets\n", capture_output=True, text=True, timeout=10,
                             cwd=tmp_path, env=env)
    except subprocess.TimeoutExpired:
        pass  # it keeps retrying the handshake
    else:
        assert "kiln-extra" not in bad.stdout, bad.stdout
