"""The overview dashboard's rows, one module each: one function per panel, named after it."""
