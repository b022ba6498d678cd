"""
G2L distillation: a frozen giga-scale teacher (H-optimus-0, ViT-g/14) teaches a large student
(Hibou-L, ViT-L/14) on tissue tiles of one cancer type (G2L, arXiv 2510.11176).

Run it:
  demo on a CPU (tiny random models, synthetic slides, ~2 minutes):
    torchrun --standalone --nproc_per_node=1 distill.py config/demo.py
  one GPU:
    python distill.py config/g2l_brca.py
  one node, 8 GPUs:
    torchrun --standalone --nproc_per_node=8 distill.py config/g2l_brca.py
  two nodes (run on each; RDZV_HOST is node 0's address):
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=$RDZV_HOST:29500 \
        --rdzv-id=g2l distill.py config/g2l_brca.py
  speed only (random tiles, no data loading):
    python distill.py config/g2l_brca.py --bench=20
Any setting below can be overridden by a config file and then by --key=value.

One step: uint8 tiles -> the same random augmentation for both models, on the device -> teacher
forward (no grad) -> student forward -> Linear + BatchNorm projection to the teacher's width ->
loss -> backward -> clip -> fused AdamW. Teacher and student each normalise with their own mean/std.
"""
import json
import math
import os
import signal
import sys
import time
from contextlib import nullcontext

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
# defaults: the G2L recipe (shared/reference.md); config/*.py and --key=value override them
# I/O
out_dir = 'out'  # checkpoints, log.jsonl, loss.png, the exported student
data_dir = 'tiles'  # a tiles folder written by tile.py
synthetic_slides = 0  # demo only: if data_dir is missing, write and tile this many synthetic slides
resume = False  # continue from out_dir/ckpt.pt (model, optimizer, step, data position, RNG)
log_interval = 10  # steps between log lines
eval_interval = 250  # steps between held-out teacher-student cosine measurements
ckpt_interval = 1000  # steps between checkpoints (one is also written at the end and on SIGTERM)
val_fraction = 0.02  # fraction of slides held out for the cosine measurement (at least one slide)
val_tiles = 512  # at most this many held-out tiles are embedded at each evaluation
# models (names from model.py --list, or a distilled output folder)
teacher = 'H-optimus-0'  # frozen; G2L's teacher
teacher_weights = ''  # '' = the model's default (the hub), 'random', or a local file/folder
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
teacher_bf16 = True  # keep the frozen teacher's weights in bf16 on CUDA (half its memory)
seed = 1337  # decides the held-out slides, tile order, augmentations and projection init
bench = 0  # >0: time this many steps on random tiles (no data loading) and exit
debug_nan_step = -1  # testing aid: poison the loss at this step to exercise the non-finite guard
# -----------------------------------------------------------------------------

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
# the loss: the student's projected embedding against the teacher's

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
    """The student backbone plus the heads distillation adds; only the backbone is exported."""

    def __init__(self, backbone, spec, teacher_spec):
        super().__init__()
        self.backbone, self.spec = backbone, spec
        # G2L's projection to the teacher's embedding width: Linear + BatchNorm. No bias before
        # BatchNorm: BN removes any shift, so the bias would get no gradient
        width = teacher_spec['dim']
        self.head = nn.Sequential(nn.Linear(spec['dim'], width, bias=False), nn.BatchNorm1d(width))
        # a Linear on the patch tokens, only for the optional patch term (patch_weight > 0)
        self.patch_head = None
        if patch_weight > 0:
            self.patch_head = nn.Linear(spec['width'], teacher_spec['width'])

    def forward(self, images):
        pooled, patches = zoo.embed(self.backbone, self.spec, images)
        if self.patch_head is None:
            return self.head(pooled), None
        return self.head(pooled), self.patch_head(patches)


def patch_distance(s_patches, t_patches):
    """Patch-token term; the student's grid is resized to the teacher's when patch sizes differ."""
    s_grid, t_grid = math.isqrt(s_patches.shape[1]), math.isqrt(t_patches.shape[1])
    if s_grid != t_grid:
        grid = s_patches.transpose(1, 2).reshape(len(s_patches), -1, s_grid, s_grid)
        resized = F.interpolate(grid.float(), size=(t_grid, t_grid), mode='bilinear')
        s_patches = resized.flatten(2).transpose(1, 2)
    return distance(s_patches.flatten(0, 1), t_patches.flatten(0, 1))


# -----------------------------------------------------------------------------
# the schedules and the order of the tiles

def schedule(step, start, end, warmup=0):
    """Linear warm-up to `start` over `warmup` steps, then a cosine from `start` to `end` that
    ends at lr_decay_iters (or max_iters) and stays there."""
    if step < warmup:
        return start * (step + 1) / warmup
    total = lr_decay_iters or max_iters
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return end + 0.5 * (1 + math.cos(math.pi * t)) * (start - end)


def batches(n_tiles, start_step, rank, world, rng_seed):
    """Endless lists of tile indices for this rank, one per micro-batch, from start_step on."""
    # epoch e is a permutation seeded by (seed, e); each step takes the next global batch and each
    # (micro-step, rank) its slice of it. The position is a function of the step, so resuming at
    # step s reads exactly the tiles s would have read
    global_batch = batch_size * grad_accum * world
    per_epoch = n_tiles // global_batch
    step, order_epoch = start_step, None
    while True:
        epoch, b = divmod(step, per_epoch)
        # once per epoch: permuting ~10M tiles takes a good part of a second
        if epoch != order_epoch:
            order = np.random.default_rng([rng_seed, epoch]).permutation(n_tiles)
            order_epoch = epoch
        chunk = order[b * global_batch:(b + 1) * global_batch]
        for micro in range(grad_accum):
            k = micro * world + rank
            yield chunk[k * batch_size:(k + 1) * batch_size].tolist()
        step += 1


def main():
    # config: module defaults < config file < --key=value; printed and saved with every checkpoint
    keys = [k for k, v in globals().items() if not k.startswith('_') and isinstance(v, (int, float, bool, str))]
    globals().update(zoo.configure({k: globals()[k] for k in keys}, sys.argv[1:]))
    config = {k: globals()[k] for k in keys}

    # DDP is detected from torchrun's environment; one process per GPU (or per CPU process, gloo)
    use_cuda = device == 'cuda' or (device == 'auto' and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise SystemExit('error: device=cuda but PyTorch sees no GPU; check nvidia-smi and the torch build, or use --device=cpu')
    ddp = int(os.environ.get('RANK', -1)) != -1
    if ddp:
        dist.init_process_group('nccl' if use_cuda else 'gloo')
        rank, local_rank, world = dist.get_rank(), int(os.environ['LOCAL_RANK']), dist.get_world_size()
    else:
        rank, local_rank, world = 0, 0, 1
    master = rank == 0
    dev = torch.device(f'cuda:{local_rank}' if use_cuda else 'cpu')
    if use_cuda:
        torch.cuda.set_device(dev)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32
    # precision lives here: bf16 autocast on CUDA; float32 on CPU, where bf16 is several times slower
    autocast = torch.autocast('cuda', dtype=torch.bfloat16) if use_cuda else nullcontext()
    global_batch = batch_size * grad_accum * world
    say = print if master else (lambda *a, **k: None)
    say(json.dumps(config))
    say(f'global batch {global_batch} = {batch_size} per GPU x {grad_accum} accumulation x {world} processes')
    ckpt_path = os.path.join(out_dir, 'ckpt.pt')
    if not bench and os.path.exists(ckpt_path) and not resume:
        raise SystemExit(f'error: {ckpt_path} exists; pass --resume=True to continue it or choose another out_dir')

    # data: tile indices per rank; tiles are read as uint8 by DataLoader workers
    if not bench:
        if master and synthetic_slides and not os.path.isdir(data_dir):
            make_demo_data()
        if ddp:
            dist.barrier()  # other ranks wait for the demo tiles
        tiles = tile.TileDataset(data_dir)
        if crop_size > tiles.tile_size:
            raise SystemExit(f'error: crop_size {crop_size} is larger than the {tiles.tile_size} px tiles in {data_dir}')
        # held-out slides drawn at random (seeded): sorted names would hold out one site of a TCGA
        # cohort; the measured tiles are a random sample across all of them
        rng = np.random.default_rng(seed)
        held_out = rng.permutation(len(tiles.stems))[:max(1, round(val_fraction * len(tiles.stems)))]
        is_val = np.isin(tiles.slide_index, held_out) if len(tiles.stems) > 1 else np.zeros(len(tiles), bool)
        val_idx = np.sort(rng.permutation(np.flatnonzero(is_val))[:val_tiles])
        train_idx = np.flatnonzero(~is_val)
        if len(train_idx) < global_batch:
            raise SystemExit(f'error: {len(train_idx)} training tiles in {data_dir}, fewer than the global batch {global_batch}')
        say(f'{len(train_idx)} training tiles from {len(np.unique(tiles.slide_index[train_idx]))} slides, '
            f'{len(val_idx)} held-out tiles measured')

    # models, in the deliberate order: build -> load weights -> optimizer -> its state -> compile -> DDP
    # --bench times random weights unless told otherwise: speed does not depend on them
    t_model, t_spec = zoo.create(teacher, teacher_weights or ('random' if bench else None), device=dev)
    s_backbone, s_spec = zoo.create(student, student_weights or ('random' if bench else None), device=dev)
    if t_spec['img_size'] != crop_size or s_spec['img_size'] != crop_size:
        raise SystemExit(f"error: crop_size {crop_size} must equal both models' input sizes "
                         f"({t_spec['img_size']}, {s_spec['img_size']})")
    t_model.requires_grad_(False)
    if use_cuda and teacher_bf16:
        t_model.to(torch.bfloat16)
    torch.manual_seed(seed)  # the same projection init on every rank and for any world size
    raw_student = Student(s_backbone, s_spec, t_spec).to(dev).train()
    s_backbone.set_grad_checkpointing(grad_ckpt)
    flops = zoo.flops_per_image(t_spec, crop_size) + 3 * zoo.flops_per_image(s_spec, crop_size)  # fwd + bwd = 3x fwd
    peak = next((v for k, v in PEAK_FLOPS.items() if k in torch.cuda.get_device_name(dev)), None) if use_cuda else None
    say(f"teacher {t_spec['name']} {zoo.param_count(t_spec) / 1e6:.0f}M, student {s_spec['name']} "
        f"{zoo.param_count(s_spec) / 1e6:.0f}M, {flops / 1e9:.1f} GFLOP per image per step")

    # AdamW; no weight decay on norms, biases, class/register tokens and position embeddings
    no_decay = lambda n, p: p.ndim < 2 or any(s in n for s in ('pos_embed', 'cls_token', 'reg_token'))
    named = list(raw_student.named_parameters())
    groups = [dict(params=[p for n, p in named if not no_decay(n, p)], weight_decay=weight_decay),
              dict(params=[p for n, p in named if no_decay(n, p)], weight_decay=0.0)]
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=(beta1, beta2), fused=fused_adam)
    step, state = 0, dict(recent=[], above=0, nonfinite=0, skipped=0)
    if resume and not bench and os.path.exists(ckpt_path):
        ckpt = torch.load(ckpt_path, map_location='cpu', weights_only=False)
        for k in ('teacher', 'student', 'loss', 'patch_weight', 'batch_size', 'grad_accum', 'seed'):
            if ckpt['config'][k] != config[k]:
                raise SystemExit(f"error: --{k}={config[k]!r} differs from the checkpoint's {ckpt['config'][k]!r}")
        if ckpt['world'] != world:
            raise SystemExit(f"error: the checkpoint ran on {ckpt['world']} processes; resume on the same number")
        try:
            raw_student.load_state_dict(ckpt['student'])
        except RuntimeError as e:  # a checkpoint of another student or projection layout
            raise SystemExit(f"error: {ckpt_path} does not fit this student: {str(e).splitlines()[1].strip()}") from None
        optimizer.load_state_dict(ckpt['optimizer'])
        step, state = ckpt['step'], ckpt['state']
        torch.set_rng_state(ckpt['rng'][rank])
        say(f'resumed from {ckpt_path} at step {step}')
        del ckpt  # free the checkpoint's memory before compiling
    else:
        torch.manual_seed(seed + rank)
    # DDP first, then compile: the compiler then splits the student's graph at DDP's gradient
    # buckets so their all-reduce overlaps the backward. The teacher is compiled as the function
    # it runs (model.embed): torch.compile(module) would only compile its __call__
    teacher_embed = lambda images: zoo.embed(t_model, t_spec, images)
    ddp_student = DDP(raw_student, device_ids=[local_rank] if use_cuda else None) if ddp else None
    student_fwd = ddp_student or raw_student
    if compile:
        teacher_embed = torch.compile(teacher_embed, backend=compile_backend)
        student_fwd = torch.compile(student_fwd, backend=compile_backend)

    def train_step(next_tiles, tile_size, step):
        """One optimizer step over grad_accum micro-batches; returns the loss, grad norm and cosine."""
        p = augment_params(global_batch, step, tile_size, crop_size)
        losses, cosines = [], []
        for micro in range(grad_accum):
            k = micro * world + rank  # this micro-batch's slice of the global batch
            images = augment(next_tiles(), {n: v[k * batch_size:(k + 1) * batch_size].to(dev) for n, v in p.items()}, crop_size)
            # skip the gradient all-reduce on all but the last micro-step
            sync = nullcontext() if not ddp or micro == grad_accum - 1 else ddp_student.no_sync()
            with sync, autocast:
                with torch.no_grad():  # not inference_mode: its tensors cannot enter the student's graph
                    t_pooled, t_patches = teacher_embed(images)
                s_pooled, s_patches = student_fwd(images)
                batch_loss = distance(s_pooled, t_pooled)
                if patch_weight > 0:
                    batch_loss = batch_loss + patch_weight * patch_distance(s_patches, t_patches)
                if step == debug_nan_step:
                    batch_loss = batch_loss * float('nan')
                (batch_loss / grad_accum).backward()  # mean over micro-batches, as one big batch
            losses.append(batch_loss.detach())
            cosines.append(F.cosine_similarity(s_pooled.detach().float(), t_pooled.float()).mean())
        # clip_grad_norm_ returns the norm before clipping; DDP already averaged the gradients, so
        # every rank sees the same norm and takes the same decision
        grad_norm = torch.nn.utils.clip_grad_norm_(raw_student.parameters(), grad_clip or float('inf'))
        if torch.isfinite(grad_norm):
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)  # frees the gradients' memory until the next backward
        return torch.stack(losses).mean(), grad_norm, torch.stack(cosines).mean()

    def sync_time():
        if use_cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    if bench:  # speed only: random uint8 tiles already on the device, nothing read from disk
        random_tiles = lambda: torch.randint(0, 256, (batch_size, 3, 256, 256), dtype=torch.uint8, device=dev)
        warmup = 10 if compile else 3  # compilation happens in the first steps
        for i in range(warmup):
            train_step(random_tiles, 256, i)
        if use_cuda:
            torch.cuda.reset_peak_memory_stats()
        t0 = sync_time()
        for i in range(bench):
            train_step(random_tiles, 256, warmup + i)
        dt = (sync_time() - t0) / bench
        ips = global_batch / dt
        mem = torch.cuda.max_memory_allocated(dev) / 2 ** 30 if use_cuda else peak_rss_gib()
        say(f"bench {t_spec['name']} -> {s_spec['name']} at {crop_size} px, batch {batch_size}/GPU, "
            f"compile={compile} grad_ckpt={grad_ckpt}: {dt * 1000:.1f} ms/step, "
            f"{ips:.1f} images/s, MFU {mfu_text(flops * ips / world, peak)}, peak memory {mem:.2f} GiB")
        finish(ddp)
        return

    # tiles arrive as uint8 from workers (pinned, prefetched); every random choice is made on the device
    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(tiles, train_idx), batch_sampler=batches(len(train_idx), step, rank, world, seed),
        num_workers=num_workers, pin_memory=use_cuda, persistent_workers=num_workers > 0,
        prefetch_factor=4 if num_workers else None, worker_init_fn=ignore_sigterm)
    loader_iter = iter(loader)

    def next_tiles():
        return next(loader_iter).to(dev, non_blocking=True)

    val_batches = []  # (uint8 centre crops, teacher embeddings): read and embedded once, the teacher is frozen

    def held_out_cosine():
        """Mean teacher-student cosine on held-out slides (centre crops). The projection's BatchNorm
        normalises with the held-out set's own statistics ("precise BN"): its running averages
        (momentum 0.1) lag a projection that is still moving, and measured in eval mode the demo's
        cosine swung between -0.11 and 0.43 while this measure rose steadily. The projection is
        discarded after training, so the measure is of the student's features, not of that lag."""
        if not len(val_idx):
            return None
        raw_student.eval()
        o = (tiles.tile_size - crop_size) // 2
        with torch.no_grad(), autocast:
            if not val_batches:
                for chunk in np.array_split(val_idx, math.ceil(len(val_idx) / batch_size)):
                    crops = torch.stack([tiles[i] for i in chunk]).to(dev)[:, :, o:o + crop_size, o:o + crop_size]
                    val_batches.append((crops, zoo.embed(t_model, t_spec, crops)[0].float()))
            linear, bn = raw_student.head
            projected = torch.cat([linear(zoo.embed(s_backbone, s_spec, crops)[0]) for crops, _ in val_batches]).float()
            projected = F.batch_norm(projected, None, None, bn.weight, bn.bias, training=True, eps=bn.eps)
            cosine = F.cosine_similarity(projected, torch.cat([t for _, t in val_batches])).mean().item()
        raw_student.train()
        return cosine

    def save_checkpoint():
        rng = [torch.empty(0)] * world
        if ddp:
            dist.all_gather_object(rng, torch.get_rng_state())
        else:
            rng = [torch.get_rng_state()]
        if master:
            os.makedirs(out_dir, exist_ok=True)
            ckpt = dict(student=raw_student.state_dict(), optimizer=optimizer.state_dict(), step=step,
                        state=state, config=config, world=world, rng=rng)
            tile.save_atomic(ckpt_path, lambda f: torch.save(ckpt, f))  # a kill leaves the old one, never half

    # pre-emption (SIGTERM; SIGUSR1 is what Slurm's --signal sends ahead of time) only raises a
    # flag: the loop finishes its step, every rank checkpoints at the same step, and the run exits
    stop = dict(signal=0)
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, lambda signum, _: stop.update(signal=signum))
    if master:
        os.makedirs(out_dir, exist_ok=True)
        trim_log(os.path.join(out_dir, 'log.jsonl'), step)
        log_file = open(os.path.join(out_dir, 'log.jsonl'), 'a')
        if step == 0 and (c := held_out_cosine()) is not None:
            print(f'step 0: held-out teacher-student cosine {c:.4f}')
            log_file.write(json.dumps(dict(step=0, val_cosine=c)) + '\n')
    bar = tqdm(total=max_iters, initial=step, disable=not master, dynamic_ncols=True)
    t0, t0_step, why, signalled = sync_time(), step, 'reached max_iters', False
    interval = []  # finite losses since the last log line: the logged loss is their mean, less noisy than one batch
    while step < max_iters:
        for g in optimizer.param_groups:
            g['lr'] = schedule(step, lr, min_lr, warmup_iters)
        optimizer.param_groups[0]['weight_decay'] = schedule(step, weight_decay, weight_decay_end)  # group 0 decays
        bn_stats = {k: v.clone() for k, v in raw_student.head[1].state_dict().items()}
        batch_loss, grad_norm, cosine = train_step(next_tiles, tiles.tile_size, step)
        # one small all-reduce per step: mean loss across ranks plus the stop flag, so every rank
        # takes the same early-stop / non-finite / pre-emption decision at the same step
        shared = torch.stack([batch_loss.float(), cosine.float(), torch.tensor(float(stop['signal'] > 0), device=dev)])
        if ddp:
            dist.all_reduce(shared)
            shared[:2] /= world
        batch_loss, cosine, signalled = shared[0].item(), shared[1].item(), shared[2].item() > 0
        step += 1
        bar.update(1)
        if not (math.isfinite(batch_loss) and math.isfinite(grad_norm.item())):
            raw_student.head[1].load_state_dict(bn_stats)  # a NaN forward also poisoned BatchNorm's running stats
            state['skipped'] += 1
            state['nonfinite'] += 1
            if state['nonfinite'] >= max_nonfinite:
                why = f'{max_nonfinite} non-finite losses in a row: lower lr, check the data, or resume from the checkpoint'
                break
        else:
            state['nonfinite'] = 0
            interval.append(batch_loss)
            # the paper's early stop, read as: more than `patience` consecutive losses above the mean
            # of the previous `window` losses (a plateau or a rise), counted only when enabled
            recent = state['recent']
            state['above'] = state['above'] + 1 if len(recent) == early_stop_window and batch_loss > sum(recent) / len(recent) else 0
            state['recent'] = (recent + [batch_loss])[-early_stop_window:]
            if early_stop and state['above'] > early_stop_patience:
                why = f'early stop: the loss exceeded its {early_stop_window}-step mean {state["above"]} times in a row'
                break
        if step % log_interval == 0 or step == max_iters:
            dt = (sync_time() - t0) / (step - t0_step)
            ips = global_batch / dt
            row = dict(step=step, loss=sum(interval) / len(interval) if interval else float('nan'),
                       lr=optimizer.param_groups[0]['lr'], grad_norm=grad_norm.item(), cosine=cosine,
                       images_per_s=round(ips, 1), mfu=flops * ips / world / peak if peak else None,
                       skipped=state['skipped'])
            if master:
                if step % eval_interval == 0 or step == max_iters:
                    row['val_cosine'] = held_out_cosine()
                # NaN/inf as null: log.jsonl stays valid JSON for jq, pandas and friends
                log_file.write(json.dumps({k: None if isinstance(v, float) and not math.isfinite(v) else v
                                           for k, v in row.items()}) + '\n')
                log_file.flush()
                bar.set_postfix_str(f"loss {row['loss']:.4f} cos {cosine:.3f} {ips:.0f} img/s MFU {mfu_text(row['mfu'], 1)}")
                if row.get('val_cosine') is not None:
                    bar.write(f"step {step}: loss {row['loss']:.4f}, held-out teacher-student cosine {row['val_cosine']:.4f}")
            t0, t0_step, interval = sync_time(), step, []
        if signalled:
            why = 'pre-empted (SIGTERM/SIGUSR1): checkpoint written; rerun with --resume=True to continue'
            break
        if step % ckpt_interval == 0:
            save_checkpoint()
    bar.close()
    save_checkpoint()
    if master:
        log_file.close()
        if not signalled:  # pre-empted runs leave quickly; the export comes when the run completes
            zoo.export(s_backbone, s_spec, out_dir)
            plot_loss(os.path.join(out_dir, 'log.jsonl'), os.path.join(out_dir, 'loss.png'))
        print(f"stopped at step {step}: {why}; {state['skipped']} non-finite steps skipped; "
              f"outputs in {out_dir}")
    finish(ddp)
    if why.startswith(f'{max_nonfinite} non-finite'):
        raise SystemExit(f'error: {why}')
    if signalled:  # not finished: a non-zero status (128 + signal, the shell's convention) says so
        raise SystemExit(128 + (stop['signal'] or signal.SIGTERM))


def ignore_sigterm(worker_id):
    # on pre-emption the scheduler may signal every process; loader workers must outlive the
    # main process's last step and checkpoint, so only the main process reacts
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def mfu_text(mfu, peak):
    return f'{100 * mfu / peak:.1f}%' if mfu is not None and peak else 'n/a (unknown device peak)'


def peak_rss_gib():
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


def finish(ddp):
    if ddp:
        dist.barrier()
        dist.destroy_process_group()


def trim_log(path, step):
    """On resume, drop log lines the killed run wrote after its last checkpoint (atomically)."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        rows = [line for line in f if line.strip() and json.loads(line)['step'] <= step]
    tile.save_atomic(path, lambda f: f.write(''.join(rows).encode()))


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


def make_demo_data():
    """The demo's data: small synthetic H&E-like slides (tile.py writes them), then tiled."""
    slides_dir = os.path.join(os.path.dirname(os.path.abspath(data_dir)), 'slides')
    os.makedirs(slides_dir, exist_ok=True)
    paths = []
    for i in range(synthetic_slides):
        paths.append(os.path.join(slides_dir, f'synthetic_{i}.tiff'))
        if not os.path.exists(paths[-1]):
            tile.write_synthetic_slide(paths[-1], width=3072, height=2048, mpp=0.5, seed=i)
    rows = tile.tile_slides(paths, data_dir + '.tmp', mpp=0.5, tile_size=256, min_tissue=0.5)
    if any(r['status'] != 'ok' for r in rows):
        raise SystemExit(f'error: tiling the demo slides failed: {rows}')
    os.replace(data_dir + '.tmp', data_dir)  # the folder appears only once complete


if __name__ == '__main__':
    main()
