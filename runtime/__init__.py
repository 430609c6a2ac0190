"""The bundled serving engine: continuous batching over a paged KV cache.

Runs on CPU today (docs/architecture.md, "The engine"); its OpenAI-compatible server,
`target=bundled` in the harness, tensor parallelism and GPU kernels come next.
"""
