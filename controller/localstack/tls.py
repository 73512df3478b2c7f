"""TLS for the local stack: a throwaway certificate authority and certificates made with the
`openssl` command (tests, the demo, benchmarks), and the edge's TLS config file rendered from
kamailio/tls.cfg with their paths."""
from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

OPENSSL_BIN = shutil.which("openssl") or "/usr/bin/openssl"
TLS_CFG = Path(__file__).resolve().parents[2] / "kamailio" / "tls.cfg"
# what kamailio/tls.cfg names, and what the local stack puts there instead
CFG_PATHS = {"/etc/callfabric/tls/edge.crt": "cert", "/etc/callfabric/tls/edge.key": "key",
             "/etc/ssl/certs/ca-certificates.crt": "ca"}


def _openssl(*args: str, cwd: Path) -> None:
    out = subprocess.run([OPENSSL_BIN, *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        raise RuntimeError(f"openssl {args[0]} failed: {out.stderr.strip()[-500:]}")


@dataclass(frozen=True)
class LocalCa:
    """A certificate authority of the local stack; `issue` makes certificates it signs."""

    directory: Path
    cert: Path
    key: Path

    @classmethod
    def create(cls, directory: Path | str, name: str = "callfabric test CA") -> "LocalCa":
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        cert, key = directory / "ca.crt", directory / "ca.key"
        _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "2",
                 "-subj", f"/CN={name}", "-keyout", str(key), "-out", str(cert),
                 "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign",
                 cwd=directory)
        return cls(directory, cert, key)

    def issue(self, name: str, hosts: tuple[str, ...] = ("127.0.0.1", "localhost")) -> tuple[Path, Path]:
        """A server certificate for `hosts` (IP addresses and DNS names): (cert, key) paths."""
        cert, key, csr = (self.directory / f"{name}.{ext}" for ext in ("crt", "key", "csr"))
        alt = ",".join(f"IP:{h}" if h.replace(".", "").isdigit() or ":" in h else f"DNS:{h}" for h in hosts)
        ext = self.directory / f"{name}.ext"
        ext.write_text(f"subjectAltName={alt}\nextendedKeyUsage=serverAuth,clientAuth\n")
        _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-subj", f"/CN={hosts[0]}",
                 "-keyout", str(key), "-out", str(csr), cwd=self.directory)
        _openssl("x509", "-req", "-in", str(csr), "-CA", str(self.cert), "-CAkey", str(self.key),
                 "-CAcreateserial", "-days", "2", "-extfile", str(ext), "-out", str(cert), cwd=self.directory)
        return cert, key


def render_tls_cfg(target: Path | str, cert: Path, key: Path, ca: Path) -> Path:
    """kamailio/tls.cfg with the local stack's files in place of the deployment paths."""
    text = TLS_CFG.read_text()
    files = {"cert": cert, "key": key, "ca": ca}
    for deployed, which in CFG_PATHS.items():
        if deployed not in text:
            raise RuntimeError(f"kamailio/tls.cfg no longer names {deployed}")
        text = text.replace(deployed, str(Path(files[which]).resolve()))
    target = Path(target)
    target.write_text(text)
    return target
