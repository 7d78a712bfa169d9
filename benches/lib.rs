//! Shared helpers for the kernel benchmarks.
