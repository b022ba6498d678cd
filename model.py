"""
The teacher and student zoo: one table of pathology foundation models as timm VisionTransformers,
strict offline weight loading, a forward that returns (pooled embedding, patch tokens), and the
nanoGPT-style configurator shared by distill.py and evaluate.py.

Run it:
  every row: params, dim, tokens, GFLOPs (on the meta device, no network):
    python model.py --list
  build one model and embed a dummy batch:
    python model.py tiny-teacher
  check that a local file or snapshot folder loads strictly:
    python model.py H-optimus-0 --weights=/data/hf/H-optimus-0
  download from the hub (gated rows: request access on the model card first):
    HF_TOKEN=hf_... python model.py Hibou-L --weights=hub

From Python:
    import model
    # weights: a local file or snapshot folder
    teacher, spec = model.create('H-optimus-0', weights='/data/hf/H-optimus-0')
    # (B, spec['dim']), (B, N, spec['width'])
    pooled, patches = model.embed(teacher, spec, tiles_uint8)
    # a timm hub folder: model.safetensors, config.json, the model card README.md
    model.export(student, student_spec, 'out/run1/student')
    model.create('local-dir:out/run1/student')  # or 'out/run1', or 'hf-hub:USER/NAME' once uploaded
"""
import ast
import difflib
import json
import math
import os
import sys
import zlib
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F
import timm
from timm.layers import SwiGLUPacked

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# H-optimus-0 model card (huggingface.co/bioptimus/H-optimus-0): its own mean/std,
# 224 px at 0.5 um/px
HOPTIMUS_MEAN = (0.707223, 0.578729, 0.703617)
HOPTIMUS_STD = (0.211883, 0.230117, 0.177517)
# Hibou-L and Hibou-B cards (huggingface.co/histai, github.com/HistAI/hibou): their own mean/std
HIBOU_MEAN = (0.7068, 0.5755, 0.7220)
HIBOU_STD = (0.1950, 0.2316, 0.1816)
# DINOv2-style giant MLP: SwiGLU with 2/3 of 4x the width, packed into one fc1
# (timm's vit_giant_patch14_dinov2)
SWIGLU = dict(mlp_layer='swiglu_packed', act_layer='silu')
# kwargs stay JSON-able strings; the class is resolved only when building
MLP_LAYERS = {'swiglu_packed': SwiGLUPacked}


# a SystemExit: uncaught, Python prints its one line (what to do), exit code 1, no traceback
class WeightsError(SystemExit):
    """Weights that cannot be fetched or do not fit."""


def row(name, arch, hub, width, patch_size, kwargs, num_registers=0, pool='cls',
        mean=IMAGENET_MEAN, std=IMAGENET_STD, img_size=224, resize=None, weights='hub'):
    # One spec: the timm arch and its kwargs as the model card gives them.
    # pool: 'cls', or 'cls+mean' (CLS || mean of the patch tokens, so dim = 2 x width).
    # resize: the shorter side before the centre crop to img_size (None: straight to img_size).
    # weights: where they come from ('random': no pretrained weights, the row's default then).
    kwargs = dict(img_size=img_size, num_classes=0, **kwargs)
    dim = width * 2 if pool == 'cls+mean' else width
    return dict(name=name, arch=arch, kwargs=kwargs, hub=hub, pool=pool, img_size=img_size,
                resize=resize, patch_size=patch_size, num_registers=num_registers,
                mean=tuple(mean), std=tuple(std), dim=dim, width=width, weights=weights)


# One row per model: row(name, timm arch, hub id, width, patch size, timm kwargs, ...).
# The comment above each row cites the model card it comes from.
MODELS = {r['name']: r for r in [
    # huggingface.co/bioptimus/H-optimus-0: timm ViT-g/14, 4 registers, 1536-d CLS,
    # gated (Apache-2.0)
    row('H-optimus-0', 'vit_giant_patch14_reg4_dinov2', 'bioptimus/H-optimus-0', 1536, 14,
        dict(init_values=1e-5, dynamic_img_size=False), num_registers=4,
        mean=HOPTIMUS_MEAN, std=HOPTIMUS_STD, weights='hub, gated: bioptimus/H-optimus-0'),
    # huggingface.co/bioptimus/H-optimus-1: same architecture and normalisation as H-optimus-0,
    # gated
    row('H-optimus-1', 'vit_giant_patch14_reg4_dinov2', 'bioptimus/H-optimus-1', 1536, 14,
        dict(init_values=1e-5, dynamic_img_size=False), num_registers=4,
        mean=HOPTIMUS_MEAN, std=HOPTIMUS_STD, weights='hub, gated: bioptimus/H-optimus-1'),
    # huggingface.co/kaiko-ai/midnight: transformers Dinov2 ViT-g/14 (no registers),
    # mean=std=0.5, embedding = CLS || mean of patch tokens (3072-d); MIT, ungated.
    # Converted to timm on load.
    row('Midnight', 'vit_giant_patch14_dinov2', 'kaiko-ai/midnight', 1536, 14,
        dict(init_values=1e-5), pool='cls+mean', mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
        weights='hub, ungated (MIT)'),
    # huggingface.co/MahmoodLab/UNI2-h: timm_kwargs from the card (ViT-H/14-ish, 8 registers,
    # SwiGLU), gated
    row('UNI2-h', 'vit_giant_patch14_224', 'MahmoodLab/UNI2-h', 1536, 14,
        dict(patch_size=14, depth=24, num_heads=24, init_values=1e-5, embed_dim=1536,
             mlp_ratio=2.66667 * 2, no_embed_class=True, reg_tokens=8, dynamic_img_size=True,
             **SWIGLU),
        num_registers=8, weights='hub, gated: MahmoodLab/UNI2-h'),
    # huggingface.co/paige-ai/Virchow2: ViT-H/14, 4 registers, SwiGLU + SiLU,
    # embedding = CLS || mean patch, gated
    row('Virchow2', 'vit_huge_patch14_224', 'paige-ai/Virchow2', 1280, 14,
        dict(init_values=1e-5, mlp_ratio=5.3375, reg_tokens=4, dynamic_img_size=True, **SWIGLU),
        num_registers=4, pool='cls+mean', weights='hub, gated: paige-ai/Virchow2'),
    # huggingface.co/prov-gigapath/prov-gigapath: vit_giant_patch14_dinov2 with patch 16
    # (SwiGLU inherited), transforms Resize(256) + CenterCrop(224), ImageNet mean/std, gated
    row('Prov-GigaPath', 'vit_giant_patch14_dinov2', 'prov-gigapath/prov-gigapath', 1536, 16,
        dict(patch_size=16, init_values=1e-5, mlp_ratio=5.33334), resize=256,
        weights='hub, gated: prov-gigapath/prov-gigapath'),
    # huggingface.co/histai/hibou-L: transformers Dinov2-with-registers ViT-L/14, 4 registers,
    # SwiGLU MLP, own mean/std; Apache-2.0, gated. Converted to timm on load (convert_hibou).
    # timm has no ViT-L with SwiGLU; its ViT-g/14-reg4 at ViT-L sizes is the same module with
    # JSON-able kwargs, so an export loads in plain timm
    row('Hibou-L', 'vit_giant_patch14_reg4_dinov2', 'histai/hibou-L', 1024, 14,
        dict(embed_dim=1024, depth=24, num_heads=16, init_values=1.0, mlp_ratio=5472 / 1024),
        num_registers=4, mean=HIBOU_MEAN, std=HIBOU_STD,
        weights='hub, gated: histai/hibou-L'),
    # huggingface.co/MahmoodLab/uni: ViT-L/16, init_values 1e-5, ImageNet mean/std, gated
    row('UNI', 'vit_large_patch16_224', 'MahmoodLab/uni', 1024, 16,
        dict(init_values=1e-5, dynamic_img_size=True), weights='hub, gated: MahmoodLab/uni'),
    # timm vit_large_patch14_reg4_dinov2.lvd142m: natural images (DINOv2 LVD-142M), ungated
    row('DINOv2-L-reg4', 'vit_large_patch14_reg4_dinov2',
        'timm/vit_large_patch14_reg4_dinov2.lvd142m', 1024, 14,
        dict(), num_registers=4, weights='hub, ungated (Apache-2.0)'),
    # huggingface.co/owkin/phikon-v2: transformers Dinov2 ViT-L/16 (arXiv 2409.09173), no
    # registers, plain MLP, embedding = CLS (last_hidden_state[:, 0]); Owkin non-commercial
    # licence, ungated. Converted to timm on load (convert_hibou). ImageNet mean/std, as in
    # kaiko-ai/eva's and TRIDENT's Phikon-v2 recipes.
    row('Phikon-v2', 'vit_large_patch16_224', 'owkin/phikon-v2', 1024, 16,
        dict(init_values=1e-5), weights='hub, ungated (Owkin non-commercial)'),
    # ViT-B students: about a quarter of a ViT-L's parameters and FLOPs per tile.
    # huggingface.co/bioptimus/H0-mini: timm ViT-B/14 distilled from H-optimus-0
    # (arXiv 2501.16239), 4 registers, SwiGLU + SiLU passed by hand as for UNI2-h,
    # H-optimus-0's mean/std, embedding = CLS || mean of patch tokens (1536-d); gated
    row('H0-mini', 'vit_base_patch14_reg4_dinov2', 'bioptimus/H0-mini', 768, 14,
        dict(init_values=1e-5, mlp_ratio=5.33334, **SWIGLU), num_registers=4,
        pool='cls+mean', mean=HOPTIMUS_MEAN, std=HOPTIMUS_STD,
        weights='hub, gated: bioptimus/H0-mini'),
    # huggingface.co/histai/hibou-b (github.com/HistAI/hibou): Hibou-L's layout at ViT-B/14
    # (4 registers, SwiGLU, layer scale, 224-px positions), Hibou's mean/std, embedding = CLS
    # (pooler_output); Apache-2.0. Converted to timm on load (convert_hibou).
    row('Hibou-B', 'vit_giant_patch14_reg4_dinov2', 'histai/hibou-b', 768, 14,
        dict(embed_dim=768, depth=12, num_heads=12, init_values=1.0, mlp_ratio=4096 / 768),
        num_registers=4, mean=HIBOU_MEAN, std=HIBOU_STD,
        weights='hub, ungated (Apache-2.0)'),
    # huggingface.co/owkin/phikon: transformers ViTModel ViT-B/16 trained with iBOT, embedding =
    # CLS (last_hidden_state[:, 0]); Owkin non-commercial licence, ungated. Converted to timm on
    # load (convert_vit). ImageNet mean/std, as in kaiko-ai/eva's and TRIDENT's Phikon recipes.
    row('Phikon', 'vit_base_patch16_224', 'owkin/phikon', 768, 16,
        dict(), weights='hub, ungated (Owkin non-commercial)'),
    # a ViT-L/14-reg4 student trained from scratch (random init), with H-optimus-0's normalisation
    row('ViT-L-scratch', 'vit_large_patch14_reg4_dinov2', None, 1024, 14,
        dict(), num_registers=4, mean=HOPTIMUS_MEAN, std=HOPTIMUS_STD, weights='random'),
    # Tiny rows for tests and the CPU demo. The teacher keeps H-optimus-0's layout (patch 14,
    # 4 registers, SwiGLU, layer scale) but with layer scale 1.0: at 1e-5 a random teacher's
    # blocks would be no-ops.
    row('tiny-teacher', 'vit_giant_patch14_reg4_dinov2', None, 96, 14,
        dict(embed_dim=96, depth=3, num_heads=3, init_values=1.0), num_registers=4,
        mean=HOPTIMUS_MEAN, std=HOPTIMUS_STD, weights='random'),
    row('tiny-student', 'vit_tiny_patch16_224', None, 64, 16,
        dict(embed_dim=64, depth=2, num_heads=2), weights='random'),
]}


def get_spec(name_or_spec):
    if isinstance(name_or_spec, dict):
        return name_or_spec
    if name_or_spec not in MODELS:
        close = difflib.get_close_matches(str(name_or_spec), MODELS, n=1)
        hint = f" (did you mean {close[0]}?)" if close else f" (known: {', '.join(MODELS)})"
        raise WeightsError(f"error: unknown model {name_or_spec!r}{hint}; or pass a timm hub "
                           "name (local-dir:FOLDER, hf-hub:USER/NAME) or a distilled output folder")
    return MODELS[name_or_spec]


def build(spec, device=None):
    """The bare timm VisionTransformer for a spec; on the meta device it costs no memory or time."""
    kwargs = dict(spec['kwargs'])
    if 'mlp_layer' in kwargs:
        kwargs['mlp_layer'] = MLP_LAYERS[kwargs['mlp_layer']]
    if device == 'meta':
        # every tensor will come from a checkpoint (or is only counted): skip the init
        kwargs['weight_init'] = 'skip'
    with torch.device(device or 'cpu'):
        return timm.create_model(spec['arch'], pretrained=False, **kwargs)


def build_random(spec):
    # Seeded by the model's name inside a forked RNG: distill.py and evaluate.py build the same
    # tiny teacher, and the caller's own random stream is left untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(zlib.crc32(spec['name'].encode()))
        return build(spec)


@lru_cache(maxsize=None)
def _meta_stats(arch_json):
    vit = build(json.loads(arch_json), 'meta')
    params = sum(p.numel() for p in vit.parameters())
    # every matmul weight that each token passes through once per forward (qkv, proj, fc1, fc2)
    block_matmul = sum(p.numel() for p in vit.blocks.parameters() if p.ndim == 2)
    patch_matmul = vit.patch_embed.proj.weight.numel()
    return params, block_matmul, patch_matmul, len(vit.blocks), vit.num_prefix_tokens


# rows that share an architecture (H-optimus-0 and -1) share one meta build
def _arch_key(spec):
    return json.dumps(dict(arch=spec['arch'], kwargs=spec['kwargs']), sort_keys=True)


def param_count(name_or_spec):
    return _meta_stats(_arch_key(get_spec(name_or_spec)))[0]


def tokens_per_image(name_or_spec, img_size=None):
    spec = get_spec(name_or_spec)
    patches_per_side = (img_size or spec['img_size']) // spec['patch_size']
    # the patch grid, the class token, the registers
    return patches_per_side ** 2 + 1 + spec['num_registers']


def flops_per_image(name_or_spec, img_size=None):
    """Forward FLOPs of one image; training costs about 3x this (backward = 2 x forward)."""
    spec = get_spec(name_or_spec)
    _, block_matmul, patch_matmul, depth, prefix = _meta_stats(_arch_key(spec))
    patches = ((img_size or spec['img_size']) // spec['patch_size']) ** 2
    tokens = patches + prefix
    # 2 FLOPs (multiply, add) per matmul weight per token; the patch embedding sees patches only
    matmul = 2 * block_matmul * tokens + 2 * patch_matmul * patches
    # attention: q @ k^T and attention @ v, 2 x tokens^2 x width each, in every block
    attention = 4 * depth * tokens ** 2 * spec['width']
    return matmul + attention


# ---------------------------------------------------------------------- weights

def hub_reachable(timeout=3.0):
    # huggingface_hub retries a dead connection for ~25 s; one quick TCP connect makes
    # "no network" fail fast
    import socket
    from urllib.parse import urlparse
    from urllib.request import getproxies, proxy_bypass
    hub = urlparse(os.environ.get('HF_ENDPOINT', 'https://huggingface.co'))
    # Behind a proxy (HTTPS_PROXY/ALL_PROXY, minus NO_PROXY, read as huggingface_hub's client
    # reads them) the proxy is what must answer, not the hub.
    proxies = getproxies()
    proxy = None if proxy_bypass(hub.hostname) else proxies.get(hub.scheme) or proxies.get('all')
    if not proxy:
        target = hub
    elif '://' in proxy:
        target = urlparse(proxy)
    else:
        # a proxy given as host:port, without a scheme
        target = urlparse(f'http://{proxy}')
    default_port = 443 if target.scheme == 'https' else 80
    address = (target.hostname, target.port or default_port)
    try:
        socket.create_connection(address, timeout=timeout).close()
        return True
    except OSError:
        return False


def download(spec):
    """Path of the hub checkpoint (from the local cache when offline). Honours HF_TOKEN."""
    if spec['hub'] is None:
        raise WeightsError(f"error: {spec['name']} has no hub weights: "
                           "use weights='random' or a local file")
    # the two file names timm and transformers publish
    return hub_file(spec['hub'], ('model.safetensors', 'pytorch_model.bin'))


def hub_file(repo, filenames):
    """Path of the first of filenames in a hub repository (from the local cache when offline)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, GatedRepoError, RepositoryNotFoundError
    advice = (f"request access at https://huggingface.co/{repo} and set HF_TOKEN, "
              f"or download it where there is network (hf download {repo}) "
              "and pass weights=<that folder>")
    offline_by_env = os.environ.get('HF_HUB_OFFLINE', '0').lower() in ('1', 'true', 'yes')
    offline = offline_by_env or not hub_reachable()
    token = os.environ.get('HF_TOKEN') or None
    for filename in filenames:
        try:
            return hf_hub_download(repo, filename, token=token, local_files_only=offline)
        except GatedRepoError:
            raise WeightsError(f"error: {repo} is gated and HF_TOKEN is missing or has no access: "
                               f"{advice}") from None
        except RepositoryNotFoundError:
            raise WeightsError(f"error: {repo} not found (or gated and HF_TOKEN is not set): "
                               f"{advice}") from None
        except EntryNotFoundError:
            # also LocalEntryNotFoundError: not in the cache under this name, try the next
            continue
        except Exception as e:
            # network errors of whichever HTTP client huggingface_hub uses
            raise WeightsError(f"error: cannot download {repo} ({type(e).__name__}): "
                               f"{advice}") from None
    if offline:
        raise WeightsError(f"error: no network (or its proxy is down, or HF_HUB_OFFLINE is set) "
                           f"and {repo} is not in the local cache: {advice}")
    raise WeightsError(f"error: {repo} has none of {', '.join(filenames)}: "
                       "pass weights=<local file>")


def find_weight_file(folder):
    """The checkpoint inside a folder: an export, a hub snapshot, or a HF cache folder."""
    suffixes = ('.safetensors', '.bin', '.pth', '.pt')
    weight_files = [p for p in Path(folder).rglob('*') if p.suffix in suffixes and p.is_file()]
    # a known name first; a HF cache folder holds one copy per snapshot: the newest wins
    for preferred in ('student.safetensors', 'model.safetensors', 'pytorch_model.bin'):
        named = [p for p in weight_files if p.name == preferred]
        if named:
            return max(named, key=lambda p: p.stat().st_mtime)
    if len(weight_files) == 1:
        return weight_files[0]
    found = ', '.join(p.name for p in weight_files[:5]) or 'none'
    raise WeightsError(f"error: cannot tell which weight file in {folder} to load "
                       f"(found: {found}): pass the file itself")


def read_state_dict(path):
    """The tensors of one checkpoint file (weight_file() finds it), without their wrappers."""
    path = Path(path)
    try:
        if path.suffix == '.safetensors':
            from safetensors.torch import load_file
            state = load_file(str(path))
        else:
            # .bin / .pth / .pt: tensors only, never arbitrary pickled code
            state = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:
        first_line = str(e).splitlines()[0][:200]
        raise WeightsError(f"error: cannot read {path} ({type(e).__name__}: {first_line}): "
                           "is it a complete, uncorrupted checkpoint?") from None
    # training checkpoints nest the weights one level down
    for wrapper in ('state_dict', 'model'):
        if isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    # DDP and torch.compile wrappers prefix every key; the weights underneath are the plain model's
    for prefix in ('module.', '_orig_mod.'):
        if all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state, path


def fit_state_dict(state, spec, vit, source):
    """Make a checkpoint fit the timm model exactly, or fail naming the keys that do not."""
    # transformers checkpoints get timm's names first: a ViT block (Phikon) has layernorm_before,
    # a Dinov2 block (Hibou, Midnight, Phikon-v2) norm1
    if any(k.startswith(('embeddings.', 'dinov2.embeddings.', 'vit.embeddings.')) for k in state):
        is_vit = any('.layernorm_before.' in k for k in state)
        state = convert_vit(state, vit) if is_vit else convert_hibou(state, vit)
    # a classifier head is not part of the backbone (every row has num_classes=0)
    state = {k: v for k, v in state.items() if not k.startswith('head.')}
    expected = vit.state_dict()

    # Positions stored for another grid (DINOv2 ships 518 px = 37x37): resample them to ours
    # exactly as timm's loader does. With no_embed_class (UNI2-h) they cover the patches only.
    stored_pos, model_pos = state.get('pos_embed'), expected['pos_embed']
    prefix = 0 if vit.no_embed_class else vit.num_prefix_tokens
    if stored_pos is not None and stored_pos.shape != model_pos.shape:
        same_width = stored_pos.shape[-1] == model_pos.shape[-1]
        stored_patches = stored_pos.shape[1] - prefix
        if same_width and math.isqrt(stored_patches) ** 2 == stored_patches:
            from timm.layers import resample_abs_pos_embed
            grid = list(vit.patch_embed.grid_size)
            state['pos_embed'] = resample_abs_pos_embed(stored_pos, grid, num_prefix_tokens=prefix)

    # every key must be there, nothing more, each of the model's shape
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shared = [k for k in expected if k in state]
    mismatched = [f"{k} {tuple(state[k].shape)} vs {tuple(expected[k].shape)}"
                  for k in shared if state[k].shape != expected[k].shape]
    problems = []
    for what, keys in (('missing keys', missing), ('unexpected keys', unexpected),
                       ('shape mismatches file vs model', mismatched)):
        if keys:
            # the first four of each kind are enough to tell which checkpoint this is
            shown = ', '.join(keys[:4]) + (', ...' if len(keys) > 4 else '')
            problems.append(f"{len(keys)} {what} ({shown})")
    if problems:
        raise WeightsError(f"error: {source} does not fit {spec['name']} ({spec['arch']}): "
                           f"{'; '.join(problems)}. Pass the checkpoint of this model, "
                           "or the model name that matches the checkpoint.")
    return state


def take(state, *keys):
    """Remove one tensor from a transformers state dict, or several concatenated (q|k|v into
    timm's qkv, gate|up into SwiGLU's fc1). Whatever is never taken has no place in timm."""
    missing = [k for k in keys if k not in state]
    if missing:
        raise WeightsError(f"error: transformers checkpoint lacks {', '.join(missing)}: "
                           "incomplete, or neither a Dinov2 nor a ViT")
    tensors = [state.pop(k) for k in keys]
    return torch.cat(tensors) if len(tensors) > 1 else tensors[0]


def resample_patch_positions(patch_pos, grid, antialias):
    """(1, side x side, width) patch positions -> (1, grid[0] x grid[1], width), bicubic."""
    side = math.isqrt(patch_pos.shape[1])
    # (1, width, side, side): the image layout that F.interpolate resamples
    image = patch_pos.reshape(1, side, side, -1).permute(0, 3, 1, 2).float()
    resized = F.interpolate(image, size=grid, mode='bicubic', align_corners=False,
                            antialias=antialias)
    return resized.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], -1).to(patch_pos.dtype)


def dinov2_embeddings(state, vit):
    """timm's patch embedding, class and register tokens, positions and final norm (transformers'
    Dinov2 and ViT name them alike)."""
    has_registers = 'embeddings.register_tokens' in state
    pos = take(state, 'embeddings.position_embeddings')
    cls_pos, patch_pos = pos[:, :1], pos[:, 1:]
    grid = tuple(vit.patch_embed.grid_size) if vit is not None else None
    if grid and patch_pos.shape[1] != grid[0] * grid[1]:
        # transformers interpolates at run time (bicubic; antialiased in Dinov2WithRegisters, not
        # in Dinov2 or ViT); doing the same once here gives timm the exact positions transformers
        # uses at this input size
        patch_pos = resample_patch_positions(patch_pos, grid, antialias=has_registers)
    out = {'patch_embed.proj.weight': take(state, 'embeddings.patch_embeddings.projection.weight'),
           'patch_embed.proj.bias': take(state, 'embeddings.patch_embeddings.projection.bias'),
           'norm.weight': take(state, 'layernorm.weight'),
           'norm.bias': take(state, 'layernorm.bias')}
    registers = None
    if has_registers:
        registers = take(state, 'embeddings.register_tokens')
        out['reg_token'] = registers
    cls_token = take(state, 'embeddings.cls_token')
    # transformers adds the position embedding to [CLS, patches], then inserts the registers
    # after CLS. timm prepends [CLS, registers] and adds pos_embed either to the patches only
    # (no_embed_class: CLS's position is folded into cls_token) or to every token (the registers
    # get a zero position).
    if vit is None or vit.no_embed_class:
        out['cls_token'] = cls_token + cls_pos
        out['pos_embed'] = patch_pos
    else:
        register_pos = [torch.zeros_like(registers)] if has_registers else []
        out['cls_token'] = cls_token
        out['pos_embed'] = torch.cat([cls_pos, *register_pos, patch_pos], 1)
    return out


def dinov2_block_keys(state, i):
    """For block i: each timm key -> the transformers keys it is made of."""
    hf, tm = f'encoder.layer.{i}.', f'blocks.{i}.'
    # the hub's on-disk names (attention.attention.query), or transformers>=5's in-memory ones
    if hf + 'attention.q_proj.weight' in state:
        qkv = ('q_proj', 'k_proj', 'v_proj')
        proj = 'attention.o_proj'
    else:
        qkv = ('attention.query', 'attention.key', 'attention.value')
        proj = 'attention.output.dense'
    if hf + 'mlp.gate_proj.weight' in state:
        # transformers>=5: SwiGLU's gate and up projections apart, concatenated into fc1
        fc1, fc2 = ('mlp.gate_proj', 'mlp.up_proj'), 'mlp.down_proj'
    elif hf + 'mlp.weights_in.weight' in state:
        # SwiGLU packed [gate; up]: exactly timm's SwiGLUPacked fc1
        fc1, fc2 = ('mlp.weights_in',), 'mlp.weights_out'
    else:
        # a plain MLP (Dinov2 without use_swiglu_ffn)
        fc1, fc2 = ('mlp.fc1',), 'mlp.fc2'
    keys = {}
    for p in ('weight', 'bias'):
        keys[f'{tm}attn.qkv.{p}'] = [f'{hf}attention.{n}.{p}' for n in qkv]
        keys[f'{tm}attn.proj.{p}'] = [f'{hf}{proj}.{p}']
        keys[f'{tm}mlp.fc1.{p}'] = [f'{hf}{n}.{p}' for n in fc1]
        keys[f'{tm}mlp.fc2.{p}'] = [f'{hf}{fc2}.{p}']
        keys[f'{tm}norm1.{p}'] = [f'{hf}norm1.{p}']
        keys[f'{tm}norm2.{p}'] = [f'{hf}norm2.{p}']
    keys[f'{tm}ls1.gamma'] = [f'{hf}layer_scale1.lambda1']
    keys[f'{tm}ls2.gamma'] = [f'{hf}layer_scale2.lambda1']
    return keys


def take_blocks(state, block_keys, layout):
    """Every block's timm tensors, taken out of state by block_keys(state, i); a key left over
    belongs to another layout."""
    # blocks are 'encoder.layer.N.' on the hub, 'layers.N.' in memory in transformers>=5's ViT
    block_ids = [int(k.removeprefix('encoder.').split('.')[1]) for k in state
                 if k.startswith(('encoder.layer.', 'layers.'))]
    depth = 1 + max(block_ids, default=-1)
    out = {}
    for i in range(depth):
        for timm_key, hf_keys in block_keys(state, i).items():
            out[timm_key] = take(state, *hf_keys)
    left = sorted(state)
    if left:
        raise WeightsError(f"error: {len(left)} transformers keys have no timm counterpart "
                           f"({', '.join(left[:4])}): not a {layout} checkpoint")
    return out


def convert_hibou(state, vit=None):
    """transformers Dinov2(-with-registers) keys (Hibou, Midnight, Phikon-v2) -> timm keys.
    Reads the hub's on-disk names (attention.attention.query, mlp.weights_in) and transformers>=5's
    in-memory ones (q_proj, gate_proj/up_proj)."""
    # a copy: take() removes what it converts, so what is left at the end has no timm place
    state = {k.removeprefix('dinov2.'): v for k, v in state.items()}
    # only used for masked-image training, never by the encoder
    state.pop('embeddings.mask_token', None)
    out = dinov2_embeddings(state, vit)
    out.update(take_blocks(state, dinov2_block_keys, 'Dinov2 / Dinov2-with-registers'))
    return out


def vit_block_keys(state, i):
    """For block i of a transformers ViT: each timm key -> the transformers keys it is made of."""
    tm = f'blocks.{i}.'
    # the hub's on-disk names, or transformers>=5's in-memory ones
    if f'layers.{i}.attention.q_proj.weight' in state:
        hf = f'layers.{i}.'
        qkv = ('attention.q_proj', 'attention.k_proj', 'attention.v_proj')
        proj, fc1, fc2 = 'attention.o_proj', 'mlp.fc1', 'mlp.fc2'
    else:
        hf = f'encoder.layer.{i}.'
        qkv = ('attention.attention.query', 'attention.attention.key', 'attention.attention.value')
        proj, fc1, fc2 = 'attention.output.dense', 'intermediate.dense', 'output.dense'
    keys = {}
    for p in ('weight', 'bias'):
        keys[f'{tm}attn.qkv.{p}'] = [f'{hf}{n}.{p}' for n in qkv]
        keys[f'{tm}attn.proj.{p}'] = [f'{hf}{proj}.{p}']
        keys[f'{tm}mlp.fc1.{p}'] = [f'{hf}{fc1}.{p}']
        keys[f'{tm}mlp.fc2.{p}'] = [f'{hf}{fc2}.{p}']
        keys[f'{tm}norm1.{p}'] = [f'{hf}layernorm_before.{p}']
        keys[f'{tm}norm2.{p}'] = [f'{hf}layernorm_after.{p}']
    return keys


def convert_vit(state, vit=None):
    """transformers ViTModel keys (Phikon) -> timm VisionTransformer keys: Dinov2's embeddings and
    final norm, blocks without layer scale whose norms are layernorm_before/after.

    timm's LayerNorm eps is 1e-6, transformers' ViT default 1e-12: for activations of unit
    variance the normalised values differ by about 5e-7 of themselves."""
    # a copy without the prefix ViTFor* models add; take() removes what it converts
    state = {k.removeprefix('vit.'): v for k, v in state.items()}
    # the masked-image token, and the pooler (dense + tanh on CLS) that the card's
    # add_pooling_layer=False leaves out: neither is part of the embedding
    state.pop('embeddings.mask_token', None)
    state = {k: v for k, v in state.items() if not k.startswith('pooler.')}
    out = dinov2_embeddings(state, vit)
    out.update(take_blocks(state, vit_block_keys, 'ViT'))
    return out


# ---------------------------------------------------------------------- create / embed / export

def resolve(name_or_path, weights=None):
    """(spec, weights) as create() loads them, no weights read: the one place that says which
    spec a name or folder means and where its weights come from.

    name_or_path: a MODELS key or a spec dict; a model by its timm hub name, 'local-dir:FOLDER' or
    'hf-hub:USER/NAME' (a timm hub folder: this repository's export, or a published model); a
    run's out_dir, its export folder or a file in it; an older export (student.json beside
    student.safetensors). weights: None (the default: the hub for real rows and hf-hub names,
    random for tiny rows, a folder's own weights), 'random', 'hub', or a local file/folder;
    returned with the default filled in.
    """
    if isinstance(name_or_path, dict) or name_or_path in MODELS:
        spec = get_spec(name_or_path)
        row_default = 'random' if spec['weights'] == 'random' else 'hub'
        return spec, weights or row_default
    name = str(name_or_path)
    if name.startswith('hf-hub:'):
        repo = name.removeprefix('hf-hub:')
        return hub_spec(hub_file(repo, ('config.json',)), name, hub=repo), weights or 'hub'
    is_local_dir = name.startswith('local-dir:')
    path = Path(name.removeprefix('local-dir:'))
    if not is_local_dir and not path.exists():
        # neither a model name nor a path: get_spec's error names the model perhaps meant
        get_spec(name)
    # local-dir: means what it means to timm, the folder that holds config.json
    folder = path if is_local_dir else model_folder(path)
    is_old_file = path.name in ('student.json', 'student.safetensors')
    if (folder / 'config.json').is_file() and not is_old_file:
        return hub_spec(folder / 'config.json', name), weights or str(folder)
    if is_local_dir or not (folder / 'student.json').is_file():
        raise WeightsError(missing_config(name, folder, is_local_dir))
    # the older export: student.json is the spec
    spec = json.loads((folder / 'student.json').read_text())
    # JSON gives lists; the table's specs hold tuples
    spec['mean'], spec['std'] = tuple(spec['mean']), tuple(spec['std'])
    return spec, weights or str(folder / 'student.safetensors')


def model_folder(path):
    """The folder a distilled model's path means: a file's folder, a run's out_dir's export
    (out_dir/student), or the folder itself."""
    if path.is_file():
        return path.parent
    if (path / 'student').is_dir() and not (path / 'config.json').exists():
        return path / 'student'
    return path


def missing_config(name, folder, is_local_dir):
    """The one line for a folder that is no model: what it lacks, and what to pass instead."""
    if is_local_dir:
        export = folder / 'student'
        hint = ''
        if (export / 'config.json').is_file():
            hint = f" (a run's out_dir: its export is local-dir:{export})"
        return (f"error: {name}: {folder} has no config.json, so it is not a timm hub folder"
                f"{hint}; pass the folder that holds config.json and model.safetensors")
    return (f"error: {name}: {folder} has neither config.json (a timm hub folder; an export "
            "killed midway lacks it: export again) nor student.json (an older export); or pass "
            "a model name and weights=<this path>")


def hub_spec(config_path, name, hub=None):
    """The spec of a timm hub folder's config.json, read as timm reads it: this repository's
    export, or a published model (H-optimus-0, UNI2-h, ...) pooled by its CLS token."""
    config = json.loads(Path(config_path).read_text())
    if not {'architecture', 'pretrained_cfg'} <= config.keys():
        raise WeightsError(f"error: {config_path} is not timm's config.json (no architecture, no "
                           "pretrained_cfg): for a transformers checkpoint (Hibou-L) pass its "
                           "model name and weights=<its folder>, e.g. Hibou-L=<folder>")
    pretrained = config['pretrained_cfg']
    model_args = config.get('model_args', {})
    # what config.json cannot hold (a Python class) or timm cannot pool, written by hub_config()
    extras = config.get('g2l', {})
    global_pool = model_args.get('global_pool', config.get('global_pool', 'token'))
    if not extras and global_pool != 'token':
        raise WeightsError(f"error: {config_path} pools by global_pool={global_pool!r}, and "
                           "model.embed takes the CLS token: give the model a row in model.py")
    # row() sets the input size and the feature-extractor head itself
    kwargs = {k: v for k, v in model_args.items() if k not in ('img_size', 'num_classes')}
    if 'mlp_layer' in extras:
        kwargs['mlp_layer'] = extras['mlp_layer']
    img_size = pretrained['input_size'][-1]
    # timm's eval transform resizes the shorter side to img_size / crop_pct, then crops img_size
    crop_pct = pretrained.get('crop_pct', 1.0)
    resize = round(img_size / crop_pct) if crop_pct < 1 else None
    layout = json.dumps(dict(arch=config['architecture'], kwargs=kwargs), sort_keys=True)
    width, patch_size, registers = _meta_layout(layout)
    spec = row(extras.get('name', name), config['architecture'], hub, width, patch_size, kwargs,
               num_registers=registers, pool=extras.get('pool', 'cls'), mean=pretrained['mean'],
               std=pretrained['std'], img_size=img_size, resize=resize, weights=name)
    return dict(spec, license=pretrained.get('license'))


@lru_cache(maxsize=None)
def _meta_layout(arch_json):
    # width, patch size and registers as timm builds them from a config's arguments
    vit = build(json.loads(arch_json), 'meta')
    return vit.embed_dim, vit.patch_embed.patch_size[0], vit.num_reg_tokens


def weight_file(spec, weights):
    """The checkpoint file create() reads for weights 'hub' or a local file/folder."""
    path = Path(download(spec) if weights == 'hub' else weights)
    if not path.exists():
        raise WeightsError(f"error: weights path {path} does not exist: "
                           "pass a .safetensors/.bin/.pth file or a folder")
    if path.is_dir():
        path = find_weight_file(path)
    return path


def create(name_or_path, weights=None, device='cpu'):
    """(timm VisionTransformer in eval mode, float32, spec).

    name_or_path and weights as resolve() reads them: a MODELS key, a spec dict, a timm hub name
    (local-dir:FOLDER, hf-hub:USER/NAME), or a distilled output folder or a file in it; None (the
    default), 'random', 'hub', or a local file/folder.
    """
    spec, weights = resolve(name_or_path, weights)
    if weights == 'random':
        vit = build_random(spec)
    else:
        state, source = read_state_dict(weight_file(spec, weights))
        # no memory, no init time: every tensor comes from the checkpoint
        vit = build(spec, 'meta')
        state = fit_state_dict(state, spec, vit, source)
        vit.load_state_dict(state, strict=True, assign=True)
    return vit.float().to(device).eval(), spec


def resize_crop(spec, images):
    """uint8 or [0, 1] float (B, 3, H, W) -> [0, 1] float (B, 3, S, S), S = spec['img_size']."""
    x = images.float() / 255 if images.dtype == torch.uint8 else images.float()
    size = spec['img_size']
    # S x S tiles (the distillation crop) pass untouched
    if x.shape[-2:] == (size, size):
        return x
    # The cards' eval recipe (timm, eva): the shorter side to spec['resize'] or S (bicubic,
    # antialiased), then a centre crop of S; never squashed. With `resize` (Prov-GigaPath
    # 256 -> 224) its 256 px tiles are only cropped: um/px as trained.
    target_short = spec['resize'] or size
    h, w = x.shape[-2:]
    short = min(h, w)
    if short != target_short:
        resized = (round(h * target_short / short), round(w * target_short / short))
        x = F.interpolate(x, size=resized, mode='bicubic', antialias=True, align_corners=False)
        x = x.clamp(0, 1)
    top, left = (x.shape[-2] - size) // 2, (x.shape[-1] - size) // 2
    return x[..., top:top + size, left:left + size]


def prepare(spec, images):
    """uint8 or [0, 1] float (B, 3, H, W) -> the model's input (its size and normalisation)."""
    x = resize_crop(spec, images)
    mean = torch.tensor(spec['mean'], device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(spec['std'], device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def embed(vit, spec, images):
    """(pooled (B, spec['dim']), patch tokens (B, N, width) without class and register tokens)."""
    # differentiable: the final norm applied, grad checkpointing honoured
    tokens = vit.forward_features(prepare(spec, images))
    cls, patches = tokens[:, 0], tokens[:, vit.num_prefix_tokens:]
    pooled = cls
    # Virchow2 and Midnight cards: embedding = CLS || mean over patch tokens (registers excluded)
    if spec['pool'] == 'cls+mean':
        pooled = torch.cat([cls, patches.mean(1)], dim=-1)
    return pooled, patches


def export(vit, spec, folder, lineage=None):
    """folder/ as a timm hub folder: model.safetensors, config.json and the model card README.md,
    written atomically. lineage: what the card says the model was distilled from (card_text).

    create(folder) loads it, and so does plain timm: timm.create_model('local-dir:FOLDER',
    pretrained=True); uploaded to the hub, 'hf-hub:USER/NAME'. Rows with mlp_layer (UNI2-h,
    Virchow2) add mlp_layer=timm.layers.SwiGLUPacked, as their own cards do.
    """
    from safetensors.torch import save_file
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    # an export killed earlier leaves its temporaries: nothing of them is kept
    for stale in folder.glob('.*.tmp'):
        stale.unlink()
    state = {k: v.detach().contiguous().cpu() for k, v in vit.state_dict().items()}
    lineage = lineage or {}
    config = hub_config(spec, lineage.get('license'))
    staged = {name: folder / f'.{name}.{os.getpid()}.tmp'
              for name in ('model.safetensors', 'README.md', 'config.json')}
    save_file(state, str(staged['model.safetensors']))
    staged['README.md'].write_text(card_text(spec, folder, lineage))
    staged['config.json'].write_text(json.dumps(config, indent=2))
    # safetensors writes its files mode 0600: on a shared cluster the group could not read the
    # student. Every file gets the mode every other output gets, 0666 less the user's umask
    umask = os.umask(0)
    os.umask(umask)
    for path in staged.values():
        os.chmod(path, 0o666 & ~umask)
    # timm and resolve() read config.json first: the old one goes before anything is replaced and
    # the new one comes last, so a killed export leaves a folder that loads nothing, never an old
    # config.json beside new weights
    (folder / 'config.json').unlink(missing_ok=True)
    for name, path in staged.items():
        os.replace(path, folder / name)


def hub_config(spec, license=None):
    """config.json in the layout timm writes (timm.models.save_for_hf) and reads: what
    timm.create_model needs, the preprocessing timm.data.resolve_data_config returns, and under
    'g2l' what only model.embed needs."""
    # JSON holds no Python class: SwiGLU rows' mlp_layer stays in 'g2l', the card passes the class
    model_args = {k: v for k, v in spec['kwargs'].items() if k != 'mlp_layer'}
    # CLS: timm's forward returns the class token ('token'). CLS || mean patch is no timm pooling:
    # the forward returns every token and the card pools them, as Virchow2's card does
    model_args['global_pool'] = 'token' if spec['pool'] == 'cls' else ''
    size = spec['img_size']
    pretrained_cfg = dict(
        input_size=[3, size, size],
        fixed_input_size=not spec['kwargs'].get('dynamic_img_size', False),
        interpolation='bicubic',
        # resize_crop(): the shorter side to `resize` (or to the input size), then a centre crop
        crop_pct=size / (spec['resize'] or size),
        crop_mode='center',
        mean=list(spec['mean']),
        std=list(spec['std']),
        num_classes=0,
        first_conv='patch_embed.proj',
        classifier='head',
    )
    if license:
        pretrained_cfg['license'] = license
    extras = dict(name=spec['name'], pool=spec['pool'])
    if 'mlp_layer' in spec['kwargs']:
        extras['mlp_layer'] = spec['kwargs']['mlp_layer']
    return dict(architecture=spec['arch'], num_classes=0, num_features=spec['width'],
                global_pool=model_args['global_pool'], model_args=model_args,
                pretrained_cfg=pretrained_cfg, g2l=extras)


# ---------------------------------------------------------------------- the model card

# the licences of the rows' published weights, as their model cards give them (hub licence ids)
LICENSES = {
    'bioptimus/H-optimus-0': 'apache-2.0',
    'kaiko-ai/midnight': 'mit',
    'MahmoodLab/UNI2-h': 'cc-by-nc-nd-4.0',
    'paige-ai/Virchow2': 'cc-by-nc-nd-4.0',
    'prov-gigapath/prov-gigapath': 'apache-2.0',
    'histai/hibou-L': 'apache-2.0',
    'MahmoodLab/uni': 'cc-by-nc-nd-4.0',
    'timm/vit_large_patch14_reg4_dinov2.lvd142m': 'apache-2.0',
}
# what the hub lists the model under (huggingface.co/models?other=pathology)
CARD_TAGS = ('image-feature-extraction', 'timm', 'pathology', 'histology',
             'knowledge-distillation', 'g2l')


def weights_license(spec, weights):
    """The licence of a model's weights: its folder's config.json, or its row's model card; None
    for random weights or when it is not known."""
    if weights == 'random':
        return None
    return spec.get('license') or LICENSES.get(spec['hub'])


def write_card(folder, lineage, evaluation=None):
    """Rewrite folder/README.md (e.g. with the G2L table once the run evaluated) through a
    temporary name: the folder loads throughout."""
    folder = Path(folder)
    spec, _ = resolve(f'local-dir:{folder}')
    staged = folder / f'.README.md.{os.getpid()}.tmp'
    staged.write_text(card_text(spec, folder, lineage, evaluation))
    os.replace(staged, folder / 'README.md')


def card_text(spec, folder, lineage, evaluation=None):
    """README.md of an exported model, for the user to edit before publishing: the hub's metadata
    header, how plain timm embeds a tile, what the model was distilled from and how, the G2L
    table, the model's details.

    lineage (every key optional): license; teachers, a list of dict(name, arch, weights, sha256,
    license); student, its initialisation as the same dict plus hub; tiles, dict(folder, slides,
    tiles, tile_size, mpp); recipe, {setting: value}. evaluation: dict(data, table) with
    evaluate.py's compact tables, or None before the run evaluated.
    """
    teachers = lineage.get('teachers', [])
    title = spec['name']
    if teachers:
        title += f" distilled from {', '.join(t['name'] for t in teachers)}"
    lines = card_header(lineage)
    lines += ['', '<!-- Written by the export (model.py). Before publishing: the name in the code, '
              'what the model is for and where it fails. -->', '', f'# {title}', '']
    lines += [f"A tile encoder for H&E pathology, `{spec['arch']}` "
              f"({param_count(spec) / 1e6:.1f}M parameters), distilled with G2L "
              '([arXiv 2510.11176](https://arxiv.org/abs/2510.11176)).', '']
    lines += card_usage(spec, folder, lineage.get('tiles', {}))
    if teachers:
        lines += card_lineage(lineage)
    lines += card_evaluation(evaluation, folder)
    lines += card_details(spec, lineage)
    return '\n'.join(lines) + '\n'


def card_header(lineage):
    """The hub's metadata header (YAML): what the hub shows and filters by."""
    lines = ['---', 'library_name: timm', f"license: {lineage.get('license') or 'other'}", 'tags:']
    lines += [f'- {tag}' for tag in CARD_TAGS]
    # the student started from published weights: the hub lists this model under them
    start = lineage.get('student', {})
    if start.get('hub'):
        lines.append(f"base_model: {start['hub']}")
    return lines + ['pipeline_tag: image-feature-extraction', '---']


def card_usage(spec, folder, tiles):
    """How plain timm embeds a tile: the card's code, nothing of this repository."""
    # config.json names no Python class: SwiGLU rows pass it by hand, as UNI2-h's card does
    swiglu = ', mlp_layer=timm.layers.SwiGLUPacked' if 'mlp_layer' in spec['kwargs'] else ''
    code = ['import timm', 'import torch', 'from PIL import Image', '',
            f"model = timm.create_model('local-dir:{folder}', pretrained=True{swiglu}).eval()",
            f"# once uploaded: timm.create_model('hf-hub:USER/NAME', pretrained=True{swiglu})",
            'config = timm.data.resolve_data_config({}, model=model)',
            'transform = timm.data.create_transform(**config)',
            "tile = transform(Image.open('tile.png').convert('RGB')).unsqueeze(0)",
            'with torch.inference_mode():']
    if spec['pool'] == 'cls':
        code.append(f"    embedding = model(tile)  # (1, {spec['dim']}): the CLS token")
    else:
        code += ['    tokens = model(tile)  # every token: the class token, registers, patches',
                 f"    # (1, {spec['dim']}): CLS || mean of the patch tokens, registers excluded",
                 '    patches = tokens[:, model.num_prefix_tokens:]',
                 '    embedding = torch.cat([tokens[:, 0], patches.mean(1)], dim=-1)']
    size = spec['img_size']
    scale = f" at {', '.join(map(str, tiles['mpp']))} µm/px" if tiles.get('mpp') else ''
    lines = ['## How to use', '', '```python', *code, '```', '',
             f'Give it tiles of {size} px{scale}, the scale it learnt: the transform resizes '
             f'any other size to {size} px, so cut larger tiles to {size} px rather than '
             'shrink them.']
    if swiglu:
        lines.append('config.json cannot name a Python class: `mlp_layer` is the one argument '
                     'to pass by hand.')
    return lines + ['']


def card_lineage(lineage):
    """What the model was distilled from (teachers and their weights' sha256, the student's
    initialisation, the tiles) and the recipe."""
    lines = ['## Distilled from', '',
             '| teacher | architecture | weights | sha256 | licence |', '|---|---|---|---|---|']
    for t in lineage['teachers']:
        lines.append(f"| {t['name']} | `{t['arch']}` | {t['weights']} | "
                     f"{t['sha256'] or 'random'} | {t.get('license') or 'see its card'} |")
    start, tiles = lineage.get('student'), lineage.get('tiles')
    lines.append('')
    if start:
        weights = f"weights {start['weights']}, sha256 {start['sha256']}"
        if start['sha256'] is None:
            weights = 'random weights'
        lines.append(f"- student initialisation: {start['name']} (`{start['arch']}`), {weights}")
    if tiles:
        lines.append(f"- tiles: {tiles['tiles']:,} tiles of {tiles['tile_size']} px at "
                     f"{', '.join(map(str, tiles['mpp']))} µm/px from {tiles['slides']} slides "
                     f"(`{tiles['folder']}`)")
    lines += ['', '## Recipe', '',
              "The student learns the teacher's embedding of the same augmented view of each "
              'tile, through a projection (Linear + BatchNorm) that is not part of this model.',
              '', '| setting | value |', '|---|---|']
    lines += [f'| {key} | {value} |' for key, value in lineage.get('recipe', {}).items()]
    return lines + ['']


def card_evaluation(evaluation, folder):
    """The G2L table evaluate.py printed (teacher, student before and after), or how to get it."""
    lines = ['## Evaluation', '']
    if evaluation is None:
        how = f'python evaluate.py --models TEACHER,STUDENT,local-dir:{folder}'
        return lines + ['Not evaluated: a run with `eval_data` set writes the G2L table here; '
                        f'or run `{how}`.', '']
    lines += [f"evaluate.py on `{evaluation['data']}`: the test split, 95% bootstrap CIs.", '']
    # the card's sections are level 2: evaluate.py's level tables become level 3
    for line in evaluation['table'].strip('\n').splitlines():
        lines.append('#' + line if line.startswith('## ') else line)
    return lines + ['']


def card_details(spec, lineage):
    """The model as timm builds it, its licence and what to cite."""
    # '‖', not '||': a bar would end the table's cell
    pooling = 'CLS token' if spec['pool'] == 'cls' else 'CLS ‖ mean of the patch tokens'
    licence = lineage.get('license') or 'other'
    params = f'{param_count(spec) / 1e6:.1f}M parameters'
    return ['## Model', '', '| | |', '|---|---|',
            f"| architecture | `{spec['arch']}` (timm), {params} |",
            f"| embedding | {spec['dim']}-d, {pooling} |",
            f"| input | {spec['img_size']} px, mean {spec['mean']}, std {spec['std']} |",
            f"| patch size, registers | {spec['patch_size']}, {spec['num_registers']} |", '',
            '## Licence', '',
            f'`{licence}`: check it against the terms of the teachers and the starting weights '
            'above before publishing.', '',
            '## Citation', '',
            'G2L: arXiv 2510.11176, <https://arxiv.org/abs/2510.11176>.', '']


# ---------------------------------------------------------------------- configuration

def check_config_value(config, key, value, origin):
    """value for config[key]; an unknown key or a type unlike the default's exits with one line."""
    if key not in config:
        close = difflib.get_close_matches(key, config, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ''
        raise SystemExit(f"error: unknown config key {key!r} from {origin}{hint}; "
                         f"known keys: {', '.join(config)}")
    default = config[key]
    # a None default takes anything
    if default is None or type(value) is type(default):
        return value
    # --lr=1 for a float default, and a list literal for a tuple default, mean what they say
    if type(default) is float and type(value) is int:
        return float(value)
    if type(default) is tuple and type(value) is list:
        return tuple(value)
    raise SystemExit(f"error: {key} from {origin} must be {type(default).__name__} "
                     f"like its default {default!r}, got {value!r} ({type(value).__name__})")


def read_config_file(config, path):
    """The settings a config .py file makes: its public names, each checked against config."""
    if not (path.endswith('.py') and os.path.isfile(path)):
        raise SystemExit(f"error: {path!r} is neither a config .py file nor --key=value")
    scope = {}
    exec(Path(path).read_text(), scope)
    settings = {}
    for key, value in scope.items():
        # not __builtins__, nor the modules and helper functions the file uses for itself
        is_helper = key.startswith('_') or callable(value) or type(value).__name__ == 'module'
        if not is_helper:
            settings[key] = check_config_value(config, key, value, path)
    return settings


def parse_config_value(config, key, raw):
    """--key=VALUE as a Python literal (1e-4, True, (1, 2)), or else the text itself."""
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        value = raw
    # --out_dir=2024 is the string '2024' when the default is a string
    if isinstance(config.get(key), str) and not isinstance(value, str):
        value = raw
    return value


def configure(config, argv):
    """nanoGPT-style overrides of `config` (the caller's defaults); returns the overrides.

    Each arg is a config .py file (its public names override) or --key=value / --key value,
    applied in order. Unknown keys and wrong types exit with one line.
    """
    overrides, i = {}, 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if not arg.startswith('--'):
            overrides.update(read_config_file(config, arg))
            continue
        key, sep, raw = arg[2:].partition('=')
        key = key.replace('-', '_')
        if not sep:
            # --key value, or a bare --flag for a bool
            if i < len(argv) and not argv[i].startswith('--'):
                raw, i = argv[i], i + 1
            elif isinstance(config.get(key), bool):
                raw = 'True'
            else:
                raise SystemExit(f"error: --{key} needs a value: --{key}=VALUE")
        value = parse_config_value(config, key, raw)
        overrides[key] = check_config_value(config, key, value, f'--{key}')
    return overrides


# ---------------------------------------------------------------------- command line

def print_table():
    print(f"{'name':<15} {'architecture':<32} {'params':>8} {'dim':>5} {'tokens':>6} "
          f"{'GFLOPs':>7}  weights")
    for name, spec in MODELS.items():
        params = param_count(spec)
        size = f"{params / 1e9:.2f}B" if params >= 1e9 else f"{params / 1e6:.1f}M"
        tokens = tokens_per_image(spec, 224)
        gflops = flops_per_image(spec, 224) / 1e9
        print(f"{name:<15} {spec['arch']:<32} {size:>8} {spec['dim']:>5} {tokens:>6} "
              f"{gflops:>7.1f}  {spec['weights']}")


if __name__ == '__main__':
    args = sys.argv[1:]
    if not args or args[0] in ('-h', '--help'):
        print(__doc__)
    elif args[0] == '--list':
        print_table()
    else:
        opts = dict(weights=None, device='cpu', batch=2)
        opts.update(configure(opts, args[1:]))
        vit, spec = create(args[0], weights=opts['weights'], device=opts['device'])
        shape = (opts['batch'], 3, 224, 224)
        images = torch.randint(0, 256, shape, dtype=torch.uint8, device=opts['device'])
        with torch.no_grad():
            pooled, patches = embed(vit, spec, images)
        print(f"{spec['name']}: {param_count(spec) / 1e6:.1f}M params, "
              f"pooled {tuple(pooled.shape)}, patch tokens {tuple(patches.shape)}")
