"""A stand-in identity provider: RSA keys made by the test, a JWKS served on loopback.

The JWKS server is a ``ThreadingHTTPServer`` on 127.0.0.1 (never all interfaces); the test
can publish and withdraw keys, make it answer 503, slow it down, or stop it outright, and
it counts the fetches it served.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

ISSUER = "https://id.example.test/"
AUDIENCE = "purchase-credits"


@dataclass
class SigningKey:
    kid: str
    private: rsa.RSAPrivateKey

    @classmethod
    def new(cls, kid: str | None = None, bits: int = 2048) -> SigningKey:
        key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
        return cls(kid or f"key-{uuid.uuid4().hex[:8]}", key)

    def jwk(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(RSAAlgorithm.to_jwk(self.private.public_key()))
        return {**data, "kid": self.kid, "use": "sig", "alg": "RS256"}

    def public_pem(self) -> bytes:
        return self.private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def sign(
        self,
        *,
        account_id: str = "acct-idp",
        user_id: str = "idp-admin",
        roles: tuple[str, ...] = ("ADMIN",),
        audience: str | None = AUDIENCE,
        issuer: str | None = ISSUER,
        ttl: int = 600,
        algorithm: str = "RS256",
        kid: str | None = None,
        **extra: Any,
    ) -> str:
        now = int(time.time())
        claims: dict[str, Any] = {
            "sub": user_id,
            "account_id": account_id,
            "roles": list(roles),
            "iat": now,
            "exp": now + ttl,
            **extra,
        }
        if audience is not None:
            claims["aud"] = audience
        if issuer is not None:
            claims["iss"] = issuer
        return jwt.encode(
            claims, self.private, algorithm=algorithm, headers={"kid": kid or self.kid}
        )


@dataclass
class JwksServer:
    url: str
    keys: list[SigningKey] = field(default_factory=list)
    status: int = 200  # 503: an outage that still answers
    delay: float = 0.0  # seconds before answering
    hits: int = 0
    _server: ThreadingHTTPServer | None = None

    def publish(self, *keys: SigningKey) -> None:
        self.keys = list(keys)

    def stop(self) -> None:
        """Take the server down: connections are refused from now on."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


@contextmanager
def run_jwks(*keys: SigningKey) -> Iterator[JwksServer]:
    state = JwksServer(url="")

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            state.hits += 1
            if state.delay:
                time.sleep(state.delay)
            body = json.dumps({"keys": [k.jwk() for k in state.keys]}).encode()
            if state.status != 200:
                body = b'{"error": "unavailable"}'
            self.send_response(state.status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name="jwks", daemon=True)
    thread.start()
    state._server = server
    # A fresh path per server: the service keeps one key store per JWKS URL.
    port = server.server_address[1]
    state.url = f"http://127.0.0.1:{port}/{uuid.uuid4().hex[:8]}/.well-known/jwks.json"
    state.publish(*keys)
    try:
        yield state
    finally:
        state.stop()
        thread.join(timeout=5)
