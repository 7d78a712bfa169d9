//! Qwen3 model (in progress).
