"""Helpers shared by the tests that run real megatron-core models (CPU shims, model suites)."""
