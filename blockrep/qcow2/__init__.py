"""qcow2: the codec (format, refcount, cluster, check) and the driver on top of it
(driver, create, make_empty), after QEMU's block/qcow2*.c."""
