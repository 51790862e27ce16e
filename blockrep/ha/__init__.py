"""The HA manager (``blockrep primary|secondary``), one concern per module.

config (typed options) · role (what both roles share: daemon, state file, status) ·
primary · secondary · pairing (hello verdicts, sync plan, disk checks) · resync (region
copy with progress) · watchdog (heartbeat, failover timeout, fence) · metrics
(Prometheus) · qmp (the HA QMP commands) · channel (the P↔S control channel) ·
state (generation history).
"""
