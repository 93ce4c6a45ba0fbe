"""Released Sa2VA checkpoints on this stack: their pristine remote code, loaded in-process with known fixes.

A released Sa2VA checkpoint ships its modeling code (``config.json`` ``auto_map``); ``trust_remote_code=True``
runs it. That code was written for transformers 4.42-4.57 and CUDA. Nothing here edits the user's files: each
known incompatibility is one ``Fix`` below, applied in this process when such a checkpoint loads, and every fix
that applied is reported (``sa2va-rl doctor`` prints them; docs/upstream.md has the table).

Families (``family()``), read from config.json:

* ``internvl``: ``Sa2VAChatModel`` (Sa2VA-1B/4B/8B/26B on InternVL2.5, Sa2VA-InternVL3-2B/8B/14B): InternViT +
  ``mlp1`` + an LLM (Qwen2, InternLM2, ...), 448-px tiles, ``<IMG_CONTEXT>`` slots, region prompts.
* ``qwen_vl``: ``Sa2VAChatModelQwen`` (Sa2VA-Qwen2_5-VL-3B/7B, Sa2VA-Qwen3-VL-4B): transformers' Qwen2.5-VL /
  Qwen3-VL model as ``model``, the Qwen-VL processor, ``<|image_pad|>`` slots; no region prompts upstream.

Both add ``text_hidden_fcs`` and SAM2 (``grounding_encoder``) for ``[SEG]`` -> mask.
"""

from __future__ import annotations

import ast
import contextlib
import importlib
import importlib.util
import io
import json
import logging
import os
import re
import sys
import traceback
import types
from dataclasses import dataclass, field

import torch

logger = logging.getLogger(__name__)

INTERNVL, QWEN_VL = "internvl", "qwen_vl"

# what the released remote code imports at module level, beyond the project's own dependencies
EXTRA_PACKAGES = {"timm": "timm", "einops": "einops", "torchvision": "torchvision", "qwen_vl_utils": "qwen-vl-utils",
                  "sentencepiece": "sentencepiece", "peft": "peft"}


def torchvision_pip_line(torch_version: str | None = None) -> str:
    """The pip line for the torchvision release built for the installed torch (torch 2.N.p pairs with torchvision
    0.(N+15).p; a local build tag such as ``+cpu`` or ``+cu128`` names the PyTorch index to take it from)."""
    version = torch_version or torch.__version__
    m = re.match(r"^2\.(\d+)\.(\d+)(?:\+(\w+))?", version)
    if not m:
        return "pip install torchvision  (the build made for your torch; see pytorch.org/get-started/previous-versions)"
    minor, patch, local = int(m[1]), int(m[2]), m[3]
    line = f"pip install torchvision==0.{minor + 15}.{patch}"
    if local:
        line += f" --index-url https://download.pytorch.org/whl/{local}"
    return line


# The extra leaves torchvision out: a torchvision pinned there could replace the installed torch (PyPI's wheel pulls
# its own CUDA torch); the line above installs the one made for this torch.
PIP_EXTRA = (f'pip install -e ".[sa2va]" && {torchvision_pip_line()}  (timm, einops, qwen-vl-utils, and the '
             'torchvision made for your torch)')


class UpstreamLoadError(RuntimeError):
    """A released checkpoint's code could not be loaded; the message names the file, the import and the fix."""


@dataclass(frozen=True)
class Fix:
    """One known incompatibility of released Sa2VA code with this stack, and what is done about it in-process."""

    name: str
    families: tuple[str, ...]
    problem: str
    remedy: str


FIXES: dict[str, Fix] = {f.name: f for f in [
    Fix("attn_mask_utils", (INTERNVL,),
        "modeling_phi3.py imports transformers.modeling_attn_mask_utils, removed in transformers 5; "
        "modeling_sa2va_chat.py imports modeling_phi3 at module level even when the LLM is Qwen2 or InternLM2",
        "a module of that name providing _prepare_4d_causal_attention_mask (transformers 4.x semantics) is "
        "registered before the import, only when transformers lacks it"),
    Fix("post_init", (INTERNVL, QWEN_VL),
        "Sa2VAChatModel / Sa2VAChatModelQwen.__init__ never call post_init(); transformers 5's from_pretrained "
        "then fails on all_tied_weights_keys",
        "the loaded class's __init__ is wrapped to call post_init() once the upstream __init__ returns"),
    Fix("sam2_device", (INTERNVL, QWEN_VL),
        "sam2.py init_state() hard-codes device cuda and _get_image_feature() calls .cuda(): a CPU run crashes, "
        "and on several GPUs the features would land on the current CUDA device, not the model's",
        "sa2va-rl never lets SAM2 take that path: it encodes the image itself (sam2_model.forward_image) on the "
        "model's device and hands upstream an inference state whose devices and feature cache are already set"),
    Fix("rope_scaling", (INTERNVL,),
        "transformers 5 rewrites an LLM config's rope_scaling into its standard dict ({'rope_type': 'default', "
        "...}), never None; InternLM2's code (Sa2VA-8B/26B) and Phi3's then read rope_scaling['type'] and fail "
        "(KeyError)",
        "the loaded llm_config gets rope_scaling None for the default type, or {'type', 'factor'} as InternLM2 "
        "expects for linear/dynamic scaling (Phi3: the dict with 'type' added, 'su' for transformers 5's "
        "'longrope')"),
    Fix("tied_weights_keys", (INTERNVL,),
        "InternLM2ForCausalLM (Sa2VA-8B/26B) and Phi3ForCausalLM declare _tied_weights_keys as a list; "
        "transformers 5 expects a dict {tied: source} and fails on .keys() when building or saving the model",
        "the list is turned into that dict on the loaded classes (output.weight <- model.tok_embeddings.weight, "
        "lm_head.weight <- model.embed_tokens.weight); tying still happens only when tie_word_embeddings is set"),
    Fix("generation_mixin", (INTERNVL,),
        "InternLM2ForCausalLM (Sa2VA-8B/26B) and Phi3ForCausalLM do not inherit GenerationMixin: since transformers "
        "4.50 such a class has no generate(); and their prepare_inputs_for_generation expects the legacy KV cache "
        "(InternLM2: tuples of (key, value) per layer; Phi3: transformers 4.x's Cache API, get_usable_length / "
        "from_legacy_cache), while transformers 5 hands a DynamicCache under the name `cache` (generation from "
        "inputs_embeds fails in apply_rotary_pos_emb). sa2va_v2's InternLM2 has GenerationMixin on its "
        "PreTrainedModel only, which transformers 5's can_generate() does not count: no generation_config, and "
        "generate() fails",
        "GenerationMixin is appended to those classes' bases before the model is built. InternLM2 generates with "
        "a KV cache: its forward takes transformers 5's DynamicCache, hands the attention its layers as the "
        "legacy tuples and stores the tuples it returns back in the DynamicCache; the first step reads the "
        "prompt's embeddings, each later step only the new token, positions from the attention mask (left "
        "padding). Phi3 (no released Sa2VA uses it as the LLM) generates with the same DynamicCache, handed to "
        "its 4.x-API code as past_key_values with get_usable_length (the one 4.x method it calls that 5 removed). "
        "Any cache other than the plain dynamic one generates without a KV cache: each step re-reads the "
        "prompt's embeddings plus the tokens so far"),
    Fix("rotary_buffers", (INTERNVL,),
        "transformers 5 builds a model on the meta device and leaves non-persistent buffers as uninitialised "
        "memory unless the model's own _init_weights fills them; upstream's InternLM2RotaryEmbedding computes "
        "inv_freq / cos_cached / sin_cached in __init__ only, so Sa2VA-8B/26B would run on garbage rotary tables "
        "(NaN logits, or silently wrong ones)",
        "after loading, those tables are recomputed with the module's own formula and _set_cos_sin_cache; any "
        "other non-persistent floating buffer of the checkpoint's code that is not finite stops the load"),
    Fix("torch_dtype", (QWEN_VL,),
        "Sa2VAChatModelQwen hard-codes self.torch_dtype = torch.bfloat16 and casts the SAM2 pixels to it, so an "
        "fp32 model gets bf16 pixels",
        "model.torch_dtype is set to the dtype the model was loaded in"),
    Fix("count_attr", (INTERNVL,),
        "Sa2VAChatModel._llm_forward increments self._count, which is never initialised",
        "model._count = 0 after loading"),
    Fix("quiet_prints", (INTERNVL,),
        "the remote code prints 'FlashAttention is not installed.' / its config on import and load",
        "stdout of the import and of from_pretrained goes to the debug log instead"),
]}


@dataclass
class UpstreamInfo:
    """What was loaded and how: the family and the fixes that applied (in order)."""

    path: str
    family: str
    architecture: str
    applied: list[str] = field(default_factory=list)

    def describe(self) -> str:
        fixes = ", ".join(self.applied) or "none needed"
        return f"{self.architecture} ({self.family} family); compatibility fixes applied: {fixes}"


# ------------------------------------------------------------------------------------------ config
def read_config(path: str) -> dict:
    with open(os.path.join(path, "config.json")) as f:
        return json.load(f)


def family(cfg: dict) -> str | None:
    """``internvl``, ``qwen_vl`` or None (not a released Sa2VA layout) from a config.json dict."""
    archs = [str(a) for a in cfg.get("architectures") or []]
    auto = " ".join(str(v) for v in (cfg.get("auto_map") or {}).values())
    names = " ".join(archs) + " " + auto
    if "Sa2VAChatModelQwen" in names or ("sa2va" in names.lower() and "text_config" in cfg):
        return QWEN_VL
    if "Sa2VAChatModel" in names or ("llm_config" in cfg and "vision_config" in cfg):
        return INTERNVL
    return None


def is_remote_code(cfg: dict) -> bool:
    return bool(cfg.get("auto_map"))


# ------------------------------------------------------------------------------------------ packages
def _imports(py_file: str) -> tuple[set[str], set[str]]:
    """(top-level packages imported outside try/except, sibling modules imported relatively) of a source file."""
    with open(py_file, encoding="utf-8") as f:
        tree = ast.parse(f.read(), filename=py_file)
    packages: set[str] = set()
    siblings: set[str] = set()

    def visit(nodes, guarded: bool) -> None:
        for node in nodes:
            if isinstance(node, ast.Try):
                visit(node.body, True)
                for h in node.handlers:
                    visit(h.body, guarded)
                visit(node.orelse, guarded)
                visit(node.finalbody, guarded)
            elif isinstance(node, ast.Import) and not guarded:
                packages.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 1 and node.module:
                siblings.add(node.module.split(".")[0])
            elif isinstance(node, ast.ImportFrom) and not guarded and node.level == 0 and node.module:
                packages.add(node.module.split(".")[0])
            elif isinstance(node, (ast.If, ast.With)):
                visit(node.body, guarded)
                visit(getattr(node, "orelse", []), guarded)

    visit(tree.body, False)
    return packages, siblings


def code_files(path: str) -> list[str]:
    """The checkpoint's .py files that loading its model, config and tokenizer imports (auto_map roots and the
    sibling modules they import), in import order."""
    roots = [v for v in (read_config(path).get("auto_map") or {}).values() if isinstance(v, str)]
    tok_cfg = os.path.join(path, "tokenizer_config.json")
    if os.path.exists(tok_cfg):
        with open(tok_cfg) as f:
            tok_map = (json.load(f).get("auto_map") or {}).get("AutoTokenizer") or []
        roots += [v for v in tok_map if isinstance(v, str)]
    todo = [r.split(".")[0] for r in roots]
    seen: list[str] = []
    while todo:
        mod = todo.pop(0)
        file = os.path.join(path, mod + ".py")
        if mod in seen or not os.path.exists(file):
            continue
        seen.append(mod)
        todo.extend(sorted(_imports(file)[1]))
    return [os.path.join(path, m + ".py") for m in seen]


def missing_packages(path: str) -> dict[str, str]:
    """{package: why} for the packages the checkpoint's code imports that are absent or do not import.

    A package that is installed but fails to import (e.g. a torchvision built for another torch) is reported
    with its error: find_spec alone would call it present.
    """
    importers: dict[str, list[str]] = {}
    for file in code_files(path):
        for mod in sorted(_imports(file)[0] & set(EXTRA_PACKAGES)):
            importers.setdefault(mod, []).append(os.path.basename(file))
    out = {}
    for mod, files in sorted(importers.items()):
        where = f" (imported by {', '.join(files)})"
        if importlib.util.find_spec(mod) is None:
            out[EXTRA_PACKAGES[mod]] = "not installed" + where
            continue
        try:
            importlib.import_module(mod)
        except Exception as e:  # noqa: BLE001 - any import failure is reported, with its type
            out[EXTRA_PACKAGES[mod]] = f"installed but fails to import ({type(e).__name__}: {e})" + where
    return out


def packages_message(missing: dict[str, str]) -> str:
    parts = "; ".join(f"{k}: {v}" for k, v in missing.items())
    return f"the checkpoint's code needs packages that are not usable here: {parts}. Fix: {PIP_EXTRA}"


# ------------------------------------------------------------------------------------------ fixes
def _prepare_4d_causal_attention_mask(attention_mask, input_shape, inputs_embeds, past_key_values_length,
                                      sliding_window=None):
    """transformers 4.x's helper (removed in 5): a [B, 1, q, kv] additive mask, 0 where attended, finfo.min not."""
    bsz, q = input_shape[0], input_shape[-1]
    kv = q + past_key_values_length
    dtype, device = inputs_embeds.dtype, inputs_embeds.device
    if attention_mask is not None and attention_mask.dim() == 4:
        inverted = 1.0 - attention_mask.to(dtype)
        return inverted.masked_fill(inverted.bool(), torch.finfo(dtype).min)
    i = torch.arange(q, device=device)[:, None] + past_key_values_length
    j = torch.arange(kv, device=device)[None, :]
    allowed = j <= i
    if sliding_window is not None:
        allowed = allowed & (j >= i - sliding_window)
    allowed = allowed[None, None].expand(bsz, 1, q, kv)
    if attention_mask is not None:
        allowed = allowed & attention_mask[:, None, None, :kv].bool()
    return torch.zeros(bsz, 1, q, kv, dtype=dtype, device=device).masked_fill(~allowed, torch.finfo(dtype).min)


_ATTN_MASK_UTILS = "transformers.modeling_attn_mask_utils"


def transformers_ships_attn_mask_utils() -> bool:
    """Whether the installed transformers has its own ``modeling_attn_mask_utils`` (4.x, and again 5.25 on), so the
    ``attn_mask_utils`` fix is not needed; our stand-in, once registered, does not count."""
    module = sys.modules.get(_ATTN_MASK_UTILS)
    if module is not None:
        return not getattr(module, "_sa2va_rl_shim", False)
    return importlib.util.find_spec(_ATTN_MASK_UTILS) is not None


def _attn_mask_utils_shim(applied: list[str]) -> None:
    name = _ATTN_MASK_UTILS
    if getattr(sys.modules.get(name), "_sa2va_rl_shim", False):
        applied.append("attn_mask_utils")
        return
    if transformers_ships_attn_mask_utils():
        return
    shim = types.ModuleType(name)
    shim.__doc__ = "sa2va-rl: stands in for the module transformers 5 removed (see sa2va_rl.models.upstream)."
    shim._prepare_4d_causal_attention_mask = _prepare_4d_causal_attention_mask
    shim._sa2va_rl_shim = True
    sys.modules[name] = shim
    import transformers

    transformers.modeling_attn_mask_utils = shim
    applied.append("attn_mask_utils")


def _needs_attn_mask_shim(path: str) -> bool:
    for file in code_files(path):
        with open(file, encoding="utf-8") as f:
            if "modeling_attn_mask_utils" in f.read():
                return True
    return False


def _wrap_post_init(cls: type, applied: list[str]) -> None:
    """Make ``cls.__init__`` end with ``post_init()`` when upstream's does not (idempotent, per class)."""
    if getattr(cls, "_sa2va_rl_post_init", False):
        applied.append("post_init")
        return
    original = cls.__init__

    def __init__(self, *args, **kwargs):
        original(self, *args, **kwargs)
        if type(self) is cls and not hasattr(self, "all_tied_weights_keys"):
            self.post_init()

    __init__.__wrapped__ = original
    cls.__init__ = __init__
    cls._sa2va_rl_post_init = True
    applied.append("post_init")


TIED_SOURCES = {"output.weight": "model.tok_embeddings.weight", "lm_head.weight": "model.embed_tokens.weight"}


def _fix_tied_weights_keys(cls: type, applied: list[str]) -> None:
    """transformers 5 wants ``_tied_weights_keys`` as {tied: source}; upstream's LLM classes have lists."""
    fixed = False
    for obj in _dynamic_classes(cls):
        keys = vars(obj).get("_tied_weights_keys")
        if isinstance(keys, list):
            obj._tied_weights_keys = {k: TIED_SOURCES[k] for k in keys if k in TIED_SOURCES}
            obj._sa2va_rl_tied_fixed = True
        fixed = fixed or vars(obj).get("_sa2va_rl_tied_fixed", False)
    if fixed:
        applied.append("tied_weights_keys")


def _dynamic_classes(cls: type):
    """The PreTrainedModel classes of the checkpoint's code package (every module of it imported so far)."""
    from transformers import PreTrainedModel

    package = cls.__module__.rsplit(".", 1)[0]
    for name, module in list(sys.modules.items()):
        if name.startswith(package + ".") and module is not None:
            for obj in vars(module).values():
                if isinstance(obj, type) and issubclass(obj, PreTrainedModel) and obj.__module__ == name:
                    yield obj


def _prepare_inputs_without_cache(self, input_ids, attention_mask=None, inputs_embeds=None, **kwargs):
    """Every step feeds the whole sequence: the prompt's ``inputs_embeds`` (when generation started from them)
    followed by the embeddings of the tokens so far (``input_ids``), with positions from the attention mask."""
    embeds = self.get_input_embeddings()(input_ids)
    if inputs_embeds is not None:
        embeds = torch.cat([inputs_embeds, embeds.to(inputs_embeds.dtype)], dim=1)
    if attention_mask is None:
        attention_mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    return {"inputs_embeds": embeds, "attention_mask": attention_mask, "position_ids": position_ids,
            "use_cache": False}


def _cache_dialect(cls: type) -> str | None:
    """How ``cls``'s module keeps its KV cache: "tuples", legacy (key, value) tuples per layer and never
    transformers' Cache classes (InternLM2's code); "cache_4x", transformers 4.x's Cache API on the Cache it is
    handed (``get_usable_length``: Phi3's code); None otherwise (a Cache-aware class, or no source to read)."""
    path = getattr(sys.modules.get(cls.__module__), "__file__", None)
    if not path or not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        src = f.read()
    if "past_key_values[0][0]" in src and "cache_utils" not in src and "Cache(" not in src:
        return "tuples"
    if "get_usable_length" in src and "cache_utils" in src:
        return "cache_4x"
    return None


_UNBRIDGED_WARNED: set[tuple[str, str]] = set()


def _bridgeable(self, cache) -> bool:
    """A plain DynamicCache (full-attention DynamicLayers, no offloading) on a model that returns its cache: the
    bridge below can hand its layers to the legacy code and take them back. Activation checkpointing in training
    mode makes InternLM2 drop use_cache (and ignore the past), so it generates without a cache then. Setting
    ``model.sa2va_rl_kv_cache = False`` on the causal LM chooses the cache-free path (generate() forces use_cache
    on when it starts from inputs_embeds, so that flag is the switch; tests and benchmarks compare both)."""
    from transformers.cache_utils import DynamicCache, DynamicLayer

    if not getattr(self, "sa2va_rl_kv_cache", True):
        return False
    if self.training and getattr(getattr(self, "model", None), "gradient_checkpointing", False):
        logger.debug("%s: activation checkpointing is on in training mode: generating without a KV cache",
                     type(self).__name__)
        return False
    if type(cache) is not DynamicCache or getattr(cache, "offloading", False) or any(
            type(layer) is not DynamicLayer for layer in cache.layers):
        key = (type(self).__name__, type(cache).__name__)
        if key not in _UNBRIDGED_WARNED:  # once, not at every decoding step
            _UNBRIDGED_WARNED.add(key)
            logger.warning("%s: its code predates transformers 5's Cache classes; only a plain DynamicCache can be "
                           "bridged to it (got %s); generating without a KV cache", *key)
        return False
    return True


def _prepare_inputs_with_cache(self, input_ids, next_sequence_length=None, cache=None, attention_mask=None,
                               inputs_embeds=None, is_first_iteration=False, use_cache=True, **kwargs):
    """With a DynamicCache: feed only what the cache has not seen. The sequence is the prompt's ``inputs_embeds``
    (when generation started from them) followed by the tokens so far (``input_ids``); the first step takes the
    prompt's embeddings, each later step the new token's id. Positions count the attention mask's ones (left
    padding: a row's first real token is position 0), as in the cache-free path; the 2-D mask covers the whole
    sequence (InternLM2 builds its 4-D mask from it and the past length). Without a cache (``use_cache=False``,
    or one the bridge cannot take), the cache-free path."""
    if cache is None or not use_cache or not _bridgeable(self, cache):
        return _prepare_inputs_without_cache(self, input_ids, attention_mask, inputs_embeds)
    prompt = 0 if inputs_embeds is None else inputs_embeds.shape[1]
    total = prompt + input_ids.shape[1]
    past = cache.get_seq_length()
    new = total - past
    if new <= 0:
        raise ValueError(f"the KV cache holds {past} positions but the sequence has only {total}")
    if past < prompt:  # part of the prompt is unread: the first step
        embeds = inputs_embeds
        if input_ids.shape[1]:
            embeds = torch.cat([embeds, self.get_input_embeddings()(input_ids).to(embeds.dtype)], dim=1)
        model_inputs = {"inputs_embeds": embeds[:, past:]}
    else:
        model_inputs = {"input_ids": input_ids[:, input_ids.shape[1] - new:]}
    device = input_ids.device if inputs_embeds is None else inputs_embeds.device
    if attention_mask is None:
        attention_mask = torch.ones((input_ids.shape[0], total), dtype=torch.long, device=device)
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -new:]
    model_inputs.update(attention_mask=attention_mask, position_ids=position_ids, cache=cache, use_cache=True)
    return model_inputs


def _cache_bridge(forward):
    """Wrap a legacy-tuple causal LM's forward to take transformers 5's ``cache`` (a DynamicCache): its layers go
    in as the ``past_key_values`` tuples (None while empty), and the (past + new) tuples the attention returns
    replace them (no copy: the legacy attention already concatenated). The output's ``cache`` is the
    DynamicCache. Without ``cache``, the forward is upstream's, unchanged."""
    import functools

    @functools.wraps(forward)
    def bridged(self, *args, cache=None, **kwargs):
        if cache is None:
            return forward(self, *args, **kwargs)
        if kwargs.get("past_key_values") is not None:
            raise ValueError("pass either cache (a DynamicCache) or past_key_values (legacy tuples), not both")
        past = tuple((layer.keys, layer.values) for layer in cache.layers) if cache.get_seq_length() else None
        as_tuple = kwargs.pop("return_dict", True) is False
        kwargs.update(past_key_values=past, use_cache=True)
        out = forward(self, *args, return_dict=True, **kwargs)
        present = out.get("cache")
        if not isinstance(present, (tuple, list)) or not present:
            raise RuntimeError(f"{type(self).__name__} returned no KV cache with use_cache=True (activation "
                               "checkpointing in training mode?); generate without one (use_cache=False)")
        for idx, (keys, values) in enumerate(present):
            if idx < len(cache.layers) and cache.layers[idx].is_initialized:
                cache.layers[idx].keys, cache.layers[idx].values = keys, values
            else:
                cache.update(keys, values, idx)
        out["cache"] = cache
        return out.to_tuple() if as_tuple else out

    bridged._sa2va_rl_cache_bridge = True
    return bridged


def _cache_api_bridge(forward):
    """Wrap a causal LM's forward written for transformers 4.x's Cache API (Phi3) to take transformers 5's
    ``cache`` (a DynamicCache): it goes in as ``past_key_values`` with ``get_usable_length`` (4.x: for a cache
    without a maximum, the length already cached), the one 4.x method the code calls that 5 removed; the attention
    fills it through ``update``, as in 4.x, and the output's ``cache`` is that DynamicCache. Without ``cache``, the
    forward is upstream's, unchanged."""
    import functools

    @functools.wraps(forward)
    def bridged(self, *args, cache=None, **kwargs):
        if cache is None:
            return forward(self, *args, **kwargs)
        if kwargs.get("past_key_values") is not None:
            raise ValueError("pass either cache (a DynamicCache) or past_key_values, not both")
        if not hasattr(cache, "get_usable_length"):
            cache.get_usable_length = lambda new_seq_length, layer_idx=0: cache.get_seq_length(layer_idx)
        as_tuple = kwargs.pop("return_dict", True) is False
        kwargs.update(past_key_values=cache, use_cache=True)
        before = cache.get_seq_length()
        out = forward(self, *args, return_dict=True, **kwargs)
        if cache.get_seq_length() <= before:
            raise RuntimeError(f"{type(self).__name__} did not fill the KV cache with use_cache=True (activation "
                               "checkpointing in training mode?); generate without one (use_cache=False)")
        out["cache"] = cache
        return out.to_tuple() if as_tuple else out

    bridged._sa2va_rl_cache_bridge = True
    return bridged


def _fix_generation_mixin(cls: type, applied: list[str]) -> None:
    """Give upstream's causal LMs (those with prepare_inputs_for_generation) generate() back, with a DynamicCache
    through a bridge: the legacy-tuple ones (InternLM2) through ``_cache_bridge``, the 4.x-Cache-API ones (Phi3)
    through ``_cache_api_bridge``."""
    from transformers import GenerationMixin

    bridges = {"tuples": _cache_bridge, "cache_4x": _cache_api_bridge}
    fixed = False
    for obj in _dynamic_classes(cls):
        if "prepare_inputs_for_generation" not in vars(obj) or vars(obj).get("_sa2va_rl_generation_mixin"):
            fixed = fixed or vars(obj).get("_sa2va_rl_generation_mixin", False)
            continue
        dialect = _cache_dialect(obj)
        if issubclass(obj, GenerationMixin) and dialect is None:
            continue  # a Cache-aware class that generates already
        if "GenerationMixin" not in str(obj.__bases__):  # what transformers 5's can_generate() reads: a direct
            # base (sa2va_v2's InternLM2 has it on InternLM2PreTrainedModel only, which can_generate() skips)
            obj.__bases__ = obj.__bases__ + (GenerationMixin,)
        if dialect is not None:
            obj.forward = bridges[dialect](vars(obj)["forward"])
            obj._supports_default_dynamic_cache = classmethod(lambda c: True)
            obj.prepare_inputs_for_generation = _prepare_inputs_with_cache
        else:
            obj._supports_default_dynamic_cache = classmethod(lambda c: False)
            obj.prepare_inputs_for_generation = _prepare_inputs_without_cache
        obj._sa2va_rl_generation_mixin = True
        fixed = True
    if fixed:
        applied.append("generation_mixin")


def _fix_rope_scaling(config, applied: list[str]) -> None:
    """InternLM2 and Phi3 read ``rope_scaling['type']`` unless it is None; transformers 5 never leaves it None.
    ``config``: a Sa2VA config (its ``llm_config``) or the LLM's own."""
    llm = getattr(config, "llm_config", config)
    rs = getattr(llm, "rope_scaling", None)
    arch = str(getattr(llm, "architectures", ""))
    if not ("InternLM2" in arch or "Phi3" in arch) or not isinstance(rs, dict) or "type" in rs:
        return
    kind = rs.get("rope_type", "default")
    if kind == "default":
        llm.rope_scaling = None
    elif "Phi3" in arch:  # su (transformers 5: longrope) / yarn read their factors from the same dict
        llm.rope_scaling = {**rs, "type": "su" if kind == "longrope" else kind}
    else:
        llm.rope_scaling = {"type": kind, "factor": float(rs.get("factor", 1.0))}
    applied.append("rope_scaling")


def _fix_rotary_buffers(model, applied: list[str]) -> None:
    """Recompute the rotary tables of upstream's rotary embeddings (non-persistent: never in the checkpoint)."""
    fixed = False
    for name, mod in model.named_modules():
        if not type(mod).__module__.startswith("transformers_modules") or "inv_freq" not in getattr(
                mod, "_non_persistent_buffers_set", ()):
            continue
        if not all(hasattr(mod, a) for a in ("dim", "base", "inv_freq")):
            continue
        dev = mod.inv_freq.device
        inv = 1.0 / (mod.base ** (torch.arange(0, mod.dim, 2, device=dev).float() / mod.dim))
        mod.register_buffer("inv_freq", inv.to(mod.inv_freq.dtype), persistent=False)
        if hasattr(mod, "_set_cos_sin_cache") and hasattr(mod, "cos_cached"):
            mod._set_cos_sin_cache(seq_len=mod.max_seq_len_cached, device=dev, dtype=mod.cos_cached.dtype)
        fixed = True
    if fixed:
        applied.append("rotary_buffers")
    bad = [n for n, b in model.named_buffers() if b.is_floating_point() and not bool(torch.isfinite(b).all())]
    if bad:
        raise UpstreamLoadError(f"non-finite buffers after loading (never stored in the checkpoint; the code's "
                                f"__init__ computes them and transformers 5 does not run it for real): {bad[:5]}")


@contextlib.contextmanager
def _quiet_stdout(applied: list[str] | None = None):
    """Upstream prints on import and load; send it to the debug log."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        yield
    text = buf.getvalue().strip()
    if text:
        logger.debug("remote code printed: %s", text)
        if applied is not None and "quiet_prints" not in applied:
            applied.append("quiet_prints")


def _import_failure(path: str, e: BaseException) -> UpstreamLoadError:
    """Name the checkpoint file and the line whose import broke."""
    frames = [f for f in traceback.extract_tb(e.__traceback__) if "transformers_modules" in f.filename
              or os.path.abspath(f.filename).startswith(os.path.abspath(path))]
    where = ""
    if frames:
        f = frames[-1]
        where = f" in {os.path.basename(f.filename)} line {f.lineno} (`{(f.line or '').strip()}`)"
    hint = ("this checkpoint's code may target an older transformers; the known fixes are in docs/upstream.md. "
            "If it is a package, " + PIP_EXTRA) if isinstance(e, ImportError) else \
        "see docs/upstream.md for the released versions sa2va-rl knows"
    return UpstreamLoadError(f"{path}: loading the checkpoint's code failed{where}: {type(e).__name__}: {e}. {hint}")


# ------------------------------------------------------------------------------------------ load
def load_upstream(path: str, dtype: torch.dtype = torch.float32) -> tuple[torch.nn.Module, UpstreamInfo]:
    """A released Sa2VA checkpoint's model, from its own (pristine) code, with the known fixes applied.

    The caller has already decided that remote code may run (``--trust_remote_code``).
    """
    from transformers import AutoConfig
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    cfg = read_config(path)
    fam = family(cfg)
    ref = (cfg.get("auto_map") or {}).get("AutoModel") or (cfg.get("auto_map") or {}).get("AutoModelForCausalLM")
    if fam is None or ref is None:
        raise UpstreamLoadError(f"{path}/config.json: no auto_map.AutoModel naming a Sa2VA class "
                                f"(architectures {cfg.get('architectures')}); not a released Sa2VA checkpoint")
    missing = missing_packages(path)
    if missing:
        raise UpstreamLoadError(f"{path}: {packages_message(missing)}")
    info = UpstreamInfo(path, fam, ref.split(".")[-1])
    if _needs_attn_mask_shim(path):
        _attn_mask_utils_shim(info.applied)
    try:
        with _quiet_stdout(info.applied):
            cls = get_class_from_dynamic_module(ref, path)
            config = AutoConfig.from_pretrained(path, trust_remote_code=True)
    except Exception as e:  # noqa: BLE001 - named and re-raised with the file and line
        raise _import_failure(path, e) from e
    _fix_rope_scaling(config, info.applied)
    _fix_tied_weights_keys(cls, info.applied)
    _fix_generation_mixin(cls, info.applied)
    _wrap_post_init(cls, info.applied)
    with _quiet_stdout(info.applied):
        model, loading = cls.from_pretrained(path, config=config, dtype=dtype, output_loading_info=True)
    lost = {k: v for k, v in loading.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if lost:
        detail = "; ".join(f"{k}: {len(v)} (first: {sorted(map(str, v))[:3]})" for k, v in lost.items())
        raise UpstreamLoadError(f"{path}: the weights do not match the model its code builds ({detail}). Training it "
                                "would start from random weights for those tensors; is the checkpoint complete and "
                                "its config.json the one it was saved with?")
    _fix_rotary_buffers(model, info.applied)
    if fam == QWEN_VL:
        model.torch_dtype = dtype
        info.applied.append("torch_dtype")
    else:
        model._count = 0
        info.applied.append("count_attr")
    info.applied.append("sam2_device")  # by calling convention: see models/sam2.py
    model.sa2va_rl_upstream = info
    logger.info("loaded %s: %s", path, info.describe())
    return model, info
