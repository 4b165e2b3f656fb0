"""Test harness: tiny random-weight model factory and a real vLLM server launcher.

Import the submodules directly (``moe_reuse.plugin.harness.tiny_models``,
``moe_reuse.plugin.harness.server``); nothing is imported here, so importing the package is free.
"""
