"""sa2va-rl: numerically guarded GRPO fine-tuning for Sa2VA (and any Hugging Face causal LM)."""

__version__ = "0.1.0"
