"""One module a sweep; the module name is the sweep's name and it defines SWEEP (a SweepSpec)."""
