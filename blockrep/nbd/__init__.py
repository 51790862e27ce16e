"""The NBD protocol: codec (proto), server, and the client used by the ``nbd`` driver."""
