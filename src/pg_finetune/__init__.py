"""pg-finetune: fine-tune PaliGemma and PaliGemma 2 with the Hugging Face stack."""

import logging

__version__ = "0.1.0"

# bitsandbytes (imported by peft when installed) warns on every CPU start that it cannot fetch an
# optional kernel from the Hub; its pure-PyTorch 4-bit path works, so the message is only noise here.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
