from sa2va_rl.models.policy import CausalLMPolicy, Generation, Policy

__all__ = ["CausalLMPolicy", "Generation", "Policy"]
