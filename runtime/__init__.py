"""The bundled serving engine (continuous batching, paged KV cache, tensor parallelism).

Not built yet: the harness in `bench/` measures external servers and its reference server
until the engine lands (docs/architecture.md).
"""
