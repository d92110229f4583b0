"""pg-finetune: fine-tune PaliGemma and PaliGemma 2 with the Hugging Face stack."""

__version__ = "0.1.0"
