"""Pure science kernels over arrays: no I/O, no database, no global state."""
