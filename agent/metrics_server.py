"""The daemon's Prometheus endpoint: `metrics.listen` in the config, off by default.

Rules:
- One server for the life of the process, started before the model loads: a port that
  cannot be bound (in use, not permitted, an address this host does not have) is a
  configuration error at start, one line, exit 2.  A reload keeps it as it is; a change
  of `metrics:` takes effect at the next start.
- A bare port binds loopback.  The endpoint has no authentication and no TLS: bind it
  to an address only the scraper can reach.
- prometheus_client's own server (one thread per scrape, any path answers, the format
  negotiated from the Accept header: text 0.0.4 by default, OpenMetrics for a
  Prometheus that asks for it).  What it serves is agent/prom.py's.
"""
from __future__ import annotations

import logging
import re
from typing import Annotated, Union

import msgspec

from .config_base import ConfigError, KeyProblem, Strict

log = logging.getLogger("tsad.metrics")

_LISTEN = re.compile(r"^(?:(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.\-]+):)?(?P<port>[0-9]{1,5})$")
_LISTEN_WANTED = "host:port (e.g. 127.0.0.1:9108), or a port 1-65535 alone for loopback"


class MetricsConfig(Strict):
    # "host:port", or a port alone for 127.0.0.1:port; null: no endpoint
    # (held as "host:port" once built)
    listen: Annotated[Union[int, str, None], msgspec.Meta(description=_LISTEN_WANTED)] = None

    def __post_init__(self):
        if self.listen is None:
            return
        m = _LISTEN.match(str(self.listen).strip())
        if not m or not 0 < int(m["port"]) < 65536:
            raise KeyProblem("listen", f"expected {_LISTEN_WANTED}")
        host_port = f"{m['host'] or '127.0.0.1'}:{int(m['port'])}"
        msgspec.structs.force_setattr(self, "listen", host_port)

    @property
    def address(self) -> tuple[str, int]:
        """(host, port) to bind; an IPv6 literal without its brackets."""
        host, _, port = self.listen.rpartition(":")
        return host.strip("[]"), int(port)


class MetricsServer:
    def __init__(self, cfg: MetricsConfig, collector) -> None:
        """Bind and serve `collector`'s families and the standard process ones; a
        ConfigError when the address cannot be bound."""
        # here, not at the top: config.py imports this module for MetricsConfig, and
        # the library is needed only when the endpoint is on
        from prometheus_client import start_http_server

        from .prom import standard_registry
        host, port = cfg.address
        try:
            self._server, self._thread = start_http_server(port, host,
                                                           standard_registry(collector))
        except OSError as e:        # socket.gaierror (an unknown host name) included
            raise ConfigError([f"metrics.listen: cannot listen on {cfg.listen}: "
                               f"{e.strerror or e}"]) from None
        log.info("Prometheus metrics on http://%s/metrics", cfg.listen)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)
