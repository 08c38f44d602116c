"""Shared references and helpers for metalcore's tests and benchmarks."""
