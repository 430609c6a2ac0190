"""The bundled serving engine: continuous batching over a paged KV cache, tensor parallelism,
and an OpenAI-compatible server (`python -m runtime serve`); see docs/architecture.md."""
