"""qcow2 format internals: codec, refcounts and allocator, consistency check."""
