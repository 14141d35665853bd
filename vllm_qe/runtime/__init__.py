"""The vLLM side of vllm-qe (imports vllm; loaded through the `vllm.general_plugins` entry point)."""
