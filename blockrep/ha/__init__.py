"""The HA manager: roles, control channel, generation state, heartbeat and failover policy."""
