import numpy as np
import pytest
import torch
from transformers import AutoModel, AutoTokenizer, GenerationConfig

from sa2va_rl.models.policy import new_tokens
from sa2va_rl.models.sa2va_inputs import IMG_CONTEXT, IMG_END, IMG_START, VP_END, VP_START
from sa2va_rl.models.tiny_sa2va import TinySa2VAModel, make_tiny_sa2va


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = make_tiny_sa2va(str(tmp_path_factory.mktemp("tiny_sa2va")))
    model = AutoModel.from_pretrained(path).eval()  # no trust_remote_code: registered model_type
    tok = AutoTokenizer.from_pretrained(path)
    model.preparing_for_generation(tok)
    return path, model, tok


def image_prompt(tok, n, extra=""):
    return torch.tensor([tok(IMG_START + IMG_CONTEXT * n + IMG_END + extra + " describe").input_ids])


def test_save_load_round_trip_equal_outputs(tiny, tmp_path):
    path, model, tok = tiny
    assert isinstance(model, TinySa2VAModel) and 50_000 < sum(p.numel() for p in model.parameters()) < 1_000_000
    model.save_pretrained(tmp_path)
    again = AutoModel.from_pretrained(str(tmp_path)).eval()
    again.preparing_for_generation(tok)
    ids, pv = image_prompt(tok, model.num_image_token), torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, pixel_values=pv).logits, again(input_ids=ids, pixel_values=pv).logits)


def test_generate_returns_new_tokens_only(tiny):
    path, model, tok = tiny
    ids = image_prompt(tok, model.num_image_token)
    gc = GenerationConfig.from_pretrained(path)
    gc.max_new_tokens = gc.min_new_tokens = 4
    out = model.generate(pixel_values=torch.randn(1, 3, 32, 32), input_ids=ids, attention_mask=torch.ones_like(ids),
                         generation_config=gc)
    assert out.shape == (1, 4)  # the Sa2VA trap: slicing off the prompt length would leave nothing
    assert out[:, ids.shape[1]:].shape[1] == 0
    assert torch.equal(new_tokens(out, ids, steps=4), out)


def test_image_and_region_features_fill_their_slots(tiny):
    _, model, tok = tiny
    pv = torch.randn(1, 3, 32, 32)
    masks = [torch.zeros(1, 4, 4)]
    masks[0][0, 1:3, 1:3] = 1  # 4 grid cells -> 4 region tokens
    ids = image_prompt(tok, model.num_image_token, " region1" + VP_START + IMG_CONTEXT * 4 + VP_END)
    with torch.no_grad():
        embeds = model.build_inputs_embeds(ids, pv, masks, torch.tensor([True]))
        vit = model.extract_feature(pv)[0]  # [16, C]
    slots = (ids[0] == model.img_context_token_id).nonzero().squeeze(1)
    torch.testing.assert_close(embeds[0, slots[:16]], vit)
    torch.testing.assert_close(embeds[0, slots[16:]], vit[[5, 6, 9, 10]])  # row-major cells of the 4x4 grid
    with pytest.raises(ValueError, match="20 <IMG_CONTEXT> tokens but 16 visual features"):
        model.build_inputs_embeds(ids, pv)
    with pytest.raises(ValueError, match="last tile"):
        model.build_inputs_embeds(ids, torch.randn(2, 3, 32, 32), masks, torch.tensor([True, False]))


def test_predict_forward_contract(tiny):
    _, model, tok = tiny
    image = np.random.default_rng(0).integers(0, 255, (40, 56, 3), dtype=np.uint8)
    region = np.zeros((40, 56), bool)
    region[5:20, 10:30] = True
    out = model.predict_forward(image=image, text="<image>\nPlease segment it.", tokenizer=tok,
                                mask_prompts=[region], max_new_tokens=6)
    assert set(out) == {"prediction", "prediction_masks"} and isinstance(out["prediction"], str)
    # force a [SEG]: the masks come back one per [SEG], at the image's size
    head = model.language_model.lm_head
    hook = head.register_forward_hook(lambda m, a, o: o.index_fill(-1, torch.tensor([model.seg_token_idx]), 1e4))
    try:
        out = model.predict_forward(image=image, text="<image>\nPlease segment it.", tokenizer=tok, max_new_tokens=3)
    finally:
        hook.remove()
    assert out["prediction"].count("[SEG]") == 3
    assert len(out["prediction_masks"]) == 3 and out["prediction_masks"][0].shape == (1, 40, 56)
    assert out["prediction_masks"][0].dtype == bool
