"""Reaching RabbitMQ, the same way for the daemon and for every tool.

One place builds pika's parameters for a broker URL (heartbeat, TLS verified against the
given CAs and the URL's host name, a client certificate, SASL EXTERNAL) and one place
decides what a failed connection means: a broker that cannot be reached is worth another
attempt or the next URL; refused credentials, denied access and a certificate that does not
verify are not, and end with one line for the operator, without passwords. The daemon
(`virtpub.amqp.broker`, on its I/O thread) and the tools' blocking session (`virtpub.amqp.session`)
both take their parameters and their verdicts from here.
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Protocol
from urllib.parse import parse_qs, urlsplit

import pika
import pika.credentials
import pika.exceptions

DEFAULT_HEARTBEAT_S = 15
# A nested error deeper than this is not looked into: pika's wrappers go two or three deep.
_MAX_NESTED_ERRORS = 20


class BrokerError(Exception):
    """The broker cannot be used; one line for the operator, without passwords."""


class BrokerFatalError(BrokerError):
    """Retrying cannot help (credentials, permissions, certificates, conflicting topology)."""


class BrokerUnavailableError(BrokerError):
    """The broker could not be reached or dropped the connection; another attempt, or another
    URL of the same cluster, may do better."""


class TlsFiles(Protocol):
    """Where the TLS files are; both the daemon's `Settings` and the tools' `BrokerSettings`."""

    @property
    def amqp_ca_file(self) -> Path | None: ...

    @property
    def amqp_cert_file(self) -> Path | None: ...

    @property
    def amqp_key_file(self) -> Path | None: ...


_REFUSED_LOGIN = (
    pika.exceptions.ProbableAuthenticationError,
    pika.exceptions.AuthenticationError,
)


def connection_parameters(url: str, connection_name: str, tls: TlsFiles) -> pika.URLParameters:
    """pika's parameters for one broker URL, with TLS for amqps:// (host name verified).

    A client certificate logs in by SASL EXTERNAL when the URL holds no password: the
    broker takes the user from the certificate.
    """
    params = pika.URLParameters(url)
    parts = urlsplit(url)
    if "heartbeat" not in parse_qs(parts.query):
        params.heartbeat = DEFAULT_HEARTBEAT_S
    params.connection_attempts = 1
    params.client_properties = {"connection_name": connection_name}
    if parts.scheme == "amqps":
        params.ssl_options = pika.SSLOptions(_tls_context(tls), parts.hostname)
        client_certificate = tls.amqp_cert_file is not None and tls.amqp_key_file is not None
        if client_certificate and parts.password is None:
            params.credentials = pika.credentials.ExternalCredentials()
    return params


def _tls_context(tls: TlsFiles) -> ssl.SSLContext:
    """Verifies the broker by the CA file (else the system's CAs) and its host name.

    Raises BrokerFatalError for files that hold no certificate or a key that does not
    match: no attempt can succeed with them.
    """
    try:
        context = ssl.create_default_context(
            cafile=str(tls.amqp_ca_file) if tls.amqp_ca_file else None
        )
        if tls.amqp_cert_file is not None and tls.amqp_key_file is not None:
            context.load_cert_chain(tls.amqp_cert_file, tls.amqp_key_file)
    except (ssl.SSLError, OSError) as err:
        raise BrokerFatalError(
            f"cannot use the TLS files (--amqp-ca-file, --amqp-cert-file, --amqp-key-file):"
            f" {one_line(err)}"
        ) from None
    return context


def open_error(err: BaseException, where: str) -> BrokerFatalError | BrokerUnavailableError:
    """What a failure to open a connection to `where` (a URL without password) means."""
    certificate = _certificate_error(err)
    if certificate is not None:
        said = certificate.verify_message or one_line(certificate)
        return BrokerFatalError(
            f"the broker at {where} failed TLS verification: {said}"
            " (check --amqp-ca-file and the host name in --amqp-url)"
        )
    if isinstance(err, _REFUSED_LOGIN):
        return BrokerFatalError(
            f"the broker at {where} refused the login: {one_line(err)} (it refused the"
            " credentials: check the user and password in --amqp-url, or, with no password,"
            " the client certificate)"
        )
    if isinstance(err, pika.exceptions.ProbableAccessDeniedError):
        return BrokerFatalError(
            f"the broker at {where} denied access: {one_line(err)}"
            " (check the vhost in --amqp-url and the user's permissions on it)"
        )
    return BrokerUnavailableError(f"cannot reach the broker at {where}: {one_line(err)}")


def _certificate_error(err: BaseException) -> ssl.SSLCertVerificationError | None:
    """A certificate that does not verify never will. pika wraps the handshake's error in
    its connection workflow's errors (`exceptions`, `exception`), so look inside them."""
    pending, seen = [err], 0
    while pending and seen < _MAX_NESTED_ERRORS:
        current = pending.pop()
        seen += 1
        if isinstance(current, ssl.SSLCertVerificationError):
            return current
        nested = [*getattr(current, "args", ()), *(getattr(current, "exceptions", None) or ()),
                  getattr(current, "exception", None), current.__cause__]  # fmt: skip
        pending.extend(e for e in nested if isinstance(e, BaseException))
    return None


def one_line(err: BaseException) -> str:
    """The error on one line; pika's connection errors often say nothing themselves, only
    the error they wrap does."""
    text = str(err) or " ".join(str(arg) or repr(arg) for arg in err.args)
    return " ".join(text.split()) or type(err).__name__
