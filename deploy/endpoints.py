"""Where to send queries: the proxy's address, and each ingress replica's own HTTP address when
Serve runs with direct ingress.

Direct ingress (``RAY_SERVE_ENABLE_DIRECT_INGRESS=1`` in the environment of ``ray start``, or of
the process that starts Ray) makes every ingress replica listen on a port of its own, taken
from ``RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT`` .. ``MAX`` (30000-31000 by default), on the
``http_options.host`` address. A request sent there skips Serve's proxy and its few
milliseconds per request (``bench/serve.py`` measures both ways). The proxy keeps answering on
``http_options.port`` on the head node.
A front load balancer, or a client, finds the replica ports here or in the ``target_groups``
of the dashboard's ``GET /api/serve/applications/``::

    python -m deploy.endpoints --address 127.0.0.1:6379 --app duch
"""

from __future__ import annotations

import argparse
import sys
import time

DIRECT_INGRESS_ENV = "RAY_SERVE_ENABLE_DIRECT_INGRESS"


def ingress_urls(app_name: str, timeout_s: float = 60.0) -> list[str]:
    """``http://host:port`` of every running ingress replica of ``app_name`` (direct ingress).

    Needs a connected Ray driver with Serve running. Waits up to ``timeout_s`` for the replicas
    to publish their ports.

    Raises:
        RuntimeError: direct ingress is off, or no replica published a port in time.
    """
    import ray
    from ray.serve.context import _get_global_client

    client = _get_global_client()  # raises RayServeException when Serve is not running
    if client is None:
        raise RuntimeError("Ray Serve is not running on this cluster")
    controller = client._controller
    deadline = time.monotonic() + timeout_s
    while True:
        urls: list[str] = []
        for group in ray.get(controller.get_target_groups.remote(app_name)):
            if str(getattr(group.protocol, "value", group.protocol)).upper() != "HTTP":
                continue
            if group.app_name != app_name:  # the proxies' own group: direct ingress is off
                continue
            # with no replica running, an application's group lists the proxies instead
            urls.extend(
                f"http://{t.ip}:{t.port}" for t in group.targets if "PROXY" not in t.name.upper()
            )
        if urls:
            return sorted(set(urls))
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"no ingress replica of application {app_name!r} published an HTTP port within "
                f"{timeout_s:.0f} s; is Ray running with {DIRECT_INGRESS_ENV}=1?"
            )
        time.sleep(0.25)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m deploy.endpoints", description=__doc__)
    p.add_argument("--address", default="auto", help="Ray cluster address (default: auto)")
    p.add_argument("--app", default="duch", help="Serve application name (default: duch)")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the ports")
    a = p.parse_args(argv)

    import ray

    ray.init(address=a.address, log_to_driver=False, configure_logging=False)
    try:
        for url in ingress_urls(a.app, a.timeout):
            print(url)
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
