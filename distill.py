"""
G2L distillation: a frozen giga-scale teacher (H-optimus-0, ViT-g/14) teaches a large student
(Hibou-L, ViT-L/14) on tissue tiles of one cancer type (G2L, arXiv 2510.11176).

Run it:
  demo on a CPU (tiny random models, synthetic slides, ~2 minutes):
    torchrun --standalone --nproc_per_node=1 distill.py config/demo.py
  a committee of two teachers, each blind to half of the task, on a CPU (~3 minutes):
    torchrun --standalone --nproc_per_node=1 distill.py config/demo_committee.py
  one GPU:
    python distill.py config/g2l_brca.py
  one node, 8 GPUs:
    torchrun --standalone --nproc_per_node=8 distill.py config/g2l_brca.py
  two nodes (run on each; RDZV_HOST is node 0's address):
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=$RDZV_HOST:29500 \
        --rdzv-id=g2l distill.py config/g2l_brca.py
  speed only (random tiles, no data loading; the teacher computed, then replayed from a cache):
    python distill.py config/g2l_brca.py --bench=20
  the teacher's embeddings ahead of time (teacher only, 8 GPUs share the steps), then every run
  that uses the same folder replays them instead of running the teacher:
    torchrun --standalone --nproc_per_node=8 distill.py config/g2l_brca.py \
        --teacher_cache=/scratch/g2l_brca_teacher --teacher_only=True
    torchrun --standalone --nproc_per_node=8 distill.py config/g2l_brca.py \
        --teacher_cache=/scratch/g2l_brca_teacher
Any setting below can be overridden by a config file and then by --key=value.

One step: uint8 tiles -> the same random augmentation for both models, on the device -> teacher
forward (no grad; or its embedding replayed from teacher_cache) -> student forward -> Linear +
BatchNorm projection to the teacher's width -> loss -> backward -> clip -> fused AdamW. Teacher and
student each normalise with their own mean/std.
"""
import contextlib
import ctypes
import errno
import hashlib
import itertools
import json
import math
import os
import shutil
import signal
import sys
import tempfile
import time
import zlib
from contextlib import nullcontext
from types import SimpleNamespace

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import model as zoo
import tile

# -----------------------------------------------------------------------------
# defaults: the G2L recipe (arXiv 2510.11176); config/*.py and --key=value override them
# I/O
out_dir = 'out'  # checkpoints, log.jsonl, loss.png, the exported student (out_dir/student/)
# the model card's licence, a hub licence id (apache-2.0, cc-by-nc-4.0, ...): '' = the licence of
# the student's starting weights
license = ''
data_dir = 'tiles'  # a tiles folder written by tile.py
# after the export, evaluate.py on [teacher, student before, student after]: a labels CSV
# path,label,split[,center][,slide] or an ImageFolder root; results in out_dir/eval/
eval_data = ''
# demos only (config/demo*.py): what is missing of the demo's material is made on first use
synthetic_demo = 'g2l'  # 'g2l': three tissues, one teacher; 'committee': two teachers, each blind
synthetic_slides = 0  # write and tile this many synthetic slides into data_dir
synthetic_patches = 8  # labelled patches a slide of the patch set written for eval_data
demo_teacher_steps = 300  # train each demo teacher this long on its labels into teacher_weights
resume = False  # continue from out_dir/ckpt.pt (model, optimizer, step, data position, RNG)
log_interval = 10  # steps between log lines
eval_interval = 250  # steps between held-out teacher-student cosine measurements
ckpt_interval = 1000  # steps between checkpoints (one also at the end, on SIGTERM and Ctrl-C)
val_fraction = 0.02  # fraction of slides held out for the cosine measurement (at least one slide)
val_tiles = 512  # at most this many held-out tiles are embedded at each evaluation
# models: names from model.py --list, timm hub names (local-dir:FOLDER, hf-hub:USER/NAME), or a
# distilled output folder
# frozen; G2L's teacher. Or a committee, comma-separated (H-optimus-1,UNI2-h,Virchow2): one
# projection and one loss term per teacher (several teachers beat one: Pathryoshka, AM-RADIO)
teacher = 'H-optimus-0'
# each teacher's weights, comma-separated in teacher's order: '' (or an empty entry) = the
# model's default (the hub), 'random', or a local file/folder
teacher_weights = ''
# each teacher's share of the loss, comma-separated in teacher's order; '' = equal shares
teacher_loss_weights = ''
student = 'Hibou-L'  # trained; G2L's student
student_weights = ''  # G2L starts from the pretrained student (CKA 0.76 before, 0.97 after)
# data and augmentation: same view for teacher and student (G2L)
batch_size = 32  # per GPU micro-batch (G2L: 32)
grad_accum = 1  # micro-batches per optimizer step; global batch = batch_size * grad_accum * GPUs
crop_size = 224  # random crop of the 256 px tiles (G2L)
num_workers = 8  # DataLoader processes per GPU reading tiles through OpenSlide
# loss
loss = 'g2l'  # 'g2l': log sum_i |z_s W_p - z_t|_i^alpha (G2L); or 'cosine', 'mse', 'smooth_l1'
alpha = 4.0  # the exponent of the G2L loss
patch_weight = 0.0  # weight of an extra patch-token term (G2L uses only the final embedding)
# optimizer: AdamW with cosine schedules after a linear warm-up (G2L)
lr = 1e-4  # peak learning rate (G2L)
min_lr = 1e-6  # where the cosine ends
weight_decay = 0.05  # G2L
weight_decay_end = 0.05  # G2L says cosine-scheduled but gives no end value; raise it to anneal
beta1 = 0.9  # AdamW's defaults
beta2 = 0.999
grad_clip = 1.0  # 0 disables clipping
warmup_iters = 500  # linear warm-up of the learning rate
max_iters = 20000  # optimizer steps
lr_decay_iters = 0  # steps of the cosine; 0 means max_iters
early_stop = False  # G2L: stop once the loss exceeds its last-100 mean more than 10 times in a row
early_stop_window = 100  # the last-100 mean
early_stop_patience = 10  # more than 10 times in a row
max_nonfinite = 20  # consecutive non-finite steps that stop the run
# system: each speed trick is a switch, because compile + DDP + checkpointing has broken in
# several PyTorch releases; the defaults are the combination tested in test_smoke.py
device = 'auto'  # 'auto' (cuda if available), 'cuda', 'cpu'
compile = True  # torch.compile teacher and student (on CPU it costs a minute and gains little)
compile_backend = 'inductor'  # 'aot_eager' traces the same graphs, generates no kernels (tests)
grad_ckpt = True  # recompute student activations in backward: bigger batches, ~25% more compute
fused_adam = True  # the whole AdamW update in fused CUDA kernels
tf32 = True  # TF32 matmuls for what runs outside bf16 autocast
# 'auto': bf16 autocast on CUDA, float32 on CPU (where bf16 measured 3-4x slower); 'bf16': the
# CUDA path on any device, so a CPU test runs the step exactly as a GPU does; 'float32'
precision = 'auto'
teacher_bf16 = True  # with bf16: keep the frozen teachers' weights in bf16 (half their memory)
seed = 1337  # decides the held-out slides, tile order, augmentations and projection init
bench = 0  # >0: time this many steps on random tiles (no data loading) and exit
# teacher cache: the frozen teacher's embedding of every view is a function of (seed, step), so
# it can be stored once and replayed by every later run (sweeps pay the teacher once)
teacher_cache = ''  # a folder: replay the teacher embeddings stored there, store the missing ones
teacher_only = False  # fill teacher_cache for steps 0..max_iters (and the held-out set), then exit
fill_batch_size = 256  # teacher_only: tiles per teacher forward (no backward, so far more fit)
debug_nan_step = -1  # testing aid: poison the loss at this step to exercise the non-finite guard
debug_kill_write = -1  # testing aid: SIGKILL after writing this step's cache rows, before the marks
# -----------------------------------------------------------------------------
# every setting above is a config key: configure() checks overrides against their names and types
config_keys = [k for k, v in globals().items()
               if not k.startswith('_') and isinstance(v, (int, float, bool, str))]

# peak dense bf16 FLOP/s by a substring of torch.cuda.get_device_name() (vendor data sheets); the
# first match wins, so the more specific names ('H100 PCIe', 'L40S') come before their prefixes
PEAK_FLOPS = {
    'H100 PCIe': 756e12,
    'H100': 989e12,
    'H200': 989e12,
    'H800': 989e12,
    'B200': 2250e12,
    'A100': 312e12,
    'A800': 312e12,
    'L40S': 362e12,
    'L40': 181e12,
    'A6000': 155e12,
    'A40': 150e12,
    '4090': 165e12,
    'L4': 121e12,
    'A10': 125e12,
    'V100': 125e12,
}


# -----------------------------------------------------------------------------
# the augmentation: one random view per tile, shown to both teacher and student (G2L)

# bump whenever augment_params() or augment() change what a step's views are: a teacher cache
# records it and refuses runs of another version. test_smoke.py pins this version's views and
# fails until it is bumped
AUGMENT_VERSION = 1

def augment_params(n, step, tile_size, crop):
    """Per-sample augmentation parameters of one global batch of n tiles."""
    # drawn from (seed, step) alone: any number of GPUs sees the same views, and a resumed run
    # draws exactly what it would have
    rng = np.random.default_rng([seed, step])
    coin = lambda prob: torch.from_numpy(rng.random(n) < prob)
    uniform = lambda lo, hi: torch.from_numpy(rng.uniform(lo, hi, n)).float()
    crop_positions = tile_size - crop + 1
    return dict(
        # random crop of the tile (G2L: 256 px tiles, 224 px crops)
        y=torch.from_numpy(rng.integers(0, crop_positions, n)),
        x=torch.from_numpy(rng.integers(0, crop_positions, n)),
        # flips, p=0.5 each (G2L)
        hflip=coin(0.5),
        vflip=coin(0.5),
        # colour jitter with p=0.5: brightness 0.15, contrast 0.15, saturation 0.1, hue 0.05 (G2L)
        jitter=coin(0.5),
        brightness=uniform(0.85, 1.15),
        contrast=uniform(0.85, 1.15),
        saturation=uniform(0.9, 1.1),
        hue=uniform(-0.05, 0.05),
        # Gaussian blur with p=0.1 (G2L), sigma in torchvision's default range (0.1, 2.0)
        blur=coin(0.1),
        sigma=uniform(0.1, 2.0))


def augment(tiles, p, crop):
    """uint8 (B, 3, T, T) tiles -> float (B, 3, crop, crop) in [0, 1], the G2L augmentation done in
    batch on the device. p holds per-sample parameters drawn by augment_params()."""
    n = tiles.shape[0]
    # random crop, one gather: each sample's rows and columns
    window = torch.arange(crop, device=tiles.device)
    rows = p['y'][:, None] + window
    cols = p['x'][:, None] + window
    samples = torch.arange(n, device=tiles.device)[:, None, None]
    images = tiles[samples, :, rows[:, :, None], cols[:, None, :]]
    images = images.permute(0, 3, 1, 2).float().div_(255)
    # per-sample choices: the whole batch both ways, each sample keeps its own pick
    images = torch.where(p['hflip'][:, None, None, None], images.flip(3), images)
    images = torch.where(p['vflip'][:, None, None, None], images.flip(2), images)
    jittered = colour_jitter(images, p)
    images = torch.where(p['jitter'][:, None, None, None], jittered, images)
    return gaussian_blur(images, p)


def colour_jitter(images, p):
    """Brightness, contrast, saturation and hue of every image by its factors in p."""
    # torchvision's definitions but a fixed order; hue is a rotation about the grey axis (the YIQ
    # approximation of an HSV hue shift), so the whole jitter is a few batched tensor ops
    brightness = p['brightness'][:, None, None, None]
    contrast = p['contrast'][:, None, None, None]
    saturation = p['saturation'][:, None, None, None]
    jittered = (images * brightness).clamp(0, 1)
    mean_grey = grey(jittered).mean((2, 3), keepdim=True)
    jittered = ((jittered - mean_grey) * contrast + mean_grey).clamp(0, 1)
    pixel_grey = grey(jittered)
    jittered = ((jittered - pixel_grey) * saturation + pixel_grey).clamp(0, 1)
    rotations = hue_matrices(p['hue'])
    return torch.einsum('bij,bjhw->bihw', rotations, jittered).clamp(0, 1)


def grey(images):
    """(B, 3, H, W) RGB -> (B, 1, H, W) luma, with the ITU-R 601 weights torchvision uses."""
    return (0.299 * images[:, 0] + 0.587 * images[:, 1] + 0.114 * images[:, 2]).unsqueeze(1)


def hue_matrices(hue):
    """(B,) hue shifts in turns -> (B, 3, 3) RGB rotation matrices about the grey axis (YIQ)."""
    # RGB -> YIQ: the hue shift rotates the I-Q plane and leaves the luma Y as it is
    to_yiq = torch.tensor([[0.299, 0.587, 0.114],
                           [0.596, -0.274, -0.322],
                           [0.211, -0.523, 0.312]], device=hue.device)
    angle = 2 * math.pi * hue
    c, s = torch.cos(angle), torch.sin(angle)
    rot = torch.zeros(len(hue), 3, 3, device=hue.device)
    rot[:, 0, 0] = 1
    rot[:, 1, 1], rot[:, 1, 2] = c, -s
    rot[:, 2, 1], rot[:, 2, 2] = s, c
    return torch.linalg.inv(to_yiq) @ rot @ to_yiq


def gaussian_blur(images, p):
    """The images that p['blur'] picks, blurred by a 9x9 Gaussian of their own sigma (G2L)."""
    idx = p['blur'].nonzero().flatten()
    if not len(idx):
        return images
    n, h, w = len(idx), images.shape[2], images.shape[3]
    taps = torch.arange(9, device=images.device) - 4.0
    kernels = torch.exp(-0.5 * taps[None] ** 2 / p['sigma'][idx, None] ** 2)
    # (n*3, 9): normalised, one kernel per channel of each picked image
    kernels = (kernels / kernels.sum(1, keepdim=True)).repeat_interleave(3, 0)
    blurred = F.pad(images[idx].reshape(1, n * 3, h, w), (4, 4, 4, 4), mode='reflect')
    # separable: rows then columns, each channel its own group
    blurred = F.conv2d(blurred, kernels[:, None, None, :], groups=n * 3)
    blurred = F.conv2d(blurred, kernels[:, None, :, None], groups=n * 3)
    return images.index_copy(0, idx, blurred.reshape(n, 3, h, w))


# -----------------------------------------------------------------------------
# the loss: the student's projected embedding against each teacher's

def distance(s, t):
    """Per-row distance between student (projected) and teacher features, averaged over rows."""
    # in fp32: |d|^4 over 1536 dims under- and overflows in bf16
    s, t = s.float(), t.float()
    if loss == 'g2l':
        # D = log sum_i |d_i|^alpha, written as alpha * log ||d||_alpha (the same number, stabler)
        norm = torch.linalg.vector_norm(s - t, ord=alpha, dim=-1)
        return (alpha * torch.log(norm)).mean()
    if loss == 'cosine':
        return (1 - F.cosine_similarity(s, t, dim=-1)).mean()
    if loss == 'mse':
        return F.mse_loss(s, t)
    if loss == 'smooth_l1':
        return F.smooth_l1_loss(s, t)
    raise SystemExit(f"error: unknown loss '{loss}'; use g2l, cosine, mse or smooth_l1")


class Student(nn.Module):
    """The student backbone plus the heads distillation adds, one per teacher; only the backbone
    is exported. The heads' details stay here: the loop and the held-out measure use its methods
    only."""

    def __init__(self, backbone, spec, teacher_specs):
        super().__init__()
        self.backbone, self.spec = backbone, spec
        # G2L's projection to a teacher's embedding width, one per teacher (RADIO's adaptor
        # heads): Linear + BatchNorm. No bias before BatchNorm: BN removes any shift, so the bias
        # would get no gradient
        self.heads = nn.ModuleList(projection(spec['dim'], t['dim']) for t in teacher_specs)
        # a Linear on the patch tokens per teacher, only for the patch term (patch_weight > 0)
        self.patch_heads = None
        if patch_weight > 0:
            self.patch_heads = nn.ModuleList(nn.Linear(spec['width'], t['width'])
                                             for t in teacher_specs)

    def forward(self, images):
        """The student's embedding projected to each teacher's width, and its patch tokens
        projected likewise (None without the patch term)."""
        pooled, patches = zoo.embed(self.backbone, self.spec, images)
        projected = [head(pooled) for head in self.heads]
        if self.patch_heads is None:
            return projected, None
        return projected, [head(patches) for head in self.patch_heads]

    def head_statistics(self):
        """A copy of the heads' running statistics (the projections' BatchNorm)."""
        # a non-finite forward poisons them: the loop puts this copy back after such a step
        return {name: buffer.clone() for name, buffer in self.heads.named_buffers()}

    def restore_head_statistics(self, saved):
        for name, buffer in self.heads.named_buffers():
            buffer.copy_(saved[name])

    def held_out_cosines(self, held_out, autocast):
        """The mean cosine of the projected student embedding to each teacher's, over held_out:
        batches of (centre crops, [each teacher's embeddings]); None without any."""
        if not held_out:
            return None
        self.eval()
        cosines = []
        with torch.no_grad(), autocast:
            pooled = [zoo.embed(self.backbone, self.spec, crops)[0] for crops, _ in held_out]
            for k, (linear, bn) in enumerate(self.heads):
                projected = torch.cat([linear(p) for p in pooled]).float()
                # the projection's BatchNorm normalises with the held-out set's own statistics
                # ("precise BN"): its running averages (momentum 0.1) lag a projection that is
                # still moving, and measured in eval mode the demo's cosine swung between -0.11
                # and 0.43 while this measure rose steadily. The projection is discarded after
                # training, so the measure is of the student's features, not of that lag
                projected = F.batch_norm(projected, None, None, bn.weight, bn.bias,
                                         training=True, eps=bn.eps)
                t_pooled = torch.cat([targets[k] for _, targets in held_out])
                cosines.append(F.cosine_similarity(projected, t_pooled).mean().item())
        self.train()
        return cosines


def projection(width, teacher_width):
    return nn.Sequential(nn.Linear(width, teacher_width, bias=False),
                         nn.BatchNorm1d(teacher_width))


def weighted_mean(values, shares):
    """The loss of a committee: each teacher's term by its share of the loss."""
    return sum(share * value for share, value in zip(shares, values)) / sum(shares)


def cosine(s_pooled, t_pooled):
    """The mean teacher-student cosine of a batch: a health signal in the log, not a loss."""
    return F.cosine_similarity(s_pooled.detach().float(), t_pooled.float()).mean()


def patch_distance(s_patches, t_patches):
    """Patch-token term; the student's grid is resized to the teacher's when patch sizes differ."""
    s_grid, t_grid = math.isqrt(s_patches.shape[1]), math.isqrt(t_patches.shape[1])
    if s_grid != t_grid:
        grid = s_patches.transpose(1, 2).reshape(len(s_patches), -1, s_grid, s_grid)
        resized = F.interpolate(grid.float(), size=(t_grid, t_grid), mode='bilinear')
        s_patches = resized.flatten(2).transpose(1, 2)
    return distance(s_patches.flatten(0, 1), t_patches.flatten(0, 1))


# -----------------------------------------------------------------------------
# the teachers' targets: one seam per teacher, whether the frozen teacher computes them or a
# teacher cache replays what it computed before (the cache's code is below the run)

class Teacher:
    """What the loop asks of a frozen teacher: its embeddings of a micro-batch's views and of the
    held-out crops. The loop never knows whether they are computed or replayed."""

    def __init__(self, spec, model, cache):
        self.spec, self.model, self.cache = spec, model, cache
        # None when a teacher cache holds all that the run needs: the teacher is never loaded
        self.embed = compile_teacher(model, spec) if model is not None else None
        # the images the teacher really ran on: MFU counts only their FLOPs
        self.images_run = 0

    def targets(self, images, step, first):
        """(pooled embeddings, patch tokens) of `images`, rows first.. of `step`'s global batch."""
        if self.cache is not None:
            return replay_targets(self, images, step, first)
        return self.compute(images)

    def compute(self, images):
        self.images_run += len(images)
        # no_grad, not inference_mode: its tensors cannot enter the student's graph
        with torch.no_grad():
            return self.embed(images)

    def held_out_targets(self, crops, val_idx, autocast):
        """The teacher's pooled embeddings (float32) of the held-out crops, batched like crops."""
        stored = read_held_out(self.cache, val_idx, crops)
        if stored is not None:
            return stored
        # uncompiled: the held-out batches have other sizes than a step's
        with torch.no_grad(), autocast:
            targets = [zoo.embed(self.model, self.spec, c)[0].float() for c in crops]
        write_held_out(self.cache, val_idx, targets)
        return targets


def start_teachers(sources, caches, step, env):
    """The teacher seams of a run from `step` on, one per teacher. A teacher is loaded here,
    before the first step and on every rank, unless its teacher cache holds every step still to
    run and the held-out set; never later: a giga teacher's download and compile on one rank,
    mid-run, would keep the others waiting in their all-reduce past its timeout."""
    teachers = []
    for k, ((spec, weights), cache) in enumerate(zip(sources, caches)):
        t_model = None
        if cache is None or cache_lacks(cache, step, teacher_name(k, spec, len(sources)), env):
            t_model = load_teacher(spec, weights, env)
        teachers.append(Teacher(spec, t_model, cache))
    return teachers


def load_teacher(spec, weights, env):
    """A frozen teacher on the device, its weights in bf16 with bf16 precision (teacher_bf16)."""
    # in a forked RNG: loading a teacher leaves the training's random stream as it was
    cuda_devices = [env.device] if env.use_cuda else []
    with torch.random.fork_rng(devices=cuda_devices):
        t_model, _ = zoo.create(spec, weights, device=env.device)
    t_model.requires_grad_(False)
    return t_model.to(teacher_dtype(env))


def committee():
    """The teachers as configured: [(name, weights, share of the loss)] in the order given;
    weights '' means the model's default."""
    names = teacher.split(',')
    # one teacher: its weights are the whole setting, a path with a comma included
    weights = teacher_weights.split(',') if len(names) > 1 else [teacher_weights]
    weights = weights if teacher_weights else [''] * len(names)
    shares = teacher_loss_weights.split(',') if teacher_loss_weights else ['1'] * len(names)
    if len(weights) != len(names) or len(shares) != len(names):
        raise SystemExit(f'error: {len(names)} teachers ({teacher}) but {len(weights)} '
                         f'teacher_weights and {len(shares)} teacher_loss_weights: give one '
                         "entry per teacher, comma-separated ('' entries for the defaults)")
    try:
        shares = [float(s) for s in shares]
    except ValueError:
        shares = [-1.0]
    if min(shares) <= 0:
        raise SystemExit(f'error: teacher_loss_weights={teacher_loss_weights!r}: give a '
                         'positive number per teacher, e.g. 1,1,2')
    members = list(zip(names, weights))
    twice = [m for m in members if members.count(m) > 1]
    if twice:
        raise SystemExit(f'error: teacher {twice[0][0]} is in the committee twice with the same '
                         'weights: give each teacher once, or other weights')
    return [(name, weights, share) for (name, weights), share in zip(members, shares)]


def teacher_sources():
    """Each teacher's (spec, weights) as model.create resolves them, nothing built: the spec of
    its model.py row or of a folder's config.json (or an older export's student.json); weights
    'random', 'hub' or a local path."""
    # --bench times random weights unless told otherwise: speed does not depend on them
    default_weights = 'random' if bench else None
    return [zoo.resolve(name, weights or default_weights) for name, weights, _ in committee()]


def teacher_name(k, spec, n_teachers):
    """How a line names teacher k: 'the teacher' alone, 'teacher 2 (UNI2-h)' in a committee."""
    return 'the teacher' if n_teachers == 1 else f"teacher {k + 1} ({spec['name']})"


def teacher_dtype(env):
    """The frozen teachers' weights: bf16 with bf16 precision and teacher_bf16, else float32 (the
    cache's key names it: bf16 weights give other embeddings than float32 ones, even under
    autocast)."""
    return torch.bfloat16 if env.bf16 and teacher_bf16 else torch.float32


def compile_teacher(t_model, t_spec):
    """The function the step calls to run a teacher: model.embed, compiled if `compile`."""
    # the teacher is compiled as the function it runs (model.embed): torch.compile(module) would
    # only compile its __call__
    teacher_embed = lambda images: zoo.embed(t_model, t_spec, images)
    if compile:
        teacher_embed = torch.compile(teacher_embed, backend=compile_backend)
    return teacher_embed


# -----------------------------------------------------------------------------
# the schedules and the order of the tiles

def schedule(step, start, end, warmup=0, total=None):
    """Linear warm-up to `start` over `warmup` steps, then a cosine from `start` to `end` that
    ends at step `total` (default lr_decay_iters, or max_iters) and stays there."""
    if step < warmup:
        return start * (step + 1) / warmup
    total = total or lr_decay_iters or max_iters
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return end + 0.5 * (1 + math.cos(math.pi * t)) * (start - end)


def batches(n_tiles, start_step, rank, world, rng_seed):
    """Endless lists of tile indices for this rank, one per micro-batch, from start_step on."""
    # each (micro-step, rank) takes its slice of the step's global batch
    global_batch = batch_size * grad_accum * world
    steps = itertools.count(start_step)
    for _, chunk in global_batches(n_tiles, steps, global_batch, rng_seed):
        for micro in range(grad_accum):
            k = micro * world + rank
            yield chunk[k * batch_size:(k + 1) * batch_size].tolist()


def global_batches(n_tiles, steps, global_batch, rng_seed):
    """(step, the tile indices of its global batch) for each of the increasing `steps`."""
    # epoch e is a permutation seeded by (seed, e); each step takes the next global batch. The
    # position is a function of the step, so resuming at step s reads exactly the tiles s would
    # have read, and a teacher cache can be filled for any step in any order
    per_epoch = n_tiles // global_batch
    order_epoch = None
    for step in steps:
        epoch, b = divmod(step, per_epoch)
        # once per epoch: permuting ~10M tiles takes a good part of a second
        if epoch != order_epoch:
            order = np.random.default_rng([rng_seed, epoch]).permutation(n_tiles)
            order_epoch = epoch
        yield step, order[b * global_batch:(b + 1) * global_batch]


# -----------------------------------------------------------------------------
# the run: main() is the table of contents, the stages follow in the order it calls them

def main():
    # temporaries last written before now are no live run's (tile.remove_stale_temporaries)
    started = time.time()
    # config: module defaults < config file < --key=value, each setting checked before any work
    config = read_config(sys.argv[1:])
    check_settings()
    # DDP: where this process runs
    env = start_processes()
    global_batch = batch_size * grad_accum * env.world
    if env.master:
        print(json.dumps(config))
        print(f'global batch {global_batch} = {batch_size} per GPU x {grad_accum} accumulation '
              f'x {env.world} processes')

    # the demo's material, made once (config/demo.py): synthetic slides, tiled; a labelled patch
    # set; a teacher that knows their tissues
    if synthetic_slides and not bench:
        from demo import material
        material.prepare(config, env.master)
        # the other ranks wait for all of it
        if env.ddp:
            dist.barrier()
    if eval_data and not bench and not teacher_only:
        check_eval_data()

    # data: this run's training tiles and the held-out ones (--bench reads none)
    tiles = train_idx = val_idx = None
    if not bench:
        tiles, train_idx, val_idx = split_tiles(global_batch, env)

    # one run at a time writes into out_dir: the master holds its lock until the run ends, and a
    # run that finds another one there stops in one line, every process with it
    with own_out_dir(env, started):
        distil(env, tiles, train_idx, val_idx, global_batch)


def distil(env, tiles, train_idx, val_idx, global_batch):
    """The run itself: the teachers' targets, computed or replayed from teacher_cache; the student;
    the loop; the last checkpoint; the export and the G2L table."""
    # the teacher cache, a folder per teacher, checked against what it was made from before
    # any model is built; --teacher_only fills what it lacks and stops there
    sources = teacher_sources()
    caches = [None] * len(sources)
    if teacher_cache and not bench:
        caches = open_teacher_cache(tiles, train_idx, val_idx, sources, global_batch, env)
    if teacher_only:
        fill_teacher_cache(caches, sources, tiles, train_idx, val_idx, global_batch, env)
        finish(env.ddp)
        return

    # the student, its optimizer and the teachers, resumed from out_dir/ckpt.pt with --resume=True
    run, step = build_run(sources, caches, env)
    if bench:
        run_bench(run)
        finish(env.ddp)
        return

    # the loop, until max_iters, an early stop, too many non-finite losses, or pre-emption
    tile_batches = read_tile_batches(tiles, train_idx, step, env)
    held_out = embed_held_out(tiles, val_idx, run.teachers, env) if env.master else []
    log_file = open_log(step, run, held_out)
    step, why, preempted_by = train(run, step, max_iters, tile_batches, tiles.tile_size, held_out,
                                    log_file)

    # the end: every rank takes part in the last checkpoint (it gathers their RNG states); after
    # it a signal stops the run at once again (the export, the evaluation)
    save_checkpoint(run, step)
    release_signals()
    exports = env.master and not preempted_by
    lineage = model_lineage(tiles, train_idx, step, global_batch) if exports else None
    finish_run(run, step, why, preempted_by, log_file, lineage)
    # G2L's evidence, once the processes are done (an evaluation outlasts any collective's
    # timeout): the models trained here are freed first, evaluate.py loads its own
    if exports and eval_data:
        del run, held_out
        evaluate_g2l(env, lineage)
    # not finished: a non-zero status (128 + signal, the shell's convention) says so
    if preempted_by:
        raise SystemExit(128 + preempted_by)


def read_config(argv):
    """Override the settings' globals by config files and --key=value; the effective config."""
    globals().update(zoo.configure(effective_config(), argv))
    return effective_config()


def effective_config():
    """The settings this run uses, as printed at the start and saved with every checkpoint."""
    return {k: globals()[k] for k in config_keys}


# what each number must be: a zero batch, a negative lr or a NaN stops the run in one line before
# any work, not in a traceback minutes into it (or, as a negative max_iters did, in a run that
# trains nothing and exits 0)
NUMBER_RULES = {
    'at least 1': (lambda v: v >= 1, (
        'batch_size', 'grad_accum', 'crop_size', 'log_interval', 'eval_interval', 'ckpt_interval',
        'early_stop_window', 'max_nonfinite', 'fill_batch_size', 'synthetic_patches')),
    '0 or more': (lambda v: v >= 0, (
        'max_iters', 'warmup_iters', 'lr_decay_iters', 'val_tiles', 'num_workers', 'bench', 'seed',
        'lr', 'min_lr', 'weight_decay', 'weight_decay_end', 'grad_clip', 'patch_weight',
        'early_stop_patience', 'synthetic_slides', 'demo_teacher_steps')),
    'above 0': (lambda v: v > 0, ('alpha',)),
    'from 0 to below 1': (lambda v: 0 <= v < 1, ('val_fraction', 'beta1', 'beta2')),
}


def check_settings():
    """One line, before any work, for a number no run can use or settings that cannot go
    together."""
    for must_be, (holds, names) in NUMBER_RULES.items():
        for name in names:
            value = globals()[name]
            # NaN and infinity hold no rule
            if not (math.isfinite(value) and holds(value)):
                raise SystemExit(f'error: --{name}={value}: {name} must be {must_be}')
    # the committee's lists, checked before anything is made
    committee()
    if teacher_only and (bench or not teacher_cache):
        raise SystemExit('error: --teacher_only=True fills a teacher cache: pass '
                         '--teacher_cache=<folder>, and no --bench')
    # the patch term needs the teacher's patch tokens: 256 x 1536 bf16 values, 786 KB a tile,
    # 12 TB for g2l_brca's 60K steps x 256 tiles; not worth storing
    if teacher_cache and patch_weight > 0 and not bench:
        raise SystemExit('error: teacher_cache stores only the teacher\'s pooled embedding and '
                         'patch_weight > 0 needs its patch tokens: set patch_weight=0 or '
                         "teacher_cache=''")


def start_processes():
    """Where this process runs: rank, world size, device, precision, the device's peak FLOP/s."""
    use_cuda = device == 'cuda' or (device == 'auto' and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise SystemExit('error: device=cuda but PyTorch sees no GPU; check nvidia-smi and the '
                         'torch build, or use --device=cpu')
    # DDP is detected from torchrun's environment; one process per GPU (or per CPU process, gloo)
    ddp = int(os.environ.get('RANK', -1)) != -1
    if ddp:
        dist.init_process_group('nccl' if use_cuda else 'gloo')
        rank, world = dist.get_rank(), dist.get_world_size()
        local_rank = int(os.environ['LOCAL_RANK'])
    else:
        rank, local_rank, world = 0, 0, 1
    dev = torch.device(f'cuda:{local_rank}' if use_cuda else 'cpu')
    peak = None
    if use_cuda:
        torch.cuda.set_device(dev)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32
        gpu_name = torch.cuda.get_device_name(dev)
        peak = next((flops for name, flops in PEAK_FLOPS.items() if name in gpu_name), None)
    # precision lives here: bf16 autocast on CUDA; float32 on CPU, where bf16 measured 3-4x
    # slower (precision='bf16' runs the CUDA path there too, for tests)
    if precision not in ('auto', 'bf16', 'float32'):
        raise SystemExit(f"error: precision={precision!r}: use auto, bf16 or float32")
    bf16 = precision == 'bf16' or (precision == 'auto' and use_cuda)
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16) if bf16 else nullcontext()
    return SimpleNamespace(ddp=ddp, rank=rank, local_rank=local_rank, world=world,
                           master=rank == 0, use_cuda=use_cuda, device=dev, bf16=bf16,
                           autocast=autocast, peak_flops=peak)


def split_tiles(global_batch, env):
    """The tiles folder, its training tile indices and the held-out tile indices measured."""
    try:
        tiles = tile.TileDataset(data_dir)
    except ValueError as e:
        # no tiles, slides moved or changed since tiling: its message says what to do
        raise SystemExit(f'error: {e}') from None
    if crop_size > tiles.tile_size:
        raise SystemExit(f'error: crop_size {crop_size} is larger than the {tiles.tile_size} px '
                         f'tiles in {data_dir}')
    # held-out slides drawn at random (seeded): sorted names would hold out one site of a TCGA
    # cohort; the measured tiles are a random sample across all of them
    rng = np.random.default_rng(seed)
    n_slides = len(tiles.stems)
    n_held_out = max(1, round(val_fraction * n_slides))
    held_out_slides = rng.permutation(n_slides)[:n_held_out]
    # a single slide trains and nothing is held out
    is_val = np.zeros(len(tiles), bool)
    if n_slides > 1:
        is_val = np.isin(tiles.slide_index, held_out_slides)
    val_idx = np.sort(rng.permutation(np.flatnonzero(is_val))[:val_tiles])
    train_idx = np.flatnonzero(~is_val)
    if len(train_idx) < global_batch:
        raise SystemExit(f'error: {len(train_idx)} training tiles in {data_dir}, fewer than the '
                         f'global batch {global_batch}')
    if env.master:
        train_slides = len(np.unique(tiles.slide_index[train_idx]))
        print(f'{len(train_idx)} training tiles from {train_slides} slides, '
              f'{len(val_idx)} held-out tiles measured')
    return tiles, train_idx, val_idx


@contextlib.contextmanager
def own_out_dir(env, started):
    """Hold out_dir for this run while the block runs: the master takes its writers' lock
    (tile.one_writer; a dead run's lock is taken over) and checks what is there; an error line
    stops every process. --bench and --teacher_only write nothing there."""
    if bench or teacher_only:
        yield
        return
    with contextlib.ExitStack() as held:
        problem = None
        if env.master:
            try:
                tile.make_out_folder(out_dir, '--out_dir')
                held.enter_context(tile.one_writer(out_dir, 'distill', flag='--out_dir'))
                check_out_dir()
            except SystemExit as refusal:
                problem = str(refusal)
        master_decides([problem], env)
        if env.master:
            tile.remove_stale_temporaries(out_dir, started)
        yield


def check_out_dir():
    """One line for what out_dir holds that this run cannot go on from: a checkpoint that it
    would overwrite (without --resume=True), a log.jsonl that it cannot read."""
    if os.path.exists(checkpoint_path()) and not resume:
        raise SystemExit(f'error: {checkpoint_path()} exists; pass --resume=True to continue it '
                         'or choose another out_dir')
    log_path = os.path.join(out_dir, 'log.jsonl')
    if os.path.exists(log_path):
        read_log(log_path)


def master_decides(verdict, env):
    """The master's verdict on every process: [an error line or None, what goes with it]. An
    error line stops them all, the master saying why, so that none waits for a master that
    stopped."""
    if env.ddp:
        dist.broadcast_object_list(verdict)
    if verdict[0]:
        finish(env.ddp)
        raise SystemExit(verdict[0] if env.master else 1)
    return verdict


def checkpoint_path():
    return os.path.join(out_dir, 'ckpt.pt')


def build_run(sources, caches, env):
    """The models of the run and the step it starts at, in the deliberate order: the student with
    its projections -> the optimizer -> their state from a checkpoint (freed on return) -> the
    teachers -> DDP -> compile. The raw student is kept for saving and measuring."""
    t_specs = [spec for spec, _ in sources]
    raw_student = build_student(t_specs, env)
    optimizer = build_optimizer(raw_student)
    step, state = 0, dict(recent=[], above=0, nonfinite=0, skipped=0)
    if resume and not bench and os.path.exists(checkpoint_path()):
        step, state = load_checkpoint(checkpoint_path(), raw_student, optimizer, env)
    else:
        # each rank its own torch random stream; a resumed run restores the saved ones instead
        torch.manual_seed(seed + env.rank)
    # the teacher seams: each frozen teacher, or teacher_cache's replay of it
    teachers = start_teachers(sources, caches, step, env)
    # DDP first, then compile: the compiler then splits the student's graph at DDP's gradient
    # buckets so their all-reduce overlaps the backward
    student_ddp = None
    if env.ddp:
        student_ddp = DDP(raw_student, device_ids=[env.local_rank] if env.use_cuda else None)
    forward = student_ddp or raw_student
    if compile:
        forward = torch.compile(forward, backend=compile_backend)
    shares = [share for _, _, share in committee()]
    run = SimpleNamespace(student=raw_student, forward=forward, ddp=student_ddp,
                          teachers=teachers, shares=shares, optimizer=optimizer, state=state,
                          env=env)
    return run, step


def build_student(t_specs, env):
    """The student with its projection to each teacher's width, on the device."""
    # --bench times random weights unless told otherwise: speed does not depend on them
    default_weights = 'random' if bench else None
    s_backbone, s_spec = zoo.create(student, student_weights or default_weights, device=env.device)
    sizes = [t['img_size'] for t in t_specs] + [s_spec['img_size']]
    if set(sizes) != {crop_size}:
        raise SystemExit(f"error: crop_size {crop_size} must equal every model's input size "
                         f"({', '.join(map(str, sizes))})")
    # the same projection init on every rank and for any world size
    torch.manual_seed(seed)
    raw_student = Student(s_backbone, s_spec, t_specs).to(env.device).train()
    s_backbone.set_grad_checkpointing(grad_ckpt)
    if env.master:
        teachers = ', '.join(f"{t['name']} {zoo.param_count(t) / 1e6:.0f}M" for t in t_specs)
        s_params = zoo.param_count(s_spec) / 1e6
        gflops = step_flops(t_specs, s_spec) / 1e9
        print(f"teacher {teachers}, student {s_spec['name']} {s_params:.0f}M, "
              f"{gflops:.1f} GFLOP per image per step")
    return raw_student


def step_flops(t_specs, s_spec, teacher_shares=None):
    """FLOPs of one image in one step: each teacher's forward (for the share of images it ran on;
    a teacher cache replays the rest), the student's forward + backward."""
    teacher_shares = teacher_shares or [1.0] * len(t_specs)
    t_flops = sum(share * zoo.flops_per_image(t, crop_size)
                  for t, share in zip(t_specs, teacher_shares))
    # fwd + bwd = 3x fwd: the backward costs about twice the forward
    return t_flops + 3 * zoo.flops_per_image(s_spec, crop_size)


def build_optimizer(raw_student):
    """AdamW over the student and its projection, in two groups: decayed and not."""
    # no weight decay on norms, biases, class/register tokens and position embeddings
    decay, no_decay = [], []
    for name, p in raw_student.named_parameters():
        is_token = any(s in name for s in ('pos_embed', 'cls_token', 'reg_token'))
        if p.ndim < 2 or is_token:
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [dict(params=decay, weight_decay=weight_decay),
              dict(params=no_decay, weight_decay=0.0)]
    return torch.optim.AdamW(groups, lr=lr, betas=(beta1, beta2), fused=fused_adam)


# the settings a resumed run must share with its checkpoint: the models (the teacher's weights
# too), the loss, and which tiles train and how each step's views are cut (val_fraction decides
# the training tiles; the order and the views follow from the seed and the global batch)
RESUME_KEYS = ('teacher', 'teacher_weights', 'teacher_loss_weights', 'student', 'loss', 'alpha',
               'patch_weight', 'data_dir', 'val_fraction', 'crop_size', 'batch_size',
               'grad_accum', 'seed')


def load_checkpoint(path, raw_student, optimizer, env):
    """Student, optimizer and this rank's RNG from a checkpoint; returns its step and loss state."""
    try:
        ckpt = torch.load(path, map_location='cpu', weights_only=False)
    except Exception:
        ckpt = None
    # save_atomic never leaves half a checkpoint: this one was cut short or changed elsewhere
    if not isinstance(ckpt, dict) or 'config' not in ckpt:
        raise SystemExit(f'error: {path} cannot be read (truncated, or not a distill.py '
                         'checkpoint): restore it from a copy, or start afresh in another out_dir')
    # what decides the models, the loss and the tiles and views of each step must match, or the
    # resumed run would silently be another run; a key an older checkpoint lacks differs too
    config = effective_config()
    for k in RESUME_KEYS:
        made_with = ckpt['config'].get(k)
        if made_with != config[k]:
            raise SystemExit(f"error: --{k}={config[k]!r} differs from the checkpoint's "
                             f"{made_with!r}: resume with its value, or choose another out_dir")
    if ckpt['world'] != env.world:
        raise SystemExit(f"error: the checkpoint ran on {ckpt['world']} processes; "
                         "resume on the same number")
    try:
        raw_student.load_state_dict(ckpt['student'])
    except RuntimeError as e:
        # a checkpoint of another student or projection layout: PyTorch's first mismatch
        mismatch = str(e).splitlines()[1].strip()
        raise SystemExit(f"error: {path} does not fit this student: {mismatch}") from None
    optimizer.load_state_dict(ckpt['optimizer'])
    torch.set_rng_state(ckpt['rng'][env.rank])
    if env.master:
        print(f"resumed from {path} at step {ckpt['step']}")
    # returning frees the checkpoint's memory before compiling
    return ckpt['step'], ckpt['state']


def read_tile_batches(tiles, train_idx, step, env):
    """This rank's micro-batches of uint8 training tiles from `step` on, read by loader workers."""
    order = batches(len(train_idx), step, env.rank, env.world, seed)
    return iter(tile_loader(tiles, train_idx, order, env))


def tile_loader(tiles, train_idx, order, env):
    """A DataLoader of uint8 training tiles in the batches of `order` (index lists into
    train_idx)."""
    # tiles arrive as uint8 from workers (pinned, prefetched); every random choice is made on the
    # device
    return torch.utils.data.DataLoader(
        torch.utils.data.Subset(tiles, train_idx), batch_sampler=order,
        num_workers=num_workers, pin_memory=env.use_cuda, persistent_workers=num_workers > 0,
        prefetch_factor=4 if num_workers else None, worker_init_fn=ignore_stop_signals)


def ignore_stop_signals(worker_id):
    # on pre-emption the scheduler may signal every process, and Ctrl-C reaches the whole process
    # group; loader workers must outlive the main process's last step and checkpoint, so only the
    # main process reacts
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def embed_held_out(tiles, val_idx, teachers, env):
    """The held-out tiles as batches of (uint8 centre crops, [each teacher's embeddings]) on the
    device."""
    # read and embedded once: the teacher is frozen
    if not len(val_idx):
        return []
    start = (tiles.tile_size - crop_size) // 2
    centre = slice(start, start + crop_size)
    n_batches = math.ceil(len(val_idx) / batch_size)
    crops = []
    for chunk in np.array_split(val_idx, n_batches):
        crops.append(torch.stack([tiles[i] for i in chunk]).to(env.device)[:, :, centre, centre])
    targets = [t.held_out_targets(crops, val_idx, env.autocast) for t in teachers]
    return list(zip(crops, zip(*targets)))


def open_log(step, run, held_out):
    """The master's out_dir/log.jsonl to append to (None on other ranks), without what a killed
    run wrote after its checkpoint; a run from step 0 starts it with the held-out cosine."""
    if not run.env.master:
        return None
    log_path = os.path.join(out_dir, 'log.jsonl')
    trim_log(log_path, step)
    log_file = open(log_path, 'a')
    start_cosines = run.student.held_out_cosines(held_out, run.env.autocast) if step == 0 else None
    if start_cosines is not None:
        row = dict(step=0) | held_out_fields(start_cosines)
        print(f"step 0: held-out teacher-student cosine {row['val_cosine']:.4f}")
        log_file.write(json.dumps(row) + '\n')
    return log_file


def trim_log(path, step):
    """On resume, drop log lines the killed run wrote after its last checkpoint (atomically)."""
    if not os.path.exists(path):
        return
    rows = [line for line, row in read_log(path) if row['step'] <= step]
    tile.save_atomic(path, lambda f: f.write(''.join(rows).encode()))


def read_log(path):
    """A log.jsonl's lines with their rows, less a last line cut short (a kill or a full disk
    mid-write, after the last checkpoint). SystemExit, one line, for a file that cannot be read
    or a line that is no log row: the run appends to it, and drops nothing it cannot read."""
    advice = 'move it aside (or delete that line), then rerun'
    try:
        with open(path, 'rb') as f:
            lines = f.read().decode().splitlines(keepends=True)
    except (OSError, UnicodeDecodeError) as e:
        why = e.strerror if isinstance(e, OSError) else 'not text'
        raise SystemExit(f'error: {path} cannot be read ({why}): {advice}') from None
    if lines and not lines[-1].endswith('\n'):
        lines.pop()
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if not isinstance(row, dict) or not isinstance(row.get('step'), int):
            raise SystemExit(f'error: {path} line {number} is not a log row: {advice}')
        rows.append((line, row))
    return rows


# -----------------------------------------------------------------------------
# the loop: one step is schedule -> views -> teacher targets -> student and projection -> loss ->
# backward -> clip -> optimizer step, then log, measure and checkpoint

def train(run, step, until, tile_batches, tile_size, held_out, log_file):
    """Train from `step` to `until`; returns the step reached, why it stopped, and the signal
    that pre-empted it (0 if none). run.state (the loss counters) is updated in place."""
    student, teachers, optimizer, env = run.student, run.teachers, run.optimizer, run.env
    global_batch = batch_size * grad_accum * env.world
    stop = catch_preemption()
    meter = start_meter(step, teachers, env)
    bar = tqdm(total=until, initial=step, disable=not log_file, dynamic_ncols=True)
    why, agreed = 'reached max_iters', SimpleNamespace(signalled=False)
    while step < until:
        # the schedules: this step's learning rate and weight decay (group 0 is the one decayed)
        for group in optimizer.param_groups:
            group['lr'] = schedule(step, lr, min_lr, warmup_iters)
        optimizer.param_groups[0]['weight_decay'] = schedule(step, weight_decay, weight_decay_end)
        # a non-finite forward also poisons the projection's BatchNorm statistics: keep them
        head_statistics = student.head_statistics()
        # the views: every sample's augmentation is drawn from (seed, step), for any world size
        views = augment_params(global_batch, step, tile_size, crop_size)
        losses, teacher_stats = [], []
        for micro in range(grad_accum):
            # uint8 tiles from the loader: pinned, so the copy overlaps the GPU's work
            tiles = next(tile_batches).to(env.device, non_blocking=True)
            # this micro-batch's rows of the global batch, and their views
            first = (micro * env.world + env.rank) * batch_size
            mine = {name: v[first:first + batch_size].to(env.device) for name, v in views.items()}
            # one view per tile, the same for teachers and student (G2L), made on the device
            images = augment(tiles, mine, crop_size)
            # DDP all-reduces the gradients on the last micro-step only
            last = micro == grad_accum - 1
            sync = nullcontext() if not env.ddp or last else run.ddp.no_sync()
            with sync, env.autocast:
                # the teachers' targets: each one's embeddings of the same views
                targets = [teacher.targets(images, step, first) for teacher in teachers]
                # the student and its projection to each teacher's width
                projected, projected_patches = run.forward(images)
                # the loss on the final embeddings (G2L) to each teacher, by its share
                teacher_losses = [distance(s, t) for s, (t, _) in zip(projected, targets)]
                batch_loss = weighted_mean(teacher_losses, run.shares)
                # plus the optional patch-token term, likewise
                if patch_weight > 0:
                    patch_losses = [patch_distance(s, t)
                                    for s, (_, t) in zip(projected_patches, targets)]
                    patch_loss = weighted_mean(patch_losses, run.shares)
                    batch_loss = batch_loss + patch_weight * patch_loss
                # testing aid: a NaN here must be skipped by the loop, not crash the run
                if step == debug_nan_step:
                    batch_loss = batch_loss * float('nan')
                # backward of the mean over micro-batches, as one big batch
                (batch_loss / grad_accum).backward()
            losses.append(batch_loss.detach())
            # each teacher's loss and cosine, for the log
            cosines = [cosine(s, t) for s, (t, _) in zip(projected, targets)]
            teacher_stats.append(torch.stack([l.detach() for l in teacher_losses] + cosines))
        # clip: the norm before clipping, the same on every rank (DDP averaged the gradients)
        max_norm = grad_clip or float('inf')
        grad_norm = torch.nn.utils.clip_grad_norm_(student.parameters(), max_norm)
        # the optimizer step, skipped when the gradient is not finite
        if torch.isfinite(grad_norm):
            optimizer.step()
        # frees the gradients' memory until the next backward
        optimizer.zero_grad(set_to_none=True)
        step += 1
        bar.update(1)
        # the loss averaged over ranks, so that every rank takes the same decisions below
        agreed = agree_across_ranks(losses, teacher_stats, stop, env)
        finite = math.isfinite(agreed.loss) and math.isfinite(grad_norm.item())
        if finite:
            meter.losses.append(agreed.loss)
        else:
            student.restore_head_statistics(head_statistics)
        # an early stop, or too many non-finite steps in a row
        stop_reason = record_loss(run.state, agreed.loss, finite)
        if stop_reason:
            why = stop_reason
            break
        # the log line (the master's), with the held-out cosine every eval_interval steps
        if log_file and (step % log_interval == 0 or step == until):
            meter = log_progress(run, meter, step, grad_norm, agreed, held_out, log_file, bar)
        if agreed.signalled:
            why = signalled_reason(stop['signal'])
            break
        if step % ckpt_interval == 0 and not bench:
            save_checkpoint(run, step)
    bar.close()
    # this rank's own signal, or SIGTERM when only another rank was signalled
    preempted_by = (stop['signal'] or signal.SIGTERM) if agreed.signalled else 0
    return step, why, preempted_by


# pre-emption (SIGTERM; SIGUSR1 is what Slurm's --signal sends ahead of time) and Ctrl-C (SIGINT;
# torchrun passes it on to every rank)
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


def catch_preemption():
    """Handlers for STOP_SIGNALS; returns the dict in which they note the signal."""
    # a signal only raises a flag: the loop finishes its step, every rank checkpoints at the same
    # step, and the run exits
    stop = dict(signal=0)
    for sig in STOP_SIGNALS:
        signal.signal(sig, lambda signum, _: stop.update(signal=signum))
    return stop


def release_signals():
    """STOP_SIGNALS stop the process at once again, as they do before the loop."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.default_int_handler if sig == signal.SIGINT else signal.SIG_DFL)


def signalled_reason(signum):
    """Why a signalled run stopped, for its last line (a rank that only heard of another rank's
    signal reads it as pre-emption)."""
    what = 'interrupted (Ctrl-C)' if signum == signal.SIGINT else 'pre-empted (SIGTERM/SIGUSR1)'
    return f'{what}: checkpoint written; rerun with --resume=True to continue'


def agree_across_ranks(losses, teacher_stats, stop, env):
    """The step's loss, and each teacher's loss and cosine (means over micro-batches and ranks);
    their mean cosine; and whether any rank was signalled."""
    # one small all-reduce per step, so every rank takes the same early-stop / non-finite /
    # pre-emption decision at the same step
    batch_loss = torch.stack(losses).mean()
    stats = torch.stack(teacher_stats).mean(0)
    signalled = torch.tensor(float(stop['signal'] > 0), device=env.device)
    shared = torch.cat([torch.stack([batch_loss.float(), signalled]), stats.float()])
    if env.ddp:
        dist.all_reduce(shared)
        shared[0] /= env.world
        shared[2:] /= env.world
    n_teachers = len(stats) // 2
    losses, cosines = shared[2:2 + n_teachers], shared[2 + n_teachers:]
    return SimpleNamespace(loss=shared[0].item(), signalled=shared[1].item() > 0,
                           cosine=cosines.mean().item(), teacher_losses=losses.tolist(),
                           teacher_cosines=cosines.tolist())


def record_loss(state, batch_loss, finite):
    """Count this step's loss in the run's state (saved with every checkpoint); returns why the
    run must stop now, or None."""
    if not finite:
        state['skipped'] += 1
        state['nonfinite'] += 1
        if state['nonfinite'] >= max_nonfinite:
            return (f'{max_nonfinite} non-finite losses in a row: lower lr, check the data, '
                    'or resume from the checkpoint')
        return None
    state['nonfinite'] = 0
    # the paper's early stop, read as: more than `patience` consecutive losses above the mean
    # of the previous `window` losses (a plateau or a rise); counted always, obeyed when enabled
    recent = state['recent']
    window_full = len(recent) == early_stop_window
    above_mean = window_full and batch_loss > sum(recent) / len(recent)
    state['above'] = state['above'] + 1 if above_mean else 0
    state['recent'] = (recent + [batch_loss])[-early_stop_window:]
    if early_stop and state['above'] > early_stop_patience:
        return (f'early stop: the loss exceeded its {early_stop_window}-step mean '
                f'{state["above"]} times in a row')
    return None


def start_meter(step, teachers, env):
    """What the next log line's rates are measured from: the time, the step, the images each
    teacher ran on; and the finite losses since, whose mean it logs (less noisy than a batch)."""
    teacher_images = [t.images_run for t in teachers]
    return SimpleNamespace(t0=sync_time(env), step=step, teacher_images=teacher_images,
                           losses=[])


def log_progress(run, meter, step, grad_norm, agreed, held_out, log_file, bar):
    """One line of log.jsonl: the loss, lr, images/s and MFU since the last line; the held-out
    cosine every eval_interval steps; each teacher's loss and cosine in a committee. Returns the
    meter of the next line."""
    env, teachers = run.env, run.teachers
    seconds_per_step = (sync_time(env) - meter.t0) / (step - meter.step)
    images_per_s = batch_size * grad_accum * env.world / seconds_per_step
    mean_loss = sum(meter.losses) / len(meter.losses) if meter.losses else float('nan')
    # the share of this rank's images each teacher ran on (1 unless it replays a teacher cache)
    images = (step - meter.step) * batch_size * grad_accum
    shares = [(t.images_run - n) / images for t, n in zip(teachers, meter.teacher_images)]
    row = dict(step=step, loss=mean_loss, lr=run.optimizer.param_groups[0]['lr'],
               grad_norm=grad_norm.item(), cosine=agreed.cosine,
               images_per_s=round(images_per_s, 1),
               mfu=model_flops_utilisation(images_per_s, shares, run),
               skipped=run.state['skipped'])
    if len(teachers) > 1:
        row |= dict(teacher_loss=agreed.teacher_losses, teacher_cosine=agreed.teacher_cosines)
    if any(t.cache is not None for t in teachers):
        computed = [round(share, 4) for share in shares]
        row['teacher_computed'] = computed[0] if len(teachers) == 1 else computed
    if step % eval_interval == 0 or step == max_iters:
        cosines = run.student.held_out_cosines(held_out, env.autocast)
        row |= held_out_fields(cosines) if cosines else dict(val_cosine=None)
    write_log(row, log_file, bar, images_per_s)
    return start_meter(step, teachers, env)


def held_out_fields(cosines):
    """The held-out cosine in the log: the mean over teachers, and each one's in a committee."""
    fields = dict(val_cosine=sum(cosines) / len(cosines))
    if len(cosines) > 1:
        fields['val_cosines'] = cosines
    return fields


def write_log(row, log_file, bar, images_per_s):
    """One line of log.jsonl, the progress bar's summary, and the held-out cosine if measured."""
    # NaN/inf as null: log.jsonl stays valid JSON for jq, pandas and friends
    clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
             for k, v in row.items()}
    log_file.write(json.dumps(clean) + '\n')
    log_file.flush()
    summary = (f"loss {row['loss']:.4f} cos {row['cosine']:.3f} {images_per_s:.0f} img/s "
               f"MFU {mfu_text(row['mfu'])}")
    bar.set_postfix_str(summary)
    if row.get('val_cosine') is not None:
        bar.write(f"step {row['step']}: loss {row['loss']:.4f}, "
                  f"held-out teacher-student cosine {row['val_cosine']:.4f}")


def save_checkpoint(run, step):
    """out_dir/ckpt.pt: all a resumed run needs to continue exactly. Every rank must call it; one
    that cannot be written (a full disk) stops every rank in one line."""
    env = run.env
    # each rank's torch RNG state, gathered on the master
    rng = [torch.empty(0)] * env.world
    if env.ddp:
        dist.all_gather_object(rng, torch.get_rng_state())
    else:
        rng = [torch.get_rng_state()]
    problem = write_checkpoint(run, step, rng) if env.master else None
    master_decides([problem], env)


def write_checkpoint(run, step, rng):
    """The master's ckpt.pt; an error line when it cannot be written, else None."""
    ckpt = dict(student=run.student.state_dict(), optimizer=run.optimizer.state_dict(), step=step,
                state=run.state, config=effective_config(), world=run.env.world, rng=rng)
    # written atomically: a kill or a full disk leaves the old checkpoint, never half of one
    try:
        tile.save_atomic(checkpoint_path(), lambda f: torch.save(ckpt, f))
    except (OSError, RuntimeError) as e:
        # torch.save reports a full disk as a RuntimeError that names no cause: the free space does
        why = e.strerror if isinstance(e, OSError) else 'torch.save failed'
        free = human_bytes(shutil.disk_usage(out_dir).free)
        return (f'error: cannot write {checkpoint_path()} ({why}; {free} free there): free space, '
                'then rerun with --resume=True; the checkpoint written before is kept')
    return None


def finish_run(run, step, why, preempted_by, log_file, lineage):
    """After the loop and its last checkpoint: the export with its model card (lineage, see
    model_lineage) and the loss plot when the run completed, a summary line, the processes' end;
    an error when non-finite losses stopped it."""
    if log_file:
        log_file.close()
    # pre-empted runs leave quickly; the export and the loss plot come when the run completes
    if run.env.master and not preempted_by:
        zoo.export(run.student.backbone, run.student.spec, export_folder(), lineage)
        plot_loss(os.path.join(out_dir, 'log.jsonl'), os.path.join(out_dir, 'loss.png'))
    if run.env.master:
        print(f"stopped at step {step}: {why}; {run.state['skipped']} non-finite steps skipped; "
              f"outputs in {out_dir}")
    finish(run.env.ddp)
    if why.startswith(f'{max_nonfinite} non-finite'):
        raise SystemExit(f'error: {why}')


def model_flops_utilisation(images_per_s, teacher_shares, run):
    """MFU per GPU: the FLOP/s of the math the step ran (each teacher only on the share of images
    it ran on) over the device's peak; None if unknown."""
    if not run.env.peak_flops:
        return None
    t_specs = [t.spec for t in run.teachers]
    flops = step_flops(t_specs, run.student.spec, teacher_shares)
    return flops * images_per_s / run.env.world / run.env.peak_flops


def mfu_text(mfu):
    return f'{100 * mfu:.1f}%' if mfu is not None else 'n/a (unknown device peak)'


def sync_time(env):
    """Seconds on a monotonic clock once the GPU's queued work is done, so timings measure it."""
    if env.use_cuda:
        torch.cuda.synchronize()
    return time.perf_counter()


def peak_rss_gib():
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


def finish(ddp):
    if ddp:
        dist.barrier()
        dist.destroy_process_group()


def plot_loss(log_path, png_path):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    with open(log_path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.5))
    train = [r for r in rows if 'loss' in r]
    ax[0].plot([r['step'] for r in train], [r['loss'] for r in train])
    ax[0].set(xlabel='step', ylabel=f'{loss} loss', title='training loss')
    val = [r for r in rows if r.get('val_cosine') is not None]
    ax[1].plot([r['step'] for r in val], [r['val_cosine'] for r in val], marker='o')
    ax[1].set(xlabel='step', ylabel='cosine', title='held-out teacher-student cosine')
    fig.tight_layout()
    tile.save_atomic(png_path, lambda f: fig.savefig(f, format='png', dpi=100))


# -----------------------------------------------------------------------------
# --bench: the loop above timed on random tiles, the teacher computed, then replayed

def run_bench(run):
    """--bench: time the loop on random uint8 tiles made on the device, first with the teachers
    computed, then with their embeddings replayed from throwaway teacher caches."""
    env = run.env
    # compilation happens in the first steps
    warmup = 10 if compile else 3
    computed = time_steps(run, warmup)
    t_specs = [t.spec for t in run.teachers]
    name = f"{'+'.join(t['name'] for t in t_specs)} -> {run.student.spec['name']}"
    if env.master:
        print(f"bench {name} at {crop_size} px, batch {batch_size}/GPU, compile={compile} "
              f"grad_ckpt={grad_ckpt}: {computed.ms:.1f} ms/step, {computed.images_per_s:.1f} "
              f"images/s, MFU {mfu_text(computed.mfu)}, peak memory {computed.memory_gib:.2f} GiB")
    if patch_weight > 0:
        print('bench with a teacher cache: not measured, patch_weight > 0 needs patch tokens')
        return
    # the same steps again, the teachers' embeddings replayed from caches of random stand-ins
    # in a temporary folder (the replay's speed does not depend on the values)
    computing = run.teachers
    with tempfile.TemporaryDirectory() as folder:
        run.teachers = [Teacher(t, None, stand_in_cache(os.path.join(folder, str(k)), t,
                                                        warmup + bench, env))
                        for k, t in enumerate(t_specs)]
        replayed = time_steps(run, warmup)
        run.teachers = computing
    t_flops = sum(zoo.flops_per_image(t, crop_size) for t in t_specs)
    teacher_part = t_flops / step_flops(t_specs, run.student.spec)
    speedup = replayed.images_per_s / computed.images_per_s
    who = 'the teacher' if len(t_specs) == 1 else 'the teachers'
    if env.master:
        print(f"bench with a teacher cache ({who}, {100 * teacher_part:.0f}% of a step's "
              f"FLOPs, not run): {replayed.ms:.1f} ms/step, {replayed.images_per_s:.1f} "
              f"images/s, MFU {mfu_text(replayed.mfu)} (student FLOPs only), "
              f"{speedup:.2f}x the images/s")


def stand_in_cache(folder, t_spec, n_steps, env):
    """A teacher cache of random embeddings for steps 0..n_steps, for --bench's replay."""
    global_batch = batch_size * grad_accum * env.world
    os.makedirs(folder)
    cache = open_cache(folder, global_batch, t_spec['dim'], storage_dtype(env))
    for step in range(n_steps):
        stand_ins = torch.randn(global_batch, t_spec['dim'])
        rows = to_storage(stand_ins, cache)
        write_rows(cache, step, 0, rows, np.ones(global_batch, bool))
    return cache


def time_steps(run, warmup):
    """Time `bench` steps of the loop after `warmup` untimed ones: ms/step, images/s, MFU, peak
    memory."""
    env = run.env
    random_tiles = random_tile_batches(env)
    train(run, 0, warmup, random_tiles, 256, held_out=[], log_file=None)
    if env.use_cuda:
        torch.cuda.reset_peak_memory_stats()
    t0, t0_images = sync_time(env), [t.images_run for t in run.teachers]
    train(run, warmup, warmup + bench, random_tiles, 256, held_out=[], log_file=None)
    seconds_per_step = (sync_time(env) - t0) / bench
    images_per_s = batch_size * grad_accum * env.world / seconds_per_step
    images = bench * batch_size * grad_accum
    teacher_shares = [(t.images_run - n) / images for t, n in zip(run.teachers, t0_images)]
    if env.use_cuda:
        memory_gib = torch.cuda.max_memory_allocated(env.device) / 2 ** 30
    else:
        memory_gib = peak_rss_gib()
    mfu = model_flops_utilisation(images_per_s, teacher_shares, run)
    return SimpleNamespace(ms=seconds_per_step * 1000, images_per_s=images_per_s, mfu=mfu,
                           memory_gib=memory_gib)


def random_tile_batches(env):
    """--bench's endless micro-batches: random uint8 tiles made on the device, nothing read."""
    while True:
        yield torch.randint(0, 256, (batch_size, 3, 256, 256), dtype=torch.uint8, device=env.device)


# -----------------------------------------------------------------------------
# the teacher cache: every view of a step is a function of (seed, step), so a frozen teacher's
# embedding of each one can be stored once and replayed (FKD and Theia store teacher outputs
# offline the same way). Each teacher has a folder of its own, named by what it is (model row,
# weights, precision), so a committee reuses what each member stored alone, in any order:
#   weights_sha256.json       the teacher weight files' hashes, by path, size and mtime
#   <name>-<hash>/key.json    what the embeddings were made from; a run with other settings stops
#   <name>-<hash>/steps_<first>.bin   CACHE_SEGMENT_STEPS steps x global batch x dim, float32 or
#                             raw bf16
#   <name>-<hash>/steps_<first>.crc   one uint32 mark per row: crc32 of its bytes | 1 (0 = not
#                             written)
#   <name>-<hash>/held_out_<hash>.npy the held-out tiles' embeddings (float32), for the cosine

# steps per pair of files: every file has a fixed size, so processes that create or grow one
# concurrently never shrink it under another
CACHE_SEGMENT_STEPS = 1000
# how each field of key.json reads in the error that names the one that differs
CACHE_KEY_WORDS = dict(
    teacher='teacher',
    teacher_model="teacher architecture or normalisation (its model.py row)",
    teacher_weights='teacher weights (sha256 of the file)',
    tiles='tiles in data_dir (slides, their files and coordinates)',
    reading='way of reading tiles (tile.TileDataset.direct, tile.DCT_SHRINK)',
    seed='seed',
    global_batch='global batch (batch_size x grad_accum x processes)',
    crop_size='crop_size',
    augmentation='augmentation recipe (AUGMENT_VERSION)',
    split='training split (val_fraction, seed)',
    dtype='precision (float32, or bfloat16 with bf16 precision)',
    teacher_dtype="teacher weights' precision (teacher_bf16, with bf16)",
    segment_steps='file layout (CACHE_SEGMENT_STEPS)',
)


def storage_dtype(env):
    """A teacher's embeddings as stored: bf16 with bf16 precision (CUDA's), where the teacher
    runs under bf16 autocast (about 3 KB a tile for 1536 dims); else float32."""
    return torch.bfloat16 if env.bf16 else torch.float32


def open_teacher_cache(tiles, train_idx, val_idx, sources, global_batch, env):
    """A teacher cache per teacher of `sources`, in its folder below teacher_cache, checked
    against what it was made from, its size printed and the free disk checked; each holds the
    steps still missing and whether the held-out set is, the same on every rank."""
    verdict = [None, [], [], []]
    if env.master:
        verdict = examine_teacher_cache(tiles, train_idx, val_idx, sources, global_batch, env)
    # the master's verdict on every rank
    if env.ddp:
        dist.broadcast_object_list(verdict)
    problem, folders, missing, held_out_missing = verdict
    if problem:
        finish(env.ddp)
        # the error line once, from the master
        raise SystemExit(problem if env.master else 1)
    caches = []
    for (spec, _), folder, lacks, held_out in zip(sources, folders, missing, held_out_missing):
        cache = open_cache(folder, global_batch, spec['dim'], storage_dtype(env))
        cache.missing, cache.held_out_missing = lacks, held_out
        caches.append(cache)
    return caches


def examine_teacher_cache(tiles, train_idx, val_idx, sources, global_batch, env):
    """The master's look at teacher_cache: [an error line or None, each teacher's folder, the
    steps each lacks, whether each lacks the held-out set]."""
    os.makedirs(teacher_cache, exist_ok=True)
    problem = check_cache_layout()
    if problem:
        return [problem, [], [], []]
    folders, stored, held_out_missing = [], [], []
    for spec, weights in sources:
        key = cache_key(tiles, train_idx, spec, weights, global_batch, env)
        folder = os.path.join(teacher_cache, teacher_folder(key))
        os.makedirs(folder, exist_ok=True)
        problem = claim_key(folder, key)
        if problem:
            return [problem, [], [], []]
        cache = open_cache(folder, global_batch, spec['dim'], storage_dtype(env))
        folders.append(folder)
        stored.append(stored_steps(cache, max_iters))
        held_out_missing.append(len(val_idx) > 0 and not held_out_whole(cache, val_idx))
    problem = check_cache_space(folders, sources, stored, global_batch, env)
    if problem:
        return [problem, [], [], []]
    # only now: a max_iters too large for the disk would be a list too large for the memory
    missing = [np.setdiff1d(np.arange(max_iters), steps).tolist() for steps in stored]
    problem = reserve_cache_space(folders, sources, missing, global_batch, env)
    return [problem, folders, missing, held_out_missing]


def check_cache_layout():
    """An error line when teacher_cache holds one teacher's embeddings at its top, as an older
    distill.py wrote them; else None."""
    old_key = os.path.join(teacher_cache, 'key.json')
    if not os.path.exists(old_key):
        return None
    with open(old_key) as f:
        folder = os.path.join(teacher_cache, teacher_folder(json.load(f)))
    return (f'error: teacher_cache {teacher_cache} keeps its embeddings at its top, as an older '
            f'distill.py wrote them; this one reads a folder per teacher: move them there with '
            f'`mkdir {folder} && mv {teacher_cache}/key.json {teacher_cache}/steps_* '
            f'{teacher_cache}/held_out_* {folder}/`, or use another folder')


# the fields of a teacher cache's key that say which teacher it holds: they name its folder
TEACHER_FIELDS = ('teacher', 'teacher_model', 'teacher_weights', 'dtype', 'teacher_dtype')


def teacher_folder(key):
    """The folder of a teacher's embeddings below teacher_cache: its name and a hash of what the
    teacher is (model row, weights, precision), never its place in the committee."""
    identity = {k: key.get(k) for k in TEACHER_FIELDS}
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
    name = ''.join(c if c.isalnum() or c in '.-_' else '_' for c in key['teacher'])
    return f'{name}-{digest[:12]}'


def cache_key(tiles, train_idx, t_spec, weights, global_batch, env):
    """All that a teacher's embedding of a step's views depends on."""
    # rows are indexed by their place in the global batch, as augment_params() and batches()
    # index them, so any split of the same global batch over GPUs and accumulation reads the same
    model_fields = ('arch', 'kwargs', 'mean', 'std', 'pool', 'img_size', 'resize')
    # each slide by its file's identity as tile.py recorded it (size, dimensions, content hash; not
    # the mtime, which a copy changes): a slide scanned again and tiled alike is other pixels
    tile_layout = json.dumps([tiles.stems, tiles.slide_identities, tiles.levels, tiles.read_sizes,
                              tiles.tile_size])
    key = dict(
        teacher=t_spec['name'],
        teacher_model={k: t_spec.get(k) for k in model_fields},
        teacher_weights=weights_identity(t_spec, weights),
        # the tiles as TileDataset reads them: slides, levels, sizes, coordinates
        tiles=fingerprint(tile_layout, tiles.coords, tiles.slide_index),
        reading=tile_reading(tiles),
        seed=seed,
        global_batch=global_batch,
        crop_size=crop_size,
        augmentation=AUGMENT_VERSION,
        # the held-out set's embeddings are a file named by their own tiles' fingerprint
        split=fingerprint('training tiles', train_idx),
        dtype=str(storage_dtype(env)).removeprefix('torch.'),
        segment_steps=CACHE_SEGMENT_STEPS,
    )
    # in bf16 the teacher runs in bf16 or float32 weights (teacher_bf16); in float32 always in
    # float32, and the key has no such field
    if env.bf16:
        key['teacher_dtype'] = str(teacher_dtype(env)).removeprefix('torch.')
    # as JSON reads it back: tuples become lists
    return json.loads(json.dumps(key))


def tile_reading(tiles):
    """How TileDataset reads the tiles' pixels: through OpenSlide, or straight from the stored
    JPEG tiles (TileDataset.direct), where a level is shrunk also in the DCT (tile.DCT_SHRINK:
    ~46 dB PSNR from OpenSlide's pixels, so a cache filled one way is not the other's)."""
    if not tiles.direct:
        return 'OpenSlide'
    return 'JPEG tiles, DCT shrink' if tile.DCT_SHRINK else 'JPEG tiles'


def fingerprint(text, *arrays):
    """sha256 of a text and integer arrays, each array's length before it (no two inputs alike)."""
    digest = hashlib.sha256(text.encode())
    for values in arrays:
        digest.update(np.int64(len(values)).tobytes())
        digest.update(np.ascontiguousarray(values, np.int64).tobytes())
    return digest.hexdigest()


def weights_identity(spec, weights):
    """A model's weights, as a cache key and a model card name them: the sha256 of the file
    model.create loads, or the name that seeds random weights (model.build_random)."""
    if weights == 'random':
        return f"random ({spec['name']})"
    return 'sha256:' + file_sha256(str(zoo.weight_file(spec, weights)))


def file_sha256(path):
    """A file's sha256, remembered in teacher_cache/weights_sha256.json by path, size and mtime."""
    # the whole file, not a sample: two checkpoints may differ in a few tensors only. Hashing
    # H-optimus-0's 4.5 GB takes ~2.5 s of CPU (1.8 GB/s measured) plus the read; a stat
    # takes microseconds, and a rewritten file has a new size or mtime
    # remembered beside a teacher cache; a run without one hashes again
    memo_path = os.path.join(teacher_cache, 'weights_sha256.json') if teacher_cache else None
    memo = {}
    if memo_path and os.path.exists(memo_path):
        # a memo cut short costs one more hash, after which it is written whole again
        with contextlib.suppress(ValueError), open(memo_path) as f:
            memo = json.load(f)
    stat = os.stat(path)
    seen = dict(size=stat.st_size, mtime_ns=stat.st_mtime_ns)
    real_path = os.path.realpath(path)
    entry = memo.get(real_path, {})
    if {k: entry.get(k) for k in seen} == seen:
        return entry['sha256']
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 24), b''):
            digest.update(block)
    memo[real_path] = dict(seen, sha256=digest.hexdigest())
    if memo_path:
        tile.save_atomic(memo_path, lambda f: f.write(json.dumps(memo, indent=1).encode()))
    return digest.hexdigest()


def claim_key(folder, key):
    """Write folder/key.json if there is none, then compare: an error line naming the first
    setting that differs, or None."""
    path = os.path.join(folder, 'key.json')
    if not os.path.exists(path):
        tmp = f'{path}.{os.getpid()}.tmp'
        with open(tmp, 'w') as f:
            json.dump(key, f, indent=1)
        # a hard link appears whole and never replaces another run's key.json (os.replace would)
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass
        os.remove(tmp)
    try:
        with open(path) as f:
            made_with = json.load(f)
    except (OSError, ValueError):
        made_with = None
    # written whole (a hard link to a finished file): one that is not was cut short elsewhere, and
    # without it the embeddings there cannot be checked
    if not isinstance(made_with, dict):
        return (f'error: {path} cannot be read (truncated or damaged): restore it from a copy, or '
                f'delete {folder} to fill it again, or use another teacher_cache folder')
    for name, value in key.items():
        if made_with.get(name) == value:
            continue
        values = ''
        if not isinstance(value, dict):
            values = f': {short(made_with.get(name))} there, {short(value)} here'
        return (f'error: teacher_cache {folder} was made with another '
                f'{CACHE_KEY_WORDS[name]}{values}; use another teacher_cache folder, or the '
                'settings it was made with')
    return None


def short(value):
    """A value for an error line: long hashes cut to their first characters."""
    text = str(value)
    return text[:20] + '...' if len(text) > 24 else text


def check_cache_space(folders, sources, stored, global_batch, env):
    """Print each teacher's cache size; an error line if the disk cannot take the steps still
    missing."""
    needed, n_missing = 0, 0
    for folder, (spec, _), steps in zip(folders, sources, stored):
        row_bytes = spec['dim'] * torch.finfo(storage_dtype(env)).bits // 8
        # each row also has its 4-byte mark
        step_bytes = global_batch * (row_bytes + 4)
        lacking = max_iters - len(steps)
        needed += lacking * step_bytes
        n_missing += lacking
        dtype_name = str(storage_dtype(env)).removeprefix('torch.')
        print(f"teacher cache {folder}: {max_iters} steps x {global_batch} tiles x "
              f"{spec['dim']}-d {dtype_name} ({row_bytes} B a tile) = "
              f'{human_bytes(max_iters * step_bytes)}; {len(steps)} steps stored, '
              f'{human_bytes(lacking * step_bytes)} to write')
    free = shutil.disk_usage(teacher_cache).free
    print(f'teacher cache {teacher_cache}: {human_bytes(needed)} to write, '
          f'{human_bytes(free)} free')
    if needed <= free:
        return None
    return (f'error: teacher_cache needs {human_bytes(needed)} for {n_missing} more steps but '
            f'{teacher_cache} has {human_bytes(free)} free: free some, point teacher_cache at a '
            'larger disk, or lower max_iters')


def reserve_cache_space(folders, sources, missing, global_batch, env):
    """Allocate on disk the rows and marks of every step still missing, before any is written: an
    error line when the disk cannot take them, else None."""
    # the files are sparse and memory-mapped: a disk that fills under a write through the map is a
    # SIGBUS that kills the run mid-step, where a reservation that fails now is one line (and a
    # disk that fills later finds the cache's blocks already its own)
    for folder, (spec, _), steps in zip(folders, sources, missing):
        cache = open_cache(folder, global_batch, spec['dim'], storage_dtype(env))
        for path, offset, length in missing_extents(cache, steps):
            why = allocate(path, offset, length)
            if why:
                needed = len(steps) * global_batch * (stored_row_bytes(cache) + 4)
                free = human_bytes(shutil.disk_usage(folder).free)
                return (f'error: teacher_cache cannot reserve {human_bytes(needed)} for the '
                        f'{len(steps)} steps {folder} lacks ({why}; {free} free): free some, '
                        'point teacher_cache at a larger disk, or lower max_iters')
    return None


def stored_row_bytes(cache):
    return cache.dim * np.dtype(cache.np_dtype).itemsize


def missing_extents(cache, steps):
    """(path, offset, length) of the bytes of the rows and of the marks of `steps` (sorted), one
    extent for each run of consecutive steps in a pair of files (segment)."""
    steps = np.asarray(steps, np.int64)
    # a run ends where a step is skipped or a pair of files ends
    ends = (np.diff(steps) != 1) | (np.diff(steps // CACHE_SEGMENT_STEPS) != 0)
    for run in np.split(steps, np.flatnonzero(ends) + 1):
        if not len(run):
            continue
        k, i = divmod(int(run[0]), CACHE_SEGMENT_STEPS)
        for suffix, item_bytes in (('.bin', stored_row_bytes(cache)), ('.crc', 4)):
            step_bytes = cache.global_batch * item_bytes
            yield segment_stem(cache, k) + suffix, i * step_bytes, len(run) * step_bytes


def allocate(path, offset, length):
    """Give bytes offset..offset+length of a file their blocks on disk (the file is made when
    missing, and never shrunk): why the disk cannot, or None; None too where the filesystem
    cannot allocate ahead (NFSv3, older ZFS), which goes on without the reservation."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fallocate(fd, offset, length)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            return e.strerror
        if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            raise
    finally:
        os.close(fd)
    return None


def fallocate(fd, offset, length):
    """fallocate(2), mode 0: OSError when it cannot, ENOSYS where the C library lacks it."""
    # not os.posix_fallocate: where the filesystem cannot allocate ahead, glibc emulates it by
    # writing into every block of the range, minutes for a cache of tens of GB on NFS
    libc = ctypes.CDLL(None, use_errno=True)
    call = getattr(libc, 'fallocate64', None) or getattr(libc, 'fallocate', None)
    if call is None:
        raise OSError(errno.ENOSYS, os.strerror(errno.ENOSYS))
    call.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
    if call(fd, 0, offset, length) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def human_bytes(n):
    for unit in ('B', 'KB', 'MB', 'GB', 'TB'):
        if n < 1000:
            return f'{n:.3g} {unit}'
        n /= 1000
    return f'{n:.3g} PB'


def open_cache(folder, global_batch, dim, dtype):
    """A teacher cache's layout; its files are mapped when first touched."""
    # numpy has no bfloat16: bf16 is kept as its raw 16 bits
    np_dtype = np.int16 if dtype == torch.bfloat16 else np.float32
    return SimpleNamespace(folder=folder, global_batch=global_batch, dim=dim, dtype=dtype,
                           np_dtype=np_dtype, segments={}, missing=[], held_out_missing=False)


def segment_stem(cache, k):
    """The path, less .bin or .crc, of a cache's k-th pair of files."""
    return os.path.join(cache.folder, f'steps_{k * CACHE_SEGMENT_STEPS:08d}')


def segment(cache, step):
    """The memory-mapped (rows, marks) of the files that hold a step, and its index there."""
    k, i = divmod(step, CACHE_SEGMENT_STEPS)
    if k not in cache.segments:
        stem = segment_stem(cache, k)
        shape = (CACHE_SEGMENT_STEPS, cache.global_batch)
        rows = map_file(stem + '.bin', cache.np_dtype, shape + (cache.dim,))
        cache.segments[k] = (rows, map_file(stem + '.crc', np.uint32, shape))
    rows, marks = cache.segments[k]
    return rows, marks, i


def map_file(path, dtype, shape):
    """A shared memory map of a file of fixed size, created (sparse, zeros) by whoever is first."""
    size = np.dtype(dtype).itemsize * math.prod(shape)
    # 'ab' creates and never truncates; every process grows the file to the one size the key
    # fixes, so none ever shrinks it under another. The disk fills only as rows are written
    with open(path, 'ab') as f:
        if os.path.getsize(path) < size:
            f.truncate(size)
    return np.memmap(path, dtype, 'r+', shape=shape)


def row_marks(rows):
    """Each row's mark: the crc32 of its bytes, never 0 (0 = not written)."""
    return np.array([zlib.crc32(row) | 1 for row in rows], np.uint32)


def read_rows(cache, step, first, n):
    """Rows first..first+n of a step as stored, and which are valid: written, and their mark is
    their checksum (a torn or clobbered write is missing, never a wrong value)."""
    rows_file, marks_file, i = segment(cache, step)
    rows = np.array(rows_file[i, first:first + n])
    marks = np.array(marks_file[i, first:first + n])
    valid = marks == row_marks(rows)
    torn = np.count_nonzero(~valid & (marks != 0))
    if torn:
        print(f'warning: {torn} teacher_cache rows of step {step} fail their checksum (a torn '
              'or clobbered write)', file=sys.stderr)
    return rows, valid


def write_rows(cache, step, first, rows, which):
    """Store the rows `which` picks as rows first.. of a step, then their marks: an entry counts
    only once its mark is written, and each process writes only its own rows."""
    rows_file, marks_file, i = segment(cache, step)
    picked = first + np.flatnonzero(which)
    rows_file[i, picked] = rows[which]
    # testing aid: the torn write that a kill -9 between rows and marks leaves
    if step == debug_kill_write:
        os.kill(os.getpid(), signal.SIGKILL)
    marks_file[i, picked] = row_marks(rows[which])


def to_storage(embeddings, cache):
    """Embeddings (a tensor, on any device) -> a numpy array of the cache's dtype."""
    stored = embeddings.detach().to(cache.dtype).cpu()
    if cache.dtype == torch.bfloat16:
        return stored.view(torch.int16).numpy()
    return stored.numpy()


def from_storage(rows, cache):
    """Stored rows (numpy) -> a CPU tensor in the dtype the teacher computed them in."""
    embeddings = torch.from_numpy(rows)
    if cache.dtype == torch.bfloat16:
        return embeddings.view(torch.bfloat16)
    return embeddings


def stored_steps(cache, n_steps):
    """The steps below n_steps that have every row marked, read from the mark files on disk
    (the replay also checks each mark against its row)."""
    stored = []
    for name in sorted(os.listdir(cache.folder)):
        if not (name.startswith('steps_') and name.endswith('.crc')):
            continue
        first = int(name.removeprefix('steps_').removesuffix('.crc'))
        _, marks, _ = segment(cache, first)
        count = max(0, min(CACHE_SEGMENT_STEPS, n_steps - first))
        complete = (marks[:count] != 0).all(1)
        stored.extend((first + np.flatnonzero(complete)).tolist())
    return stored


def held_out_path(cache, val_idx):
    """Where a cache keeps these held-out tiles' embeddings (other val_tiles: another file)."""
    name = fingerprint('held-out tiles', val_idx)[:16]
    return os.path.join(cache.folder, f'held_out_{name}.npy')


def held_out_whole(cache, val_idx):
    """Whether the cache holds these held-out tiles' embeddings, whole: a file cut short (copied
    in part, or left by another tool) counts as missing, so the teacher computes it again."""
    # written whole or not at all (save_atomic), so the shape and the length are the whole check
    try:
        stored = np.load(held_out_path(cache, val_idx), mmap_mode='r')
    except (OSError, ValueError, EOFError):
        return False
    return stored.shape == (len(val_idx), cache.dim)


def write_held_out(cache, val_idx, targets):
    """The held-out embeddings into the cache, whole or not at all."""
    if cache is None:
        return
    values = torch.cat(targets).cpu().numpy()
    tile.save_atomic(held_out_path(cache, val_idx), lambda f: np.save(f, values))


def cache_lacks(cache, step, who, env):
    """Whether the run from `step` on needs the teacher `who` names: a step from `step` to
    max_iters, or the held-out set, is missing from its teacher cache (the master's list, the
    same on every rank)."""
    n_missing = sum(s >= step for s in cache.missing)
    if not n_missing and not cache.held_out_missing:
        return False
    if env.master:
        on_ranks = f' on all {env.world} processes' if env.ddp else ''
        held_out = ' and the held-out set' if cache.held_out_missing else ''
        print(f'loading {who}{on_ranks}: {n_missing} of the {max_iters - step} steps to run'
              f'{held_out} are not in teacher_cache', flush=True)
    return True


def replay_targets(teacher, images, step, first):
    """The teacher's embeddings of a micro-batch as stored in teacher_cache, rows first.. of the
    step's global batch (patch tokens: None). The rows it lacks are computed and stored when the
    teacher is loaded. When it is not (the cache was whole at start-up, and a row has since been
    torn or clobbered), they are NaN, so the loop skips the step, and marked missing, so that the
    next run that uses the cache computes them."""
    cache = teacher.cache
    rows, valid = read_rows(cache, step, first, len(images))
    if not valid.all() and teacher.embed is None:
        forget_rows(cache, step, first, ~valid)
        print(f'warning: step {step} is skipped: the teacher is not loaded to compute its rows; '
              'the next run on this teacher_cache loads it to compute them', file=sys.stderr)
        targets = from_storage(rows, cache)
        targets[torch.from_numpy(~valid)] = float('nan')
        return targets.to(images.device), None
    if not valid.all():
        # the whole micro-batch, as a run without a cache computes it, so the rows match its
        computed = to_storage(teacher.compute(images)[0], cache)
        # only missing rows are written; the run uses exactly what the cache then holds
        write_rows(cache, step, first, computed, ~valid)
        rows[~valid] = computed[~valid]
    return from_storage(rows, cache).to(images.device), None


def forget_rows(cache, step, first, which):
    """Unmark the rows `which` picks of rows first.. of a step: they count as never written."""
    _, marks_file, i = segment(cache, step)
    marks_file[i, first + np.flatnonzero(which)] = 0


def fill_teacher_cache(caches, sources, tiles, train_idx, val_idx, global_batch, env):
    """--teacher_only: each teacher's embeddings of the views of every step up to max_iters that
    its cache lacks, the ranks taking turns over the steps; and the held-out set's. No student;
    a teacher whose cache is whole is never loaded."""
    # every world-th step that some teacher lacks: no two ranks write the same rows
    all_missing = sorted(set().union(*(cache.missing for cache in caches)))
    steps = all_missing[env.rank::env.world]
    teachers = []
    for k, ((spec, weights), cache) in enumerate(zip(sources, caches)):
        mine = set(steps) & set(cache.missing)
        t_model = None
        if mine or (env.master and cache.held_out_missing):
            if env.master:
                print(f'loading {teacher_name(k, spec, len(sources))}: {len(cache.missing)} '
                      f'steps to fill on {env.world} processes', flush=True)
            t_model = load_teacher(spec, weights, env)
        teachers.append(Teacher(spec, t_model, cache))
    if env.master:
        embed_held_out(tiles, val_idx, teachers, env)
    order = (chunk.tolist() for _, chunk in
             global_batches(len(train_idx), steps, global_batch, seed))
    loader = tile_loader(tiles, train_idx, order, env)
    bar = tqdm(total=len(steps), disable=not env.master, desc='teacher cache', unit='step')
    pending = [[] for _ in teachers]
    lacking = [set(cache.missing) for cache in caches]
    for step, step_tiles in zip(steps, loader):
        # exactly the views the training step will make (augment_params, augment)
        views = augment_params(global_batch, step, tiles.tile_size, crop_size)
        views = {name: v.to(env.device) for name, v in views.items()}
        step_tiles = step_tiles.to(env.device, non_blocking=True)
        images = augment(step_tiles, views, crop_size)
        for teacher, waiting, lacks in zip(teachers, pending, lacking):
            if step in lacks:
                waiting.append((step, images))
            # whole steps share forwards of up to fill_batch_size tiles
            if waiting and (len(waiting) * global_batch >= fill_batch_size or step == steps[-1]):
                embed_and_store(teacher, waiting, env)
                waiting.clear()
        bar.update(1)
    bar.close()
    # on disk before the job ends (the marks make any order of write-back safe)
    for cache in caches:
        for rows_file, marks_file in cache.segments.values():
            rows_file.flush()
            marks_file.flush()
    if env.ddp:
        dist.barrier()
    for cache in caches if env.master else []:
        n_stored = len(stored_steps(cache, max_iters))
        print(f'teacher cache {cache.folder}: {n_stored} of {max_iters} steps stored')


def embed_and_store(teacher, pending, env):
    """A teacher's embeddings of pending (step, views), in forwards of up to fill_batch_size
    tiles, each step stored whole."""
    cache = teacher.cache
    images = torch.cat([views for _, views in pending])
    with torch.inference_mode(), env.autocast:
        pooled = [teacher.embed(chunk)[0] for chunk in images.split(fill_batch_size)]
    rows = to_storage(torch.cat(pooled), cache)
    every_row = np.ones(cache.global_batch, bool)
    for i, (step, _) in enumerate(pending):
        step_rows = rows[i * cache.global_batch:(i + 1) * cache.global_batch]
        write_rows(cache, step, 0, step_rows, every_row)


def read_held_out(cache, val_idx, crops):
    """The held-out embeddings from the cache, batched like crops; None without them."""
    if cache is None or not held_out_whole(cache, val_idx):
        return None
    targets = torch.from_numpy(np.load(held_out_path(cache, val_idx)))
    return [t.to(crops[0].device) for t in targets.split([len(c) for c in crops])]


# -----------------------------------------------------------------------------
# the G2L table at the end of a run (eval_data)

def check_eval_data():
    """eval_data's labelled patches, read as evaluate.py will: a one-line error now, not after
    hours of training."""
    import evaluate
    try:
        evaluate.read_dataset(eval_data)
    except SystemExit as e:
        reason = str(e).removeprefix('error: ')
        raise SystemExit(f'error: eval_data={eval_data}: {reason}') from None


def evaluate_g2l(env, lineage):
    """evaluate.py on the teachers, the student before distillation and after, in that order, on
    eval_data: out_dir/eval/results.{json,md,png}, the headline printed and added to the
    export's model card."""
    import evaluate
    # each model as evaluate.py names it: a model name, NAME=WEIGHTS, or this run's export by
    # its timm hub name
    members = committee()
    teacher_entries = [f'{name}={weights}' if weights else name for name, weights, _ in members]
    before_entry = f'{student}={student_weights}' if student_weights else student
    models = teacher_entries + [before_entry, f'local-dir:{export_folder()}']
    names = ['teacher'] if len(members) == 1 else committee_row_names(members)
    print(f"evaluating the G2L effect on {eval_data}: {', '.join(models)}")
    results = evaluate.main([
        f'--data={eval_data}',
        f"--models={','.join(models)}",
        f"--names={','.join(names + ['student before', 'student after'])}",
        f"--teacher={','.join(names)}",
        f'--out={os.path.join(out_dir, "eval")}',
        f'--device={env.device.type}',
        f'--num_workers={num_workers}',
    ])
    table = '\n'.join(evaluate.headline_lines(results))
    zoo.write_card(export_folder(), lineage, dict(data=eval_data, table=table))
    return results


def committee_row_names(members):
    """A committee's rows in the G2L table: its teachers' names; where a name repeats (one
    architecture, two weight files), the weight files' names; failing that, their places."""
    names = [name for name, _, _ in members]
    if len(set(names)) < len(names):
        names = [os.path.splitext(os.path.basename(w))[0] or n for n, w, _ in members]
    if len(set(names)) < len(names):
        names = [f'{name} #{k + 1}' for k, (name, _, _) in enumerate(members)]
    return names


# -----------------------------------------------------------------------------
# the model card: what the export was distilled from and how

def export_folder():
    """Where the student is exported: a timm hub folder (model.export)."""
    return os.path.join(out_dir, 'student')


def model_lineage(tiles, train_idx, step, global_batch):
    """What the export's model card says (model.card_text): the teachers and the student's
    initialisation with their weights' sha256, the training tiles, the recipe; plain dicts."""
    start_source = zoo.resolve(student, student_weights or None)
    train_slides = np.unique(tiles.slide_index[train_idx])
    tiles_used = dict(folder=data_dir, slides=len(train_slides), tiles=len(train_idx),
                      tile_size=tiles.tile_size,
                      mpp=sorted({tiles.mpps[i] for i in train_slides}))
    recipe = dict(loss=loss, alpha=alpha, patch_weight=patch_weight, steps=step,
                  global_batch=global_batch, crop_size=crop_size, lr=lr, min_lr=min_lr,
                  warmup_iters=warmup_iters, weight_decay=weight_decay,
                  weight_decay_end=weight_decay_end, grad_clip=grad_clip,
                  augmentation=f'version {AUGMENT_VERSION} (distill.py:augment_params)', seed=seed)
    start_license = zoo.weights_license(*start_source)
    teachers = []
    for (name, _, share), source in zip(committee(), teacher_sources()):
        teachers.append(weights_lineage(name, source) | dict(loss_share=share))
    return dict(license=license or start_license, teachers=teachers,
                student=weights_lineage(student, start_source), tiles=tiles_used, recipe=recipe)


def weights_lineage(name, source):
    """One model of the lineage: its name, architecture, weights (a hub id or a path) and their
    sha256 (None for random weights), licence and hub id."""
    spec, weights = source
    published = weights != 'random'
    identity = weights_identity(*source)
    return dict(name=name, arch=spec['arch'], weights=spec['hub'] if weights == 'hub' else weights,
                sha256=identity.removeprefix('sha256:') if published else None,
                license=zoo.weights_license(spec, weights),
                hub=spec['hub'] if published else None)


def command_line():
    """main() as a command: Ctrl-C outside the loop and a full disk end in one line too."""
    try:
        main()
    except KeyboardInterrupt:
        # in the loop Ctrl-C finishes the step and checkpoints (catch_preemption); before or after
        # it every file is whole (save_atomic), and a resume continues from the last checkpoint
        if os.environ.get('RANK', '0') == '0':
            print('interrupted (Ctrl-C): every file written is whole; rerun to continue (with '
                  '--resume=True a training run continues from its last checkpoint)',
                  file=sys.stderr)
        sys.exit(128 + signal.SIGINT)
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            raise
        # a write through a file object names no file: then the folders this run writes into
        places = [p for p in (out_dir, teacher_cache) if p]
        if e.filename:
            places = [os.path.dirname(e.filename) or '.']
        raise SystemExit(f"error: a write into {' or '.join(places)} failed ({e.strerror}): free "
                         'space there, then rerun (with --resume=True a training run continues '
                         'from its last checkpoint)') from None


if __name__ == '__main__':
    command_line()
