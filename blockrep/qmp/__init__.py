"""QMP: the wire protocol (server), the command table, and the commands by domain."""
