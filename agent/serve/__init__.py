"""Runtime service: the compat (sek8s-shaped) and chute (/v1) APIs on unix sockets.

Modules, one job each: ``server`` (lifecycle, systemd readiness/watchdog, drain), ``sockets`` and
``systemd_integration`` (socket setup/activation, sd_notify), ``connections`` and ``peer`` (per-connection
caller identity, caps, timeouts), ``middleware`` (per-request log/limits/error shape), ``app_compat`` and
``app_chute`` (routes), ``collector`` (evidence building blocks), ``rint`` and ``symkey`` (pure protocol
logic), ``ratelimit``, ``service_cert``, ``errors``.
"""
