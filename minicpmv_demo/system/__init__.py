"""The machine's resources: GPU and process memory, the monitor's history, ZeroGPU's lent GPU,
and the byte-bounded caches. Imports nothing here: `zerogpu` must load before torch does."""
