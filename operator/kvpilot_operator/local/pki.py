"""The local control plane's throwaway PKI: a CA per trust domain, serving and client certificates
for each component, the service-account key pair, and kubeconfigs with the credentials inside."""

from __future__ import annotations

import base64
import datetime
import ipaddress
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec

@dataclass
class CertKey:
    cert_pem: bytes
    key_pem: bytes


@dataclass
class CA:
    name: x509.Name
    key: ec.EllipticCurvePrivateKey
    pair: CertKey


def generate_pki(pki: Path) -> dict[str, Path]:
    """A CA, the apiserver's serving cert, client certs and the service-account key pair, written
    under pki/. Returns the paths by role."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    # Backdated so a little clock skew between the processes cannot make a cert "not yet valid".
    not_before = now - datetime.timedelta(hours=1)
    not_after = now + datetime.timedelta(days=365)

    def key_pem(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> bytes:
        return key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def name(cn: str, org: str | None = None) -> x509.Name:
        attrs = [x509.NameAttribute(NameOID.COMMON_NAME, cn)]
        if org:
            attrs.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, org))
        return x509.Name(attrs)

    def key_usage(*, ca: bool) -> x509.KeyUsage:
        return x509.KeyUsage(
            digital_signature=True,
            content_commitment=False,
            key_encipherment=False,
            data_encipherment=False,
            key_agreement=False,
            key_cert_sign=ca,
            crl_sign=ca,
            encipher_only=False,
            decipher_only=False,
        )

    def make_ca(cn: str) -> CA:
        # P-256 keys: generated in microseconds where RSA takes tens of milliseconds each.
        key = ec.generate_private_key(ec.SECP256R1())
        subject = name(cn)
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(key_usage(ca=True), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .sign(key, hashes.SHA256())
        )
        return CA(
            subject, key, CertKey(cert.public_bytes(serialization.Encoding.PEM), key_pem(key))
        )

    def leaf(
        ca: CA,
        subject: x509.Name,
        *,
        server: bool = False,
        dns: Sequence[str] = (),
        ips: Sequence[str] = (),
    ) -> CertKey:
        key = ec.generate_private_key(ec.SECP256R1())
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(ca.name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(key_usage(ca=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), False
            )
        )
        if dns or ips:
            sans: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
            sans += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        cert = builder.sign(ca.key, hashes.SHA256())
        return CertKey(cert.public_bytes(serialization.Encoding.PEM), key_pem(key))

    ca = make_ca("kvpilot-local-ca")
    # The aggregation layer's own CA, as kubeadm does: a cert from it lets its bearer assert any
    # user through the X-Remote-User headers, so it must not be the general client CA.
    front_proxy_ca = make_ca("kvpilot-local-front-proxy-ca")

    pairs: dict[str, CertKey] = {
        "ca": ca.pair,
        "front-proxy-ca": front_proxy_ca.pair,
        "apiserver": leaf(
            ca,
            name("kube-apiserver"),
            server=True,
            dns=(
                "localhost",
                "kubernetes",
                "kubernetes.default",
                "kubernetes.default.svc",
                "kubernetes.default.svc.cluster.local",
            ),
            # 10.96.0.1: the `kubernetes` Service's ClusterIP, first address of SERVICE_CIDR.
            ips=("127.0.0.1", "10.96.0.1"),
        ),
        "admin": leaf(ca, name("kvpilot-admin", "system:masters")),
        # Admins under their own names, so the audit log tells the operator's and a router's
        # requests apart (`kvpilot bench operator`).
        "operator": leaf(ca, name("kvpilot-operator", "system:masters")),
        "router": leaf(ca, name("kvpilot-router", "system:masters")),
        "controller-manager": leaf(ca, name("system:kube-controller-manager")),
        "scheduler": leaf(ca, name("system:kube-scheduler")),
        # What the apiserver presents to kubelets (logs, exec), for when a node agent exists.
        "apiserver-kubelet-client": leaf(
            ca, name("kube-apiserver-kubelet-client", "system:masters")
        ),
        # What the apiserver presents to aggregated APIs (e.g. a custom-metrics adapter).
        "front-proxy-client": leaf(front_proxy_ca, name("front-proxy-client")),
    }

    # Service-account tokens are RS256-signed: RSA is what every token consumer expects.
    sa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    sa_pub = sa_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )

    pki.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}

    def write(fname: str, data: bytes, private: bool) -> Path:
        p = pki / fname
        p.write_bytes(data)
        p.chmod(0o600 if private else 0o644)
        return p

    for role, ck in pairs.items():
        paths[f"{role}.crt"] = write(f"{role}.crt", ck.cert_pem, private=False)
        paths[f"{role}.key"] = write(f"{role}.key", ck.key_pem, private=True)
    paths["sa.key"] = write("sa.key", key_pem(sa_key), private=True)
    paths["sa.pub"] = write("sa.pub", sa_pub, private=False)
    return paths


def kubeconfig(server: str, ca: Path, cert: Path, key: Path, user: str) -> str:
    """A kubeconfig with the credentials embedded, so it stays usable if copied elsewhere."""

    def b64(p: Path) -> str:
        return base64.b64encode(p.read_bytes()).decode()

    # JSON is valid YAML; no YAML library needed.
    return json.dumps(
        {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "kvpilot-local",
                    "cluster": {"server": server, "certificate-authority-data": b64(ca)},
                }
            ],
            "users": [
                {
                    "name": user,
                    "user": {
                        "client-certificate-data": b64(cert),
                        "client-key-data": b64(key),
                    },
                }
            ],
            "contexts": [
                {"name": "kvpilot-local", "context": {"cluster": "kvpilot-local", "user": user}}
            ],
            "current-context": "kvpilot-local",
            "preferences": {},
        },
        indent=2,
    )
