from transformers import AutoModelForCausalLM, AutoTokenizer

from sa2va_rl.models.tiny import WORDS


def test_tiny_causal_round_trip(tiny_causal):
    """AutoTokenizer rebuilds a Qwen2 checkpoint's tokenizer as Qwen2Tokenizer (byte-level BPE); ours must
    survive that: words stay words and text decodes with its spaces (rewards read the decoded text)."""
    tok = AutoTokenizer.from_pretrained(tiny_causal)
    text = "copy : red square left"
    ids = tok(text).input_ids
    assert tok.decode(ids) == text and len(ids) == 5
    assert all(len(tok(w).input_ids) == 1 for w in WORDS)
    assert (tok.pad_token_id, tok.eos_token_id) == (0, 2)
    model = AutoModelForCausalLM.from_pretrained(tiny_causal)
    assert model.config.vocab_size == len(tok)
    assert 50_000 < sum(p.numel() for p in model.parameters()) < 500_000
