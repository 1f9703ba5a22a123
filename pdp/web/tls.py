"""The check API's TLS: a server context from the configured PEM files, or None for HTTP.

With `PDP_TLS_CLIENT_CA_FILE` every client must present a certificate signed by one of
those CAs (mutual TLS: the handshake fails otherwise). TLS 1.2 is the floor.
"""

from __future__ import annotations

import ssl

from pdp.config import Settings
from pdp.errors import ConfigError


def server_context(settings: Settings) -> ssl.SSLContext | None:
    """The SSLContext for the listener; ConfigError naming the files when they do not load."""
    if settings.tls_cert_file is None or settings.tls_key_file is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(settings.tls_cert_file, settings.tls_key_file)
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(
            f"PDP_TLS_CERT_FILE / PDP_TLS_KEY_FILE: cannot load the certificate and key: {exc}"
        ) from None
    if settings.tls_client_ca_file is not None:
        try:
            context.load_verify_locations(cafile=settings.tls_client_ca_file)
        except (ssl.SSLError, OSError) as exc:
            raise ConfigError(f"PDP_TLS_CLIENT_CA_FILE: cannot load the CAs: {exc}") from None
        context.verify_mode = ssl.CERT_REQUIRED
    return context
