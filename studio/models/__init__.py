"""Base models: resolution, loading, tokenizer, single-file checkpoints."""

from studio.models.loading import DEFAULT_MODEL, embedded_model_dir, load_pipeline, resolve_model


__all__ = ["DEFAULT_MODEL", "embedded_model_dir", "load_pipeline", "resolve_model"]
