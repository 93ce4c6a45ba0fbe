"""Released Sa2VA code (InternVL family: Sa2VA-1B/4B/8B/26B, Sa2VA-InternVL3) on tiny random-weight checkpoints
built from the pristine files in ../shared/upstream: load with the named fixes, inputs equal to upstream's
predict_forward, the model equal to the one upstream's classes build, saved back in the release layout."""

import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from sa2va_rl.models.sa2va import Sa2VAModelArgs, lm_parts, load_sa2va, make_policy, prepare_for_training, save_sa2va
from sa2va_rl.models.upstream import (FIXES, PIP_EXTRA, UpstreamLoadError, load_upstream,
                                      transformers_ships_attn_mask_utils)

# attn_mask_utils applies only where transformers lacks that module (5.0-5.24; 5.25 ships it again)
BASE_FIXES = {"post_init", "count_attr", "sam2_device"} | (
    set() if transformers_ships_attn_mask_utils() else {"attn_mask_utils"})


@pytest.fixture
def ckpts(upstream_ckpts, monkeypatch):
    """family -> a built checkpoint; AutoProcessor loads the Qwen-VL processors as tests/upstream/qwen_vl.py
    does (without torchvision, transformers cannot build their video processor: tests/stubs/README.md)."""
    import transformers

    from tests.upstream.qwen_vl import load_processor

    real = transformers.AutoProcessor.from_pretrained
    monkeypatch.setattr(transformers.AutoProcessor, "from_pretrained",
                        lambda path, *a, **k: load_processor(path) if os.path.exists(
                            os.path.join(str(path), "processor_config.json")) else real(path, *a, **k))
    return upstream_ckpts


def file_keys(path: str) -> dict[str, torch.dtype]:
    with safe_open(os.path.join(path, "model.safetensors"), "pt") as f:
        return {k: f.get_slice(k).get_dtype() for k in f.keys()}


def test_every_applied_fix_is_documented():
    with open(os.path.join(os.path.dirname(__file__), "..", "..", "docs", "upstream.md")) as f:
        doc = f.read()
    for name in FIXES:
        assert f"`{name}`" in doc, f"fix {name} is not in docs/upstream.md's table"


@pytest.mark.parametrize("family,extra", [("v1", set()), ("v2", set()),
                                          ("v1_internlm2", {"rope_scaling", "tied_weights_keys",
                                                            "generation_mixin", "rotary_buffers"})])
def test_pristine_code_loads_with_named_fixes_and_equals_upstreams_own_model(ckpts, family, extra):
    path = ckpts(family)
    model, info = load_upstream(path, torch.float32)
    assert info.family == "internvl" and BASE_FIXES | extra <= set(info.applied) <= set(FIXES)
    assert set(model.state_dict()) == set(file_keys(path))  # nothing renamed, nothing missing
    # the loaded model computes what upstream's classes compute when they build it for real (no meta device):
    # catches buffers transformers 5 leaves uninitialised (InternLM2's rotary tables) and silently wrong weights
    cls = type(model)
    torch.manual_seed(0)
    reference = cls(model.config).float()
    reference.load_state_dict(model.state_dict())
    ids = torch.arange(3, 40)[None]
    lm, ref_lm = lm_parts(model)[0], lm_parts(reference)[0]
    got, want = lm(input_ids=ids).logits, ref_lm(input_ids=ids).logits
    assert torch.isfinite(got).all() and torch.equal(got, want)


def test_internlm2_generates_from_inputs_embeds_as_greedy_decoding_by_hand(ckpts):
    from transformers import GenerationConfig

    model, tok = load_sa2va(ckpts("v1_internlm2"), trust_remote_code=True)
    lm = lm_parts(model)[0]
    torch.manual_seed(1)
    with torch.no_grad():  # random weights at scale 0.02 make every greedy token the same: spread them
        lm.get_output_embeddings().weight.normal_()
        lm.get_input_embeddings().weight.normal_()
        ids = torch.tensor([tok("a red square is at the left").input_ids])
        gc = GenerationConfig(max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0)
        got = lm.generate(inputs_embeds=lm.get_input_embeddings()(ids), attention_mask=torch.ones_like(ids),
                          generation_config=gc)[0].tolist()
        seq = ids
        for _ in range(6):
            seq = torch.cat([seq, lm(input_ids=seq).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert got == seq[0, ids.shape[1]:].tolist() and len(set(got)) > 1


def test_import_failure_names_file_line_and_import(ckpts, tmp_path):
    src = ckpts("v1")
    for f in os.listdir(src):
        if f.endswith((".py", ".json")):
            shutil.copy(os.path.join(src, f), tmp_path)
    path = tmp_path / "modeling_sa2va_chat.py"
    path.write_text("from transformers.no_such_module import thing\n" + path.read_text())
    with pytest.raises(UpstreamLoadError) as e:
        load_upstream(str(tmp_path))
    msg = str(e.value)
    assert "modeling_sa2va_chat.py line 1" in msg and "transformers.no_such_module" in msg


def test_missing_or_broken_packages_named_with_the_pip_line(ckpts, monkeypatch, capsys):
    import importlib

    from sa2va_rl import cli
    from sa2va_rl.models import upstream

    real_find, real_import = importlib.util.find_spec, importlib.import_module
    monkeypatch.setattr(upstream.importlib.util, "find_spec", lambda n, *a: None if n == "einops" else real_find(n, *a))

    def broken(name, *a):
        if name == "timm":
            raise RuntimeError("operator torchvision::nms does not exist")
        return real_import(name, *a)

    monkeypatch.setattr(upstream.importlib, "import_module", broken)
    with pytest.raises(UpstreamLoadError) as e:
        load_sa2va(ckpts("v1"), trust_remote_code=True)
    assert "einops: not installed" in str(e.value) and "timm: installed but fails to import (RuntimeError" in str(e.value)
    assert PIP_EXTRA in str(e.value)
    assert cli.main(["doctor", "--model_path", ckpts("v1"), "--trust_remote_code"]) == 1
    out = capsys.readouterr().out
    assert "FAIL  packages" in out and "einops: not installed" in out and f"fix: {PIP_EXTRA}" in out


def test_doctor_without_the_flag_says_add_it(ckpts, capsys):
    from sa2va_rl import cli

    assert cli.main(["doctor", "--model_path", ckpts("v2")]) == 1
    assert "fix: add --trust_remote_code" in capsys.readouterr().out


@pytest.mark.parametrize("family", ["v1", "v2"])
def test_inputs_equal_upstream_predict_forward(ckpts, family, monkeypatch):
    """Token ids, tile pixels and region cells of one sample (a 3-tile image + a region) as upstream builds them."""
    model, tok = load_sa2va(ckpts(family), trust_remote_code=True)
    policy = make_policy(model, tok, ckpts(family))
    rng = np.random.default_rng(0)
    image = rng.integers(1, 255, size=(200, 600, 3), dtype=np.uint8)
    region = np.zeros((200, 600), bool)
    region[40:120, 300:420] = True
    question = "Describe the masked region in detail."
    prompt, visual = policy.encode(image, question, [region], key="x:0")

    captured = {}

    class Captured(Exception):
        pass

    def capture(**kwargs):
        captured.update(kwargs)
        raise Captured

    monkeypatch.setattr(torch.Tensor, "cuda", lambda self, *a, **k: self)  # upstream hard-codes .cuda()
    monkeypatch.setattr(model, "generate", capture)
    with pytest.raises(Captured):
        model.predict_forward(image=Image.fromarray(image), text="<image>\n" + question, tokenizer=tok,
                              mask_prompts=[region[None].astype(np.float32)])
    assert tok(prompt).input_ids == captured["input_ids"][0].tolist()
    assert visual.pixel_values.shape[0] == 4  # 3 tiles + the thumbnail
    torch.testing.assert_close(visual.pixel_values.to(torch.bfloat16), captured["pixel_values"], rtol=0, atol=0)
    assert torch.equal(visual.region_masks, torch.stack([m.bool() for m in captured["prompt_masks"]])[0])
    assert captured["vp_overall_mask"].tolist() == [False, False, False, True]


@pytest.mark.parametrize("family", ["v1", "v2", "qwen2_5_vl", "qwen3vl"])
def test_saved_in_the_release_layout_and_upstream_loads_it(ckpts, family, tmp_path):
    src = ckpts(family)
    model, tok = load_sa2va(src, trust_remote_code=True)
    prepare_for_training(model, Sa2VAModelArgs(lora_r=4, lora_alpha=8))
    with torch.no_grad():  # a trained adapter: merging it must change the LLM weights
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.05)
    save_sa2va(model, tok, str(tmp_path))
    merged = {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}
    assert file_keys(str(tmp_path)) == file_keys(src)  # the input's names and dtypes (bf16)
    for name in os.listdir(src):
        if name != "model.safetensors":
            with open(os.path.join(src, name), "rb") as a, open(tmp_path / name, "rb") as b:
                assert a.read() == b.read(), name
    assert (tmp_path / "lora_adapter" / "adapter_config.json").exists()
    again, _info = load_upstream(str(tmp_path), torch.bfloat16)  # upstream's own code reads it back
    sd = again.state_dict()
    assert set(sd) == set(merged) and all(torch.equal(sd[k], merged[k]) for k in merged)
    with safe_open(os.path.join(src, "model.safetensors"), "pt") as a, \
            safe_open(os.path.join(tmp_path, "model.safetensors"), "pt") as b:
        llm = [k for k in a.keys() if "proj" in k and "visual" not in k and "vision" not in k]
        assert llm and any(not torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in llm)  # the merge landed


@pytest.mark.parametrize("family", ["v1", "v2", "qwen2_5_vl", "qwen3vl"])
def test_doctor_and_train_both_tasks_and_caption2mask_with_seg(ckpts, family, tmp_path, capsys):
    """The acceptance runs: doctor (a [SEG] forced through SAM2), train --task both, and --task caption2mask
    with [SEG] sampled at step 1; the output reloads with upstream's code under the input's weight names."""
    from sa2va_rl import cli
    from sa2va_rl.data.synthetic import make_gar_data

    path = ckpts(family)
    data = make_gar_data(str(tmp_path / "data"), n=4, seed=0)
    assert cli.main(["doctor", "--model_path", path, "--data_dir", data, "--trust_remote_code"]) == 0
    out = capsys.readouterr().out
    assert "compatibility fixes applied: " in out and "PASS  segmentation" in out and "PASS  saved layout" in out
    common = ["--model_path", path, "--data_dir", data, "--trust_remote_code", "--batch_size", "1",
              "--num_generations", "2", "--max_completion_length", "4", "--lora_r", "4", "--lora_alpha", "8",
              "--report_to", "none", "--disable_tqdm", "true", "--logging_steps", "1"]
    out_both = str(tmp_path / "both")
    assert cli.main(["train", *common, "--task", "both", "--max_steps", "2", "--output_dir", out_both]) == 0
    with open(os.path.join(out_both, "stability.json")) as f:
        assert json.load(f)["final_weights_finite"] is True
    assert file_keys(out_both) == file_keys(path)
    again, _ = load_upstream(out_both, torch.float32)
    assert all(torch.isfinite(p).all() for p in again.parameters())

    # with the mask loss (issue L): upstream's own SAM2 decoder (inject_language_embd) carries the gradient to
    # text_hidden_fcs, which trains (a large lr so that one step shows through the release's bf16)
    out_seg = str(tmp_path / "seg")
    assert cli.main(["train", *common, "--task", "caption2mask", "--max_steps", "1", "--output_dir", out_seg,
                     "--inject", "force_token", "--save_steps", "1", "--mask_loss_weight", "1",
                     "--learning_rate", "1e-2", "--warmup_steps", "0"]) == 0
    with open(os.path.join(out_seg, "checkpoint-1", "trainer_state.json")) as f:
        logged = json.load(f)["log_history"][0]
    assert logged["seg/no_seg_frac"] == 0.0  # every completion had a [SEG], each became a mask
    assert logged["rewards/mask_iou/mean"] == logged["rewards/mask_iou/mean"]  # scored (not NaN)
    assert logged["mask_loss/rollouts"] == 1.0 and logged["mask_loss/ce"] > 0 and 0 < logged["mask_loss/dice"] <= 1
    assert file_keys(out_seg) == file_keys(path)
    with safe_open(os.path.join(path, "model.safetensors"), "pt") as a, \
            safe_open(os.path.join(out_seg, "model.safetensors"), "pt") as b:
        fcs = [k for k in a.keys() if "text_hidden_fcs" in k]
        sam2_encoder = [k for k in a.keys() if "image_encoder" in k]
        assert fcs and all(not torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in fcs if k.endswith("weight"))
        assert sam2_encoder and all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in sam2_encoder)


@pytest.mark.parametrize("family", ["v1_internlm2", "v2", "qwen2_5_vl"])
def test_batched_generation_greedy_equals_one_call_per_group_on_released_code(ckpts, family):
    """The released LLMs (InternLM2 remote code, Qwen2 in InternVL, Qwen2.5-VL with M-RoPE) take left padding in
    one generate() for every group: greedy tokens equal one unpadded call per group."""
    from transformers import GenerationConfig

    path = ckpts(family)
    model, tok = load_sa2va(path, trust_remote_code=True)
    policy = make_policy(model, tok, path, trust_remote_code=True)
    torch.manual_seed(1)
    with torch.no_grad():  # random weights at scale 0.02 make every greedy token the same: spread them
        policy._lm_head(model).weight.normal_()
    rng = np.random.default_rng(0)
    samples = [(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8), "Describe the image.", "a"),
               (rng.integers(0, 255, (48, 32, 3), dtype=np.uint8), "What is in this picture? Answer in a word.", "b")]
    prompts, contexts = [], []
    for image, question, key in samples:
        text, visual = policy.encode(image, question, None, key=key)
        prompts.append(tok(text).input_ids)
        contexts.append(visual)
    assert len(prompts[0]) != len(prompts[1])
    gc = GenerationConfig(max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=policy.pad_token_id,
                          eos_token_id=None)
    model.eval()
    batched = policy.generate(model, [prompts[0]] * 2 + [prompts[1]] * 2, gc, None, contexts=[contexts[0]] * 2 +
                              [contexts[1]] * 2).completion_ids
    single = [c for p, v in zip(prompts, contexts)
              for c in policy.generate(model, [p] * 2, gc, None, contexts=[v] * 2).completion_ids]
    assert batched == single and batched[0] != batched[-1]


def test_the_sa2va_extra_leaves_torchvision_to_the_line_made_for_the_installed_torch():
    """Issue N, item 2: ``pip install -e ".[sa2va]"`` must never replace the installed torch, so the extra names no
    torchvision; the fix line pairs torch 2.N.p with torchvision 0.(N+15).p from the build's own index."""
    from sa2va_rl.models.upstream import torchvision_pip_line

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    with open(os.path.join(os.path.dirname(__file__), "..", "..", "pyproject.toml"), "rb") as f:
        extra = tomllib.load(f)["project"]["optional-dependencies"]["sa2va"]
    assert not [r for r in extra if r.lower().startswith("torchvision")], extra
    assert torchvision_pip_line("2.13.0+cpu") == \
        "pip install torchvision==0.28.0 --index-url https://download.pytorch.org/whl/cpu"
    assert torchvision_pip_line("2.14.1+cu130") == \
        "pip install torchvision==0.29.1 --index-url https://download.pytorch.org/whl/cu130"
    assert torchvision_pip_line("2.6.0") == "pip install torchvision==0.21.0"
    assert torchvision_pip_line() in PIP_EXTRA
