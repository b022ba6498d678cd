r"""
Evaluate frozen encoders side by side, the way G2L (arXiv 2510.11176) compares the giga teacher
(H-optimus-0) with the student before (Hibou-L) and after distillation: linear probe and kNN on
tiles, ABMIL and mean-pooled probes on whole slides, linear CKA to the teacher, and the robustness
index across medical centres (de Jong et al. 2025). One row per model, teacher first.

CPU demo: the distillation demo (torchrun ... distill.py config/demo.py) ends by running this on
its labelled patches; to run it again by hand, on the demo teacher and the student before and after:
    python evaluate.py --data data/demo/patches/labels.csv --out out/demo/eval --device cpu \
      --models tiny-teacher=data/demo/teacher.safetensors,tiny-student,local-dir:out/demo/student \
      --names "teacher,student before,student after"
Single GPU (bf16; NAME=PATH loads local weights; a distilled folder or a timm hub name,
local-dir:FOLDER or hf-hub:USER/NAME, needs no NAME):
    python evaluate.py --data brca_patches/ \
        --models H-optimus-0=/data/hf/H-optimus-0,Hibou-L=/data/hf/hibou-L,out/g2l_brca \
        --names "teacher,student before,student after"
    python evaluate.py config/eval_brca.py     # the same, with the settings in a config file
Slide level: every tile of each slide into OUT/features/<model>/<stem>.h5 (TRIDENT's layout),
then ABMIL and mean-pooled probes on the slides' labels:
    python tile.py /data/TCGA-BRCA --out tiles/brca
    python evaluate.py --slides brca_slides.csv --tiles tiles/brca \
        --models H-optimus-0=/data/hf/H-optimus-0,Hibou-L=/data/hf/hibou-L,out/g2l_brca
Is extraction bound by slide reading or by the model? Tiles/s of each, on 512 tiles:
    python evaluate.py --bench=512 --tiles tiles/brca --models H-optimus-0=/data/hf/H-optimus-0
No torchrun line: extraction is one forward pass per image. For several GPUs run one process per
model with the same --out and --extract_only=True: it embeds into the model's own cache and feature
files (written atomically) and writes no results, which would be a one-row table. Then one run with
all models finds them done and scores every row:
    CUDA_VISIBLE_DEVICES=0 python evaluate.py config/eval_brca.py --extract_only=True \
        --models=H-optimus-0=/data/hf/H-optimus-0 &
    CUDA_VISIBLE_DEVICES=1 python evaluate.py config/eval_brca.py --extract_only=True \
        --models=Hibou-L=/data/hf/hibou-L &
    CUDA_VISIBLE_DEVICES=2 python evaluate.py config/eval_brca.py --extract_only=True \
        --models=out/g2l_brca &
    wait; python evaluate.py config/eval_brca.py

--data: an ImageFolder root (train/, optional val/, test/; a subfolder per class) or a CSV
path,label,split[,center][,slide] (paths relative to the CSV).
--slides: a CSV slide,label,split[,center] with --tiles, the folder tile.py wrote; slide is a stem
tile.py wrote, or the slide's path (relative to the CSV) or file name. Both --data and --slides
may be given; --slides then is the slide level.
Writes OUT/results.json, results.md, results.png (not with --extract_only); tile embeddings in
OUT/cache/.
--models: one row per entry, named by its model name, or by the whole entry when entries share a
name: --models Hibou-L,Hibou-L=out/g2l/student.safetensors is the student before and after
distillation. --names renames the rows (one name per entry, in order); --baseline names the row
before distillation, from which "closes X% of the gap to the teacher" is measured.
"""
import collections
import csv
import filecmp
import hashlib
import json
import os
import re
import sys
import tempfile
import time
import warnings
import zlib
from contextlib import nullcontext
from functools import partial

import h5py
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits  # comes with scikit-learn
from tqdm import tqdm

from model import configure, create, embed, resize_crop, resolve
from tile import (SlideError, TileDataset, check_readable, load_tiles, make_out_folder, npz_files,
                  one_writer, open_slide, readable_tiles, recorded_identity,
                  remove_stale_temporaries, sample_hash, save_atomic, slide_change)

# -----------------------------------------------------------------------------
# config: these defaults, then a config/*.py file, then --key=value
# (model.configure checks keys and types)
data = None                          # ImageFolder root or CSV path,label,split[,center][,slide]
slides = None                        # CSV slide,label,split[,center]: the slide level
tiles = None                         # the tiles folder tile.py wrote for --slides (and --bench)
# comma-separated, one row each: model.py names, NAME=WEIGHTS, timm hub names (local-dir:FOLDER,
# hf-hub:USER/NAME), distilled folders
models = 'tiny-teacher,tiny-student'
# the teacher rows, first in every table (CKA is measured to each): comma-separated names or
# entries of models (several for a committee), or more entries; None = the first of models
teacher = None
# display names of the rows, comma-separated, one per entry of models in its order; '' = the
# model names
names = ''
# the row before distillation (a name or entry) for "closes X% of the gap to the teacher";
# '' = the second row when there are three (teacher, before, after), else no gap lines
baseline = ''
out = 'out/eval'                     # results.* here, embeddings in out/cache/ and out/features/
batch_size = 64                      # images per forward pass
# image decoding and resizing run in DataLoader workers
num_workers = min(8, os.cpu_count() or 1)
device = 'cuda' if torch.cuda.is_available() else 'cpu'
# the linear probe's C grid: inverse L2 strengths tried (Patho-Bench sweeps a log grid)
probe_C = [1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0]
cv_folds = 5                         # stratified folds on train choose C without a val split
max_iter = 1000                      # lbfgs iterations per fit
knn_k = 20                           # the headline kNN (G2L and DINO report k=20 voting)
knn_k_max = 50                       # and kNN at the k in 1..knn_k_max best on val (THUNDER)
ri_k = [3, 5, 10, 20]                # the k at which G2L reports the robustness index (on TIGER)
bootstrap = 1000                     # test-set resamples for the 95% confidence intervals
seed = 0                             # probe fits, CV folds, resamples, ABMIL, tile subsets
# at most this many tiles per slide are embedded, drawn at random (seeded), for quick runs;
# 0 = every tile
max_tiles = 0
# ABMIL as Patho-Bench trains it: AdamW, cosine schedule, class-balanced loss, one bag a step
abmil_epochs = 20
abmil_lr = 3e-4
abmil_weight_decay = 1e-5
abmil_bag = 2048                     # tiles sampled per slide per training step; all at test
# width (Patho-Bench's 512); at most 4x the features' own, so tiny models' heads stay cheap
abmil_hidden = 512
abmil_dropout = 0.25
abmil_seeds = 5                      # trainings per model (eva runs 5); their metrics averaged
cka_tiles = 4096                     # test slides' tiles sampled for the slide-level CKA
bench = 0                            # > 0: tiles/s of reading, model, extraction on this many
# True: embed only (OUT/cache/, OUT/features/), score nothing, write no results: one process per
# model on several GPUs; --teacher, --names and --baseline are then the scoring run's
extract_only = False
# -----------------------------------------------------------------------------
# every plain value above is a config key
config_types = (int, float, str, list, type(None))
config_keys = [k for k, v in globals().items()
               if not k.startswith('_') and isinstance(v, config_types)]
DEFAULTS = {k: globals()[k] for k in config_keys}

SPLITS = ('train', 'val', 'test')
IMAGE_EXTS = ('.png', '.jpg', '.jpeg', '.tif', '.tiff', '.bmp', '.webp')
# bytes read from each end of an image to tell copies from images of the same size
IMAGE_SAMPLE_BYTES = 1 << 16
# the first leads the tables, as balanced accuracy leads eva's
METRICS = {'balanced_accuracy': 'bal. acc',
           'f1_macro': 'macro F1',
           'auroc': 'AUROC',
           'accuracy': 'acc'}
# bump when load_images or the cache layout changes: old caches then miss
CACHE_VERSION = 'v2 shorter side, centre crop'
# bump when the slide feature files change: old files then are re-extracted
FEATURES_VERSION = 'v2 TRIDENT layout, centre crop, slide identity, data hash'
# the compact table of each level: (protocol, metric) per column; the first column is the one
# "closes X% of the gap" is measured on. CKA has no metric: it is an entry of its own.
HEADLINE = {'tile': [('linear', 'balanced_accuracy'), ('knn', 'balanced_accuracy'),
                     ('linear', 'auroc'), ('cka', None)],
            'slide': [('abmil', 'balanced_accuracy'), ('abmil', 'auroc'),
                      ('linear', 'balanced_accuracy'), ('cka', None)]}

# -----------------------------------------------------------------------------
# data

def read_dataset(source):
    """ImageFolder or CSV -> dict of paths, int labels, splits, classes, file stamps, and the center
    and slide arrays (None when the source has no such column)."""
    if source is None or not os.path.exists(source):
        problem = '--data is required' if source is None else f'--data {source} not found'
        raise SystemExit(f'error: {problem}: give an ImageFolder root (train/, val/, test/) '
                         'or a CSV with columns path,label,split[,center][,slide]')
    rows = read_csv(source) if os.path.isfile(source) else read_imagefolder(source)
    check_one_row_per_image(source, rows)
    for r in rows:
        if r['split'] not in SPLITS:
            raise SystemExit(f"error: {r['path']}: split {r['split']!r} is not one of "
                             f"{', '.join(SPLITS)}")
    split = np.array([r['split'] for r in rows])
    classes = sorted({r['label'] for r in rows})
    labels = np.array([classes.index(r['label']) for r in rows])
    check_splits(source, split, labels, classes)
    dataset = dict(source=source, paths=[r['path'] for r in rows], labels=labels, split=split,
                   classes=classes, stamps=file_stamps(rows))
    for column in ('center', 'slide'):
        dataset[column] = np.array([r[column] for r in rows]) if column in rows[0] else None
    if dataset['slide'] is not None:
        check_one_label_and_split_per_slide(dataset)
    else:
        check_no_image_in_two_splits(dataset)
    return dataset


def check_one_row_per_image(source, rows):
    """Each image listed once: a repeated row counts twice in training, and in test it narrows
    the CIs of a test set that is no larger."""
    first_row = {}
    for i, r in enumerate(rows, 1):
        # one file by two names (a link) is one image too
        image = os.path.realpath(r['path'])
        if image in first_row:
            raise SystemExit(f"error: {source} lists {r['path']} twice (rows {first_row[image]} "
                             f'and {i} under the header): one row per image')
        first_row[image] = i


def check_no_image_in_two_splits(dataset):
    """No image in two splits as two files (a copy): without a slide column nothing else keeps a
    test image out of training, where it inflates every score."""
    same_size = collections.defaultdict(list)
    for i, (_, size, _) in enumerate(dataset['stamps']):
        same_size[size].append(i)
    split, paths = dataset['split'], dataset['paths']
    for size, group in same_size.items():
        if len({split[i] for i in group}) < 2:
            continue
        # only files of one size can be one image; of those, the ends are hashed (uncompressed
        # TIFFs of one size differ there, in their first rows of pixels), and whole files
        # compared only when their ends agree
        first_of = {}
        for i in group:
            j = first_of.setdefault(sample_hash(paths[i], size, IMAGE_SAMPLE_BYTES), i)
            if split[j] != split[i] and filecmp.cmp(paths[i], paths[j], shallow=False):
                raise SystemExit(f'error: {paths[j]} ({split[j]}) and {paths[i]} ({split[i]}) are '
                                 'the same image, in two splits: remove one of them')


def check_splits(source, split, labels, classes, unit='images'):
    """Train and test must have samples, every class must have train samples, and there must be
    two classes or more."""
    for s in ('train', 'test'):
        if not (split == s).any():
            raise SystemExit(f'error: {source}: the {s} split has no {unit}; '
                             'train and test are required, val is optional')
    trained_classes = set(labels[split == 'train'])
    untrained = sorted(set(range(len(classes))) - trained_classes)
    if untrained:
        raise SystemExit(f'error: {source}: class {classes[untrained[0]]!r} has no train {unit}, '
                         'so no probe can learn it')
    if len(classes) < 2:
        raise SystemExit(f'error: {source}: every {unit[:-1]} has the label {classes[0]!r}: a '
                         'probe needs two classes or more')


def file_stamps(rows):
    """Path, size and mtime of every image: the data half of the cache key."""
    stamps = []
    for r in rows:
        try:
            stat = os.stat(r['path'])
        except OSError:
            raise SystemExit(f"error: image {r['path']} does not exist")
        stamps.append((r['path'], stat.st_size, stat.st_mtime_ns))
    return stamps


def check_one_label_and_split_per_slide(dataset):
    # a slide is one sample at slide level: one label and one split, or its tiles would leak
    # between train and test
    slide_of_tile = np.unique(dataset['slide'], return_inverse=True)[1]
    split_codes = np.unique(dataset['split'], return_inverse=True)[1]
    for values in (dataset['labels'], split_codes):
        # each slide keeps its last tile's value; any tile that disagrees with it is mixed
        per_slide = np.zeros(slide_of_tile.max() + 1, int)
        per_slide[slide_of_tile] = values
        mixed = np.flatnonzero(per_slide[slide_of_tile] != values)
        if len(mixed):
            slide = str(dataset['slide'][mixed[0]])
            raise SystemExit(f'error: slide {slide!r} has tiles with different labels or splits; '
                             'a slide-level task needs one label and one split per slide')


def read_imagefolder(root):
    """Rows of path, label, split from root/<split>/<class>/<image>."""
    rows = []
    for split in SPLITS:
        split_dir = os.path.join(root, split)
        if not os.path.isdir(split_dir):
            if split == 'val':
                continue
            raise SystemExit(f'error: {split_dir} is missing: an ImageFolder root needs train/ and '
                             'test/ (val/ optional), each with one subfolder per class')
        names = os.listdir(split_dir)
        class_names = [d for d in names if os.path.isdir(os.path.join(split_dir, d))]
        for label in sorted(class_names):
            class_dir = os.path.join(split_dir, label)
            files = sorted(f for f in os.listdir(class_dir) if f.lower().endswith(IMAGE_EXTS))
            if not files:
                raise SystemExit(f'error: class folder {class_dir} has no images '
                                 f'({" ".join(IMAGE_EXTS)})')
            rows += [dict(path=os.path.join(class_dir, f), label=label, split=split) for f in files]
    return rows


def read_csv(path):
    """Rows of the CSV, with each path made absolute."""
    rows = read_table(path, ('path', 'label', 'split'), 'path,label,split[,center][,slide]')
    # paths are relative to the CSV's folder; absolute paths pass through
    base = os.path.dirname(os.path.abspath(path))
    for r in rows:
        r['path'] = os.path.join(base, r['path'])
    return rows


def read_table(path, columns, header):
    """Rows of a CSV that has the columns and at least one row; header: what to ask for when not."""
    with open(path, newline='') as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    missing = set(columns) - set(reader.fieldnames or [])
    if missing or not rows:
        what = ', '.join(sorted(missing)) or 'rows'
        raise SystemExit(f'error: {path} needs a header {header} and at least one row '
                         f'(missing: {what})')
    return rows


def load_images(paths, spec):
    """DataLoader collate_fn, so decoding runs in the workers: image paths -> ([0, 1] float
    (B, 3, S, S), None), or (None, error)."""
    images = []
    for path in paths:
        try:
            with Image.open(path) as im:
                im = im.convert('RGB')
        except Exception as e:
            # a worker's traceback would bury the file name: hand back one line instead
            return None, f'error: cannot read image {path} ({type(e).__name__}); fix or remove it'
        pixels = torch.from_numpy(np.array(im)).permute(2, 0, 1)[None]
        # model.embed's own preprocessing of a whole image: the card's shorter side, then a centre
        # crop, never squashed (cells keep their shape). Tiles of the card's size (S x S, or
        # `resize`) keep their um/px; others scale.
        images.append(resize_crop(spec, pixels)[0])
    return torch.stack(images), None

# -----------------------------------------------------------------------------
# slides: a CSV of labelled slides, each found in the tiles folder tile.py wrote

def read_cohort(source, tiles_dir):
    """slides.csv resolved against the tiles folder: a dict of its source, its usable rows (slide,
    label, split, and the slide's 'tiles' from slide_tiles), one TileDataset of them, and the
    slides that cannot be used with their one-line reasons, printed as they are found."""
    rows = read_slide_csv(source)
    if tiles_dir is None:
        raise SystemExit('error: --slides needs --tiles, the folder tile.py wrote for the slides')
    tiled = tiled_slides(tiles_dir)
    index = slide_index(tiled)
    base = os.path.dirname(os.path.abspath(source))
    usable, failed = [], {}
    for r in rows:
        # a missing or damaged slide is one line, and the others go on
        try:
            stem = match_slide(r['slide'], base, tiled, index, tiles_dir)
            r['tiles'] = slide_tiles(os.path.join(tiles_dir, stem + '.npz'), stem)
            usable.append(r)
        except SlideError as e:
            failed[r['slide']] = str(e)
            print(f"error: slide {r['slide']}: {e}")
    if not usable:
        raise SystemExit(f'error: none of the {len(rows)} slides of {source} can be used: '
                         'see the reasons above')
    stems = [r['tiles']['stem'] for r in usable]
    twice = sorted({s for s in stems if stems.count(s) > 1})
    if twice:
        listed = [r['slide'] for r in usable if r['tiles']['stem'] == twice[0]]
        raise SystemExit(f"error: {source} lists slide {twice[0]} twice ({', '.join(listed)}): "
                         'one row per slide')
    tile_sizes = sorted({r['tiles']['tile_size'] for r in usable})
    if len(tile_sizes) > 1:
        raise SystemExit(f'error: {tiles_dir} mixes tile sizes {tile_sizes}: tile each size into '
                         'its own folder')
    cohort = dict(source=source, tiles=tiles_dir, rows=usable, failed=failed)
    cohort['tileset'] = cohort_tiles(cohort)
    return cohort


def read_slide_csv(path):
    """Rows of slides.csv: slide, label, split[, center]; each slide once, each split known."""
    if path is None or not os.path.isfile(path):
        raise SystemExit(f'error: --slides {path} not found: give a CSV slide,label,split[,center] '
                         '(slide: a stem tile.py wrote, or the slide path)')
    rows = read_table(path, ('slide', 'label', 'split'), 'slide,label,split[,center]')
    listed = [r['slide'] for r in rows]
    twice = sorted({s for s in listed if listed.count(s) > 1})
    if twice:
        raise SystemExit(f'error: {path} lists slide {twice[0]} twice: one row per slide')
    for r in rows:
        if r['split'] not in SPLITS:
            raise SystemExit(f"error: {path}: slide {r['slide']}: split {r['split']!r} is not one "
                             f"of {', '.join(SPLITS)}")
    return rows


def tiled_slides(tiles_dir):
    """{stem: slide path} of every slide in a tiles folder (tile.py's <stem>.npz files); the path
    is None where the .npz is unreadable (warned about: a slide of slides.csv then fails alone)."""
    is_folder = tiles_dir is not None and os.path.isdir(tiles_dir)
    files = npz_files(tiles_dir) if is_folder else []
    if not files:
        raise SystemExit(f'error: --tiles {tiles_dir} holds no tiles: run '
                         f'`python tile.py SLIDES --out {tiles_dir}` first')
    records = readable_tiles(tiles_dir)
    stems = [name.removesuffix('.npz') for name in files]
    return {stem: str(records[stem]['slide_path']) if stem in records else None
            for stem in stems}


def slide_index(tiled):
    """{kind: {key: stems}}: each tiled slide by its real path, file name and file name without
    suffix, so slides.csv may name a slide any of these ways."""
    index = {'path': {}, 'file name': {}, 'file stem': {}}
    for stem, path in tiled.items():
        if path is None:
            continue
        name = os.path.basename(path)
        index['path'].setdefault(os.path.realpath(path), []).append(stem)
        index['file name'].setdefault(name, []).append(stem)
        index['file stem'].setdefault(os.path.splitext(name)[0], []).append(stem)
    return index


def match_slide(value, base, tiled, index, tiles_dir):
    """The stem of a slides.csv entry: itself when it is a stem, else the one slide with that
    path (relative to the CSV's folder), file name or file stem. SlideError when none or several."""
    if value in tiled and tiled[value] is None:
        raise SlideError(f'its {value}.npz in {tiles_dir} is unreadable: tile it again '
                         f'(python tile.py SLIDE --out {tiles_dir})')
    if value in tiled:
        return value
    keys = {'path': os.path.realpath(os.path.join(base, value)),
            'file name': value,
            'file stem': value}
    for kind, key in keys.items():
        stems = index[kind].get(key, [])
        if len(stems) == 1:
            return stems[0]
        if stems:
            raise SlideError(f"its {kind} fits {len(stems)} tiled slides ({', '.join(stems[:3])}): "
                             'give the stem')
    raise SlideError(f'not in {tiles_dir}: tile it first (python tile.py SLIDE --out {tiles_dir})')


def slide_tiles(npz_path, stem):
    """What extraction needs of one slide: the rows of its .npz that are embedded (all, unless
    max_tiles caps them), their coordinates, its pyramid level, sizes, mpp and level-0 size. The
    slide is opened and its first and last tiles read (tile.check_readable): a missing, changed
    or damaged slide fails here, with one line (SlideError), not in the middle of a batch."""
    record = load_tiles(npz_path)
    coords = record['coords'].reshape(-1, 2)
    slide = {k: record[k].item() for k in ('level', 'read_size', 'tile_size', 'mpp', 'slide_mpp')}
    slide_path = str(record['slide_path'])
    if not len(coords):
        raise SlideError(f'no tiles: tile.py found no tissue on it (see {stem}.jpg)')
    change = slide_change(record, slide_path)
    if change == 'gone':
        raise SlideError(f'{slide_path} is gone: put it back, or tile it again from where it is')
    if change:
        tiles_dir = os.path.dirname(npz_path)
        raise SlideError(f'{slide_path} changed since it was tiled ({change}): tile it again '
                         f'(python tile.py {slide_path} --out {tiles_dir})')
    rows = np.arange(len(coords))
    if 0 < max_tiles < len(coords):
        # a random subset, the same on every run and for every model: seeded by the slide's stem
        rng = np.random.default_rng([seed, zlib.crc32(stem.encode())])
        rows = np.sort(rng.choice(len(coords), max_tiles, replace=False))
    size = slide['read_size']
    handle = open_slide(slide_path)
    try:
        check_readable(handle, coords, slide['level'], size)
        downsample = handle.level_downsamples[slide['level']]
        width, height = handle.dimensions
    finally:
        handle.close()
    # what the features are keyed on: the slide's identity less its mtime, so a copy of the slide
    # (same content, new mtime) keeps its features; without one recorded, the file's size and mtime
    identity = recorded_identity(record)
    if identity is None:
        stat = os.stat(slide_path)
        identity = [stat.st_size, stat.st_mtime_ns]
    return slide | dict(stem=stem, slide_path=slide_path, rows=rows, coords=coords[rows],
                        n_tiled=len(coords), level0_width=width, level0_height=height,
                        patch_size_level0=round(size * downsample), identity=identity)


def cohort_tiles(cohort):
    """One TileDataset of the cohort's usable slides, whatever else the tiles folder holds."""
    # TileDataset reads a whole folder: here a temporary one of links to these slides' .npz,
    # gone once it has read them
    with tempfile.TemporaryDirectory(prefix='g2l-slides-') as folder:
        for r in cohort['rows']:
            name = r['tiles']['stem'] + '.npz'
            target = os.path.abspath(os.path.join(cohort['tiles'], name))
            os.symlink(target, os.path.join(folder, name))
        # read_cohort checked what TileDataset refuses: gone slides, mixed tile sizes
        return TileDataset(folder)

# -----------------------------------------------------------------------------
# tile embeddings, extracted once per (model, dataset)

def autocast():
    """The one precision context: bf16 autocast on CUDA, float32 on CPU (bf16 is 3-4x slower
    there)."""
    if device.startswith('cuda'):
        return torch.autocast('cuda', dtype=torch.bfloat16)
    return nullcontext()


def weights_digest(net):
    """A hash of the weights themselves, not of their file name: a student re-trained into the
    same folder must miss (hashing a ViT-g takes a few seconds)."""
    key = hashlib.blake2b(digest_size=8)
    for param_name, tensor in net.state_dict().items():
        key.update(param_name.encode())
        raw_bytes = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
        key.update(raw_bytes.numpy())
    return key.hexdigest()


def cache_path(name, net, spec, dataset):
    """OUT/cache/<name>-<key>.npz; the key changes with the weights, preprocessing or any image."""
    # the weights, the preprocessing, and every image's path, size and mtime
    preprocess = {k: spec.get(k) for k in ('img_size', 'resize', 'mean', 'std', 'pool', 'dim')}
    inputs = [CACHE_VERSION, weights_digest(net), preprocess, dataset['stamps']]
    key = hashlib.blake2b(json.dumps(inputs, sort_keys=True).encode(), digest_size=8)
    slug = re.sub(r'[^A-Za-z0-9._-]+', '_', name.strip('/'))[-60:]
    return os.path.join(out, 'cache', f'{slug}-{key.hexdigest()}.npz')


def embeddings(entry, net, spec, dataset):
    """Pooled embeddings (N, dim) of every image, float32, from the cache while model and data are
    unchanged; and a dict of cache (its path), cached, seconds."""
    start = time.time()
    path = cache_path(entry, net, spec, dataset)
    info = dict(cache=path, cached=os.path.exists(path))
    if info['cached']:
        # an unreadable cache (a copy cut short) is embedded again
        try:
            with np.load(path) as cached:
                return cached['embeddings'], info | dict(seconds=time.time() - start)
        except Exception as e:
            print(f'warning: {path} is unreadable ({type(e).__name__}): embedding again')
            info['cached'] = False
    emb = extract(entry, net, spec, dataset['paths'])
    os.makedirs(os.path.dirname(path), exist_ok=True)
    # the image paths beside the embeddings: the file stands alone. Through a temporary name: an
    # interrupted run never leaves a truncated cache that looks complete
    paths = np.array(dataset['paths'])
    save_atomic(path, lambda f: np.savez(f, embeddings=emb, paths=paths))
    return emb, info | dict(seconds=time.time() - start)


def extract(name, net, spec, paths):
    """Pooled embeddings (N, dim), float32, of the images at paths: one forward pass each."""
    loader = torch.utils.data.DataLoader(paths, batch_size=batch_size, num_workers=num_workers,
                                         collate_fn=partial(load_images, spec=spec),
                                         pin_memory=device.startswith('cuda'))
    progress = tqdm(total=len(paths), unit='img', desc=f'embed {name}')
    chunks = []
    with torch.inference_mode(), autocast(), progress:
        for images, error in loader:
            if error:
                raise SystemExit(error)
            pooled, _ = embed(net, spec, images.to(device, non_blocking=True))
            chunks.append(pooled.float().cpu().numpy())
            progress.update(len(images))
    return np.concatenate(chunks)

# -----------------------------------------------------------------------------
# slide features: every tile of each slide, one TRIDENT-layout .h5 per slide

def features_folder(entry):
    """OUT/features/<entry>: a folder per --models entry (TRIDENT's features_<encoder>/)."""
    slug = re.sub(r'[^A-Za-z0-9._-]+', '_', entry).strip('_')[-60:]
    # an entry that is not already a plain name gets a hash of itself: Hibou-L and
    # Hibou-L=out/g2l/student.safetensors never share a folder, nor do a/b and a_b
    if slug != entry:
        slug += '-' + hashlib.blake2b(entry.encode(), digest_size=4).hexdigest()
    return os.path.join(out, 'features', slug)


def tile_crop(spec, tile_size):
    """The model's preprocessing of tiles: tiles at least its input size are centre-cropped, never
    resized, so they keep the um/px tile.py cut them at (G2L crops 224 px of 256 at 0.5 um/px);
    smaller ones are resized up (model.resize_crop's shorter-side rule)."""
    return dict(spec, resize=max(tile_size, spec['img_size']))


def slide_key(digest, crop, slide):
    """What one slide's features depend on: the weights, the preprocessing, the tiles embedded
    and the slide file itself (its identity, as tile.py recorded it)."""
    preprocess = {k: crop.get(k) for k in ('img_size', 'resize', 'mean', 'std', 'pool', 'dim')}
    tiling = {k: slide[k] for k in ('level', 'read_size', 'tile_size', 'mpp', 'slide_path')}
    inputs = [FEATURES_VERSION, digest, preprocess, tiling, slide['identity']]
    key = hashlib.blake2b(json.dumps(inputs, sort_keys=True).encode(), digest_size=8)
    key.update(slide['coords'].tobytes())
    return key.hexdigest()


def stored_key(path):
    """The key a feature file was written with; None when there is no readable file, and a key
    that matches nothing when its data is no longer what was written."""
    if not os.path.exists(path):
        return None
    # the data is hashed, not only the key read: a file written into in place (h5py's 'r+',
    # another extractor into the same folder) keeps the key of what it held before
    try:
        with h5py.File(path, 'r') as f:
            key, written = f.attrs.get('key'), f.attrs.get('data_hash')
            held = data_hash(f['features'][:], f['coords'][:])
    except (OSError, KeyError):
        return None
    return key if written == held else 'data changed since written'


def data_hash(features, coords):
    """A hash of a feature file's data, float32 features and int64 coords, stored beside them."""
    digest = hashlib.blake2b(np.ascontiguousarray(features, np.float32).tobytes(), digest_size=8)
    digest.update(np.ascontiguousarray(coords, np.int64).tobytes())
    return digest.hexdigest()


def write_features(path, features, slide, encoder, key):
    """<stem>.h5 in TRIDENT's layout, through tile.save_atomic's hidden .<stem>.h5.<pid>.tmp,
    then renamed: a killed run never leaves a file that looks complete."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    # h5py opens its file by name: save_atomic's temporary (f.name), renamed once h5py closed it
    save_atomic(path, lambda f: write_h5(f.name, features, slide, encoder, key))


def write_h5(path, features, slide, encoder, key):
    """The features and coordinates of one slide, and the attributes TRIDENT writes, at path."""
    held = data_hash(features, slide['coords'])
    with h5py.File(path, 'w') as f:
        f.create_dataset('features', data=features.astype(np.float32))
        f['features'].attrs['encoder'] = encoder
        coords = f.create_dataset('coords', data=slide['coords'].astype(np.int64))
        # what TRIDENT writes beside level-0 top-left corners, so TRIDENT, CLAM and Patho-Bench
        # read the file unchanged; magnification from mpp, 10 um/px over it (0.25 um/px: 40x)
        coords.attrs['patch_size'] = slide['tile_size']
        coords.attrs['patch_size_level0'] = slide['patch_size_level0']
        coords.attrs['level0_magnification'] = round(10 / slide['slide_mpp'])
        coords.attrs['target_magnification'] = round(10 / slide['mpp'])
        # tile.py lays a grid of non-overlapping tiles
        coords.attrs['overlap'] = 0
        coords.attrs['level0_width'] = slide['level0_width']
        coords.attrs['level0_height'] = slide['level0_height']
        # ours: the exact mpp, the tiles the slide has, and the key checked before reuse
        f.attrs['slide_path'] = slide['slide_path']
        f.attrs['mpp'] = slide['mpp']
        f.attrs['slide_mpp'] = slide['slide_mpp']
        f.attrs['tiles_in_slide'] = slide['n_tiled']
        f.attrs['key'] = key
        f.attrs['data_hash'] = held


def read_features(path):
    """features (N, D) float32 and coords (N, 2) int64 of a TRIDENT-layout .h5."""
    with h5py.File(path, 'r') as f:
        return f['features'][:], f['coords'][:]


def extract_slides(name, entry, net, spec, cohort, folder):
    """Every tile of each usable slide of the cohort embedded by the --models entry into
    folder/<stem>.h5, but for slides whose file is up to date; returns {slide: reason} of those
    that failed."""
    digest = weights_digest(net)
    crop = tile_crop(spec, cohort['tileset'].tile_size)
    todo, stale, failed = [], 0, {}
    for r in cohort['rows']:
        slide = r['tiles']
        key = slide_key(digest, crop, slide)
        path = os.path.join(folder, slide['stem'] + '.h5')
        # a folder (or anything but a file) where the file goes is the user's: named, not replaced
        if os.path.lexists(path) and not os.path.isfile(path):
            failed[r['slide']] = f'{path} is in the way, not a feature file: move it, then rerun'
            print(f"error: slide {r['slide']}: {failed[r['slide']]}")
            continue
        stored = stored_key(path)
        if stored == key:
            continue
        # made from other weights, tiles or slide file, or data changed since: embedded again
        stale += stored is not None
        todo.append((r['slide'], slide, key, path))
    done = len(cohort['rows']) - len(todo) - len(failed)
    note = ''
    if stale:
        note = f' ({stale} stale: other weights, tiles or slide file, or data changed since)'
    print(f'{name}: {done} slides up to date in {folder}, {len(todo)} to embed{note}')
    if not todo:
        return failed
    return failed | embed_slides(name, entry, net, crop, cohort['tileset'], todo)


def embed_slides(name, entry, net, crop, tileset, todo):
    """Embed the tiles of the slides in todo as one stream of batches, so no slide waits for the
    readers to start again, and write each slide's file once its last tile is embedded; returns
    {slide: reason} of slides with unreadable tiles."""
    first_tile = np.searchsorted(tileset.slide_index, np.arange(len(tileset.stems)))
    position = dict(zip(tileset.stems, first_tile))
    indices = [position[slide['stem']] + slide['rows'] for _, slide, _, _ in todo]
    loader = tile_loader(tileset, np.concatenate(indices))
    progress = tqdm(total=sum(map(len, indices)), unit='tile', desc=f'embed {name}')
    # the slides not written yet, in stream order, and their tiles embedded so far
    waiting = list(todo)
    parts, flags = [], []
    failed = {}
    with torch.inference_mode(), autocast(), progress:
        for images, replaced in loader:
            pooled, _ = embed(net, crop, images.to(device, non_blocking=True))
            parts.append(pooled.float().cpu().numpy())
            flags.append(replaced.numpy())
            progress.update(len(images))
            # every slide whose last tile is in is written now, not at the end of the stream
            parts, flags = write_finished_slides(waiting, parts, flags, entry, failed)
    return failed


def write_finished_slides(waiting, parts, flags, entry, failed):
    """Write the file of each slide at the head of waiting (todo entries of extract_slides) whose
    tiles are all in parts (embedded tiles, in stream order; flags: which were replaced), and
    drop it from waiting; a slide with replaced tiles goes into failed instead. Returns the
    tiles left over, as (parts, flags)."""
    if not waiting or sum(map(len, parts)) < len(waiting[0][1]['rows']):
        return parts, flags
    features, unreadable = np.concatenate(parts), np.concatenate(flags)
    while waiting and len(features) >= len(waiting[0][1]['rows']):
        value, slide, key, path = waiting.pop(0)
        n = len(slide['rows'])
        bad = int(unreadable[:n].sum())
        if bad:
            # TileDataset read other tiles in their place: features of this slide only, or none
            failed[value] = (f'{bad} of {n} tiles unreadable (see the warnings): damaged; '
                             'scan or convert it again')
            tqdm.write(f'error: slide {value}: {failed[value]}')
        else:
            write_features(path, features[:n], slide, entry, key)
        features, unreadable = features[n:], unreadable[n:]
    return [features], [unreadable]


def tile_loader(tileset, indices):
    """Batches of (uint8 tiles, which were unreadable) of TileDataset indices, in order, read in
    DataLoader workers."""
    return torch.utils.data.DataLoader(indices, batch_size=batch_size, num_workers=num_workers,
                                       collate_fn=partial(read_tiles, tileset=tileset),
                                       pin_memory=device.startswith('cuda'))


def read_tiles(indices, tileset):
    """DataLoader collate_fn, so slides are read in the workers: TileDataset indices -> (uint8
    (B, 3, T, T) tiles, (B,) bool: unreadable, another tile read in its place)."""
    images, replaced = [], []
    for i in indices:
        # TileDataset counts every read that returned another tile in its replaced, bad tiles
        # already known included (one TileDataset serves every model when num_workers is 0)
        before = tileset.replaced
        images.append(tileset[int(i)])
        replaced.append(tileset.replaced != before)
    return torch.stack(images), torch.tensor(replaced)


def bench_extraction(rows):
    """Tiles/s of slide reading alone (TileDataset through the same DataLoader), of the model alone
    and of extraction, on the first `bench` tiles of --tiles: which one bounds extraction?"""
    if tiles is None or not os.path.isdir(tiles):
        raise SystemExit(f'error: --bench needs --tiles, a folder tile.py wrote (got {tiles})')
    try:
        tileset = TileDataset(tiles)
    except ValueError as e:
        raise SystemExit(f'error: {e}')
    indices = np.arange(min(bench, len(tileset)))
    rates = {}
    for name, entry in rows.items():
        model_name, _, weights = entry.partition('=')
        net, spec = create(model_name, weights or None, device=device)
        crop = tile_crop(spec, tileset.tile_size)
        reading = tiles_per_second(tileset, indices)
        model_alone = model_tiles_per_second(net, crop, tileset, indices[:batch_size])
        extraction = tiles_per_second(tileset, indices, net, crop)
        bound = 'reading' if reading < model_alone else 'the model'
        print(f'{name}: batch {batch_size}, {num_workers} workers, {device}: reading '
              f'{reading:.1f} tiles/s, model alone {model_alone:.1f}, extraction '
              f'{extraction:.1f}: bound by {bound}')
        rates[name] = dict(reading=reading, model=model_alone, extraction=extraction)
        del net
    return rates


def tiles_per_second(tileset, indices, net=None, crop=None):
    """Tiles/s through tile_loader, reading alone or reading and embedding; timed from the first
    batch's arrival, so worker start-up and the model's first call are not counted."""
    start, timed = None, 0
    with torch.inference_mode(), autocast():
        for images, _ in tile_loader(tileset, indices):
            if net is not None:
                pooled, _ = embed(net, crop, images.to(device, non_blocking=True))
                # the copy to the host waits for the device
                pooled.float().cpu()
            if start is None:
                start = time.perf_counter()
                continue
            timed += len(images)
    return timed / (time.perf_counter() - start) if timed else float('nan')


def model_tiles_per_second(net, crop, tileset, indices, repeats=3):
    """Tiles/s of the model alone: one batch of real tiles, already on the device, embedded
    `repeats` times after a first, untimed call."""
    images = torch.stack([tileset[int(i)] for i in indices]).to(device)
    with torch.inference_mode(), autocast():
        embed(net, crop, images)[0].float().cpu()
        start = time.perf_counter()
        for _ in range(repeats):
            embed(net, crop, images)[0].float().cpu()
    return repeats * len(images) / (time.perf_counter() - start)

# -----------------------------------------------------------------------------
# metrics, with bootstrap confidence intervals

def metrics(y, scores, weights=None):
    """Balanced accuracy, macro F1, macro one-vs-rest AUROC and accuracy from class scores (N, C),
    each an array with one value per row of sample weights (B, N)."""
    # A bootstrap resample is a row of multiplicities, so 1000 resamples are a few matrix products
    # instead of 1000 Python calls. The tests check each metric against scikit-learn.
    weights = np.ones((1, len(y))) if weights is None else weights
    n_classes = scores.shape[1]
    # each sample's cell of the confusion matrix, then each resample's weighted confusion matrix
    cell = y * n_classes + scores.argmax(1)
    cells = np.eye(n_classes ** 2)[cell]
    confusion = (weights @ cells).reshape(-1, n_classes, n_classes)
    tp = np.diagonal(confusion, axis1=1, axis2=2)
    support = confusion.sum(2)
    predicted = confusion.sum(1)
    with np.errstate(invalid='ignore', divide='ignore'), warnings.catch_warnings():
        # NaN, not a warning, for a resample without some class
        warnings.simplefilter('ignore', RuntimeWarning)
        # binary: the positive class's AUROC, as scikit-learn
        scored_classes = [1] if n_classes == 2 else range(n_classes)
        aurocs = [auroc(y == c, scores[:, c], weights) for c in scored_classes]
        # mean recall over the classes present (scikit-learn's balanced accuracy)
        recall = np.where(support > 0, tp / support, np.nan)
        # macro F1 over the labels in y or in the predictions (scikit-learn's default labels)
        present = (support > 0) | (predicted > 0)
        f1 = np.where(present, 2 * tp / (support + predicted), np.nan)
        return dict(balanced_accuracy=np.nanmean(recall, 1),
                    f1_macro=np.nanmean(f1, 1),
                    # classes absent from y (NaN) are skipped
                    auroc=np.nanmean(aurocs, 0),
                    accuracy=tp.sum(1) / weights.sum(1))


def auroc(positive, score, weights):
    """AUROC of one class's scores (N,) against the rest, one value per row of weights (B, N)."""
    order = np.argsort(score, kind='stable')
    ranked = score[order]
    # tied scores form one group
    group_starts = np.flatnonzero(np.r_[True, ranked[1:] != ranked[:-1]])
    ranked_weights = weights[:, order]
    pos = np.add.reduceat(ranked_weights * positive[order], group_starts, axis=1)
    neg = np.add.reduceat(ranked_weights * ~positive[order], group_starts, axis=1)
    # Mann-Whitney: each positive beats the negatives below it and half of those tied with it
    beaten = np.cumsum(neg, 1) - neg / 2
    return (pos * beaten).sum(1) / (pos.sum(1) * neg.sum(1))


def bootstrap_weights(n):
    """The `bootstrap` resamples of n test samples as rows of multiplicities, 100 at a time (which
    bounds the (100, N) weight matrices). Seeded: the same resamples for every model, protocol and
    CKA, so the CIs are paired across rows."""
    rng = np.random.default_rng(seed)
    for start in range(0, bootstrap, 100):
        n_resamples = min(100, bootstrap - start)
        picks = rng.integers(0, n, (n_resamples, n))
        multiplicities = [np.bincount(p, minlength=n) for p in picks]
        yield np.stack(multiplicities).astype(np.float64)


def with_ci(y, scores):
    """Each metric on the test set with its 95% CI over the bootstrap resamples:
    {metric: {'value', 'ci': [2.5th, 97.5th percentile]}}. scores: (N, C), or (S, N, C) for S
    trainings with different seeds: each metric then is the mean of the S trainings' metrics, on
    the test set and on each resample (what one training run is expected to score)."""
    runs = scores if scores.ndim == 3 else scores[None]
    point = mean_metrics(y, runs)
    draws = {m: [np.full(1, np.nan)] for m in METRICS}
    for weights in bootstrap_weights(len(y)):
        for m, values in mean_metrics(y, runs, weights).items():
            draws[m].append(values)
    return {m: ci_entry(point[m][0], np.concatenate(draws[m])) for m in METRICS}


def mean_metrics(y, runs, weights=None):
    """metrics() of each of runs (S, N, C), class scores of the same samples, averaged."""
    per_run = [metrics(y, scores, weights) for scores in runs]
    return {m: np.mean([r[m] for r in per_run], 0) for m in METRICS}


def ci_entry(value, draws):
    """{'value', 'ci': [2.5th, 97.5th percentile of the resamples' values]}."""
    with warnings.catch_warnings():
        # all-NaN: no resamples, or a test set of one class
        warnings.simplefilter('ignore', RuntimeWarning)
        ci = np.nanpercentile(draws, [2.5, 97.5])
    return dict(value=float(value), ci=ci.tolist())


def weighted_cka(x, y, weights):
    """Linear CKA (Kornblith et al. 2019) of x (N, D1) and y (N, D2), the same samples embedded by
    two models, under each row of sample weights (B, N): (B,) values. A bootstrap resample is a row
    of multiplicities, as in metrics(); a row of ones is plain linear CKA."""
    # CKA = ||Xc^T W Yc||^2 / (||Xc^T W Xc|| ||Yc^T W Yc||) (Frobenius norms), with Xc centred on
    # the weighted mean mx = X^T w / s. With the Gram matrices K = X X^T and L = Y Y^T,
    #   ||Xc^T W Yc||^2 = w^T (K o L) w - 2 s sum_i w_i (X mx)_i (Y my)_i + s^2 |mx|^2 |my|^2,
    # so B resamples cost about B N^2 multiply-adds, whatever the widths (a ViT-g's 1536)
    x = torch.as_tensor(x, dtype=torch.float64, device=device)
    y = torch.as_tensor(y, dtype=torch.float64, device=device)
    # centred on the plain mean first: CKA ignores shifts, and small values keep the sums exact
    x = x - x.mean(0)
    y = y - y.mean(0)
    w = torch.as_tensor(weights, dtype=torch.float64, device=device)
    # w^T (K o K) w, w^T (L o L) w and w^T (K o L) w, from Gram rows a block at a time (~32 MB)
    quadratic = torch.zeros(3, len(w), dtype=torch.float64, device=device)
    step = max(1, 2 ** 22 // len(x))
    for start in range(0, len(x), step):
        block = slice(start, start + step)
        k = x[block] @ x.T
        l = y[block] @ y.T
        for i, gram in enumerate((k * k, l * l, k * l)):
            quadratic[i] += ((w[:, block] @ gram) * w).sum(1)
    total = w.sum(1)
    mean_x = w @ x / total[:, None]
    mean_y = w @ y / total[:, None]
    terms_x = (mean_x @ x.T, (mean_x ** 2).sum(1))
    terms_y = (mean_y @ y.T, (mean_y ** 2).sum(1))
    pairs = ((terms_x, terms_x), (terms_y, terms_y), (terms_x, terms_y))
    hsic = []
    for q, ((proj_a, norm_a), (proj_b, norm_b)) in zip(quadratic, pairs):
        cross = (w * proj_a * proj_b).sum(1)
        hsic.append(q - 2 * total * cross + total ** 2 * norm_a * norm_b)
    cka = hsic[2] / torch.sqrt(hsic[0] * hsic[1])
    return cka.cpu().numpy()


def linear_cka(x, y):
    """Linear CKA (Kornblith et al. 2019) between two embeddings (N, D1) and (N, D2) of the same
    samples: 1 for the same features up to rotation and isotropic scale."""
    # G2L reports 0.76 between Hibou-L and H-optimus-0, 0.97 after distillation
    return float(weighted_cka(x, y, np.ones((1, len(x))))[0])


def cka_with_ci(x, y, groups=None):
    """Linear CKA of x and y with its 95% CI over with_ci's resamples: of the rows (test samples),
    or, with groups (each row's test slide, 0..S-1, every one present), of the S test slides, each
    drawn slide bringing all its rows."""
    n_samples = len(x) if groups is None else int(groups.max()) + 1
    chunks = list(bootstrap_weights(n_samples))
    if not chunks:
        return ci_entry(linear_cka(x, y), np.full(1, np.nan))
    weights = np.concatenate(chunks)
    if groups is not None:
        weights = weights[:, groups]
    draws = weighted_cka(x, y, np.concatenate([np.ones((1, len(x))), weights]))
    return ci_entry(draws[0], draws[1:])

# -----------------------------------------------------------------------------
# protocols on frozen embeddings

def linear_probe(train_x, train_y, val_x, val_y, test_x):
    """Test class probabilities of a logistic regression on standardized embeddings; its C."""
    scaler = StandardScaler().fit(train_x)
    train_x = scaler.transform(train_x)
    test_x = scaler.transform(test_x)
    if val_x is not None:
        val_x = scaler.transform(val_x)
    # small problems on one BLAS thread: thread hand-offs cost more than the maths (10x slower on a
    # busy CPU)
    blas_threads = 1 if train_x.size < 10 ** 6 else None
    with warnings.catch_warnings(), threadpool_limits(blas_threads):
        # weak regularisation on separable data stops before converging; val decides
        warnings.simplefilter('ignore', ConvergenceWarning)
        C = choose_C(train_x, train_y, val_x, val_y)
        probe = fit_probe(train_x, train_y, C)
        return probe.predict_proba(test_x), C


def fit_probe(x, y, C):
    """Logistic regression with balanced class weights, as Patho-Bench (scikit-learn)."""
    probe = LogisticRegression(C=C, class_weight='balanced', max_iter=max_iter, random_state=seed)
    return probe.fit(x, y)


def choose_C(train_x, train_y, val_x, val_y):
    """The C of probe_C with the best val balanced accuracy, or by stratified CV on train when there
    is no val split."""
    # every fold must see every class
    folds = min(cv_folds, np.bincount(train_y).min())
    if val_x is None and folds < 2:
        # a class with one train sample: no CV possible; Patho-Bench's default C
        return 0.5
    scores = []
    for C in probe_C:
        if val_x is not None:
            score = held_out_score(C, train_x, train_y, val_x, val_y)
        else:
            score = cv_score(C, train_x, train_y, folds)
        scores.append(tuple(score))
    # the best (balanced accuracy, log-likelihood); of equal ones the first, the smallest C
    best = max(range(len(probe_C)), key=scores.__getitem__)
    return probe_C[best]


def cv_score(C, train_x, train_y, folds):
    """held_out_score of C averaged over stratified folds of the train split."""
    cv = StratifiedKFold(folds, shuffle=True, random_state=seed)
    fold_scores = []
    for fit_rows, held_rows in cv.split(train_x, train_y):
        fit_x, fit_y = train_x[fit_rows], train_y[fit_rows]
        held_x, held_y = train_x[held_rows], train_y[held_rows]
        fold_scores.append(held_out_score(C, fit_x, fit_y, held_x, held_y))
    return np.mean(fold_scores, 0)


def held_out_score(C, x, y, held_x, held_y):
    """selection_score on held-out samples of a probe fitted with C, as an array."""
    probs = fit_probe(x, y, C).predict_proba(held_x)
    return np.array(selection_score(held_y, probs))


def selection_score(y, probs):
    """(balanced accuracy, mean log-likelihood) of held-out class probabilities: how a probe's C
    and an ABMIL's epoch are chosen on val (a higher tuple wins)."""
    balanced_accuracy = metrics(y, probs)['balanced_accuracy'][0]
    # ties in balanced accuracy (common on small val sets) go to the lower cross-entropy: among
    # equally accurate C, the best-fitting one, not the strongest regulariser with near-uniform
    # probabilities. Clipped as scikit-learn's log_loss clips: a confident mistake costs much,
    # not infinitely (log(0) was -inf, with a divide-by-zero warning)
    true_class_probs = np.clip(probs[np.arange(len(y)), y], 1e-15, 1)
    log_likelihood = float(np.log(true_class_probs).mean())
    return balanced_accuracy, log_likelihood


def neighbours(query, bank, k, groups=None):
    """Cosine similarities and indices of each query's k nearest bank rows. groups: query is bank,
    and no sample is a neighbour of one in its own group."""
    # groups: each sample itself; or its slide, as PathoROB drops same-slide neighbours, which share
    # class and centre trivially
    bank = torch.as_tensor(bank, dtype=torch.float32, device=device)
    bank = F.normalize(bank, dim=1)
    if groups is not None:
        groups = torch.as_tensor(groups, device=device)
    # in chunks on `device`, so the N x N similarity matrix is never held at once: about 256 MB of
    # similarities per chunk
    step = max(1, 2 ** 26 // len(bank))
    sims, idx = [], []
    for start in range(0, len(query), step):
        chunk = torch.as_tensor(query[start:start + step], dtype=torch.float32, device=device)
        chunk = F.normalize(chunk, dim=1)
        similarity = chunk @ bank.T
        if groups is not None:
            chunk_groups = groups[start:start + len(chunk)]
            same_group = chunk_groups[:, None] == groups[None, :]
            similarity[same_group] = -float('inf')
        top = similarity.topk(k, dim=1)
        sims.append(top.values.cpu().numpy())
        idx.append(top.indices.cpu().numpy())
    return np.concatenate(sims), np.concatenate(idx)


def knn_scores(sims, idx, train_y, k, n_classes):
    """Majority vote of the k nearest training samples (G2L's kNN voting): vote fractions (N, C)."""
    votes = np.zeros((len(idx), n_classes))
    similarity = np.zeros((len(idx), n_classes))
    query_rows = np.repeat(np.arange(len(idx)), k)
    neighbour_classes = train_y[idx[:, :k]].ravel()
    cells = (query_rows, neighbour_classes)
    np.add.at(votes, cells, 1)
    np.add.at(similarity, cells, sims[:, :k].ravel())
    # plus a tie-break by summed similarity that stays below 1/k (|similarity| <= votes <= k), so it
    # only orders tied classes (and gives AUROC fewer ties)
    return votes / k + similarity / (k * (k + 1))


def run_probes(emb, labels, split, n_classes):
    """Linear probe, kNN@knn_k and kNN@best-k-on-val on one level (tiles or slides), scored on test
    with CIs."""
    train, val, test = (split == s for s in SPLITS)
    has_val = bool(val.any())
    train_x, train_y = emb[train], labels[train]
    test_x, test_y = emb[test], labels[test]
    val_x = emb[val] if has_val else None
    probs, C = linear_probe(train_x, train_y, val_x, labels[val], test_x)
    results = dict(n_test=len(test_y), linear=with_ci(test_y, probs) | dict(C=C))
    # kNN can look no further than the train set
    k_max = min(max(knn_k, knn_k_max), int(train.sum()))
    k = min(knn_k, k_max)
    sims, idx = neighbours(test_x, train_x, k_max)
    knn = knn_scores(sims, idx, train_y, k, n_classes)
    results['knn'] = with_ci(test_y, knn) | dict(k=k)
    # THUNDER picks k on val; reported beside the fixed k=20, never instead of it
    if has_val:
        best = best_k(val_x, labels[val], train_x, train_y, k_max, n_classes)
        knn_best = knn_scores(sims, idx, train_y, best, n_classes)
        results['knn_best'] = with_ci(test_y, knn_best) | dict(k=best)
    return results


def best_k(val_x, val_y, train_x, train_y, k_max, n_classes):
    """The k in 1..k_max with the best kNN balanced accuracy on val; ties go to the smaller k."""
    sims, idx = neighbours(val_x, train_x, k_max)
    on_val = []
    for k in range(1, k_max + 1):
        scores = knn_scores(sims, idx, train_y, k, n_classes)
        on_val.append(metrics(val_y, scores)['balanced_accuracy'][0])
    return 1 + int(np.argmax(on_val))


def robustness_index(emb, labels, centers, slides, ks):
    """Robustness index (de Jong et al. 2025) on all samples of the dataset, for each k of ks:
    {str(k): {'SO', 'OS', 'SO/OS', 'SO/(SO+OS)'}}."""
    # For each sample take its k nearest neighbours (cosine similarity; never itself, nor a tile of
    # its own slide when slides are given, as PathoROB) and count
    #   SO: neighbours of the same class from another centre (biology wins),
    #   OS: neighbours of another class from the same centre (the centre wins).
    # Same-class-same-centre and other-class-other-centre neighbours say nothing about which
    # dominates and are not counted.
    groups = np.arange(len(emb)) if slides is None else np.unique(slides, return_inverse=True)[1]
    # every sample must have k candidates outside its own group, the largest included
    k_max = min(max(ks), len(emb) - np.bincount(groups).max())
    _, idx = neighbours(emb, emb, k_max, groups=groups)
    same_class = labels[idx] == labels[:, None]
    same_center = centers[idx] == centers[:, None]
    index = {}
    for k in (k for k in ks if k <= k_max):
        # SO and OS are summed over all samples first and the ratio is taken once, as PathoROB's
        # code does (a per-sample ratio is undefined wherever SO + OS = 0)
        so = int((same_class[:, :k] & ~same_center[:, :k]).sum())
        os_ = int((~same_class[:, :k] & same_center[:, :k]).sum())
        # both forms in use are reported:
        #   SO/OS       the form G2L reports (H-optimus-0 1.08/1.19/1.37/1.85 at k=3/5/10/20);
        #               > 1: biology dominates
        #   SO/(SO+OS)  PathoROB's bounded form in [0, 1]; 0.5 is the break-even point
        index[str(k)] = {'SO': so, 'OS': os_,
                         'SO/OS': so / os_ if os_ else float('inf'),
                         'SO/(SO+OS)': so / (so + os_) if so + os_ else float('nan')}
    return index

# -----------------------------------------------------------------------------
# slide-level protocols on bags of tile embeddings, one bag per slide

def slide_bags(emb, dataset):
    """The tile embeddings of each slide of a --data set (its slide column), and each slide's label
    and split."""
    _, first_tile, slide_of_tile = np.unique(dataset['slide'], return_index=True,
                                             return_inverse=True)
    order = np.argsort(slide_of_tile, kind='stable')
    slide_ends = np.cumsum(np.bincount(slide_of_tile))[:-1]
    bags = np.split(emb[order], slide_ends)
    # read_dataset checked one label and one split per slide: its first tile's are the slide's
    return bags, dataset['labels'][first_tile], dataset['split'][first_tile]


def slide_inputs(bags, split):
    """What the slide protocols need of one model's bags (an iterable of (N, D) float32 arrays, one
    per slide, used one at a time): the mean-pooled slides (S, D), the bags for ABMIL in float16,
    standardised by the train tiles' mean and std, and the CKA sample: about cka_tiles tiles of the
    test slides, with the test slide of each."""
    n_test = int((split == 'test').sum())
    per_slide = -(-cka_tiles // max(1, n_test))
    pooled, own_scales, kept, sample, groups = [], [], [], [], []
    for i, bag in enumerate(bags):
        # the mean pool, in float64: a float32 running sum over 10K tiles loses digits
        pooled.append(bag.mean(0, dtype=np.float64))
        mean = pooled[-1].astype(np.float32)
        std = bag.std(0, dtype=np.float64).astype(np.float32)
        own_scales.append((len(bag), mean, std))
        # kept in float16, which has 11 bits: of each tile's deviation from its slide's mean in
        # units of the slide's spread, not of an offset all tiles share (float16 steps by 0.06 at
        # 100). The bags come once, one at a time: the train tiles' statistics are known only
        # after the last, and restandardise applies them then
        unit = np.where(std > 0, std, 1)
        kept.append(torch.from_numpy(((bag - mean) / unit).astype(np.float16)))
        if split[i] != 'test':
            continue
        # the same tiles for every model: drawn from the slide's position and size only
        rng = np.random.default_rng([seed, i])
        rows = np.sort(rng.choice(len(bag), min(len(bag), per_slide), replace=False))
        groups.append(np.full(len(rows), len(sample)))
        sample.append(bag[rows])
    restandardise(kept, own_scales, split == 'train')
    return dict(pooled=np.stack(pooled).astype(np.float32), bags=kept,
                sample=np.concatenate(sample), groups=np.concatenate(groups))


def restandardise(kept, own_scales, train):
    """Bags standardised each by its own (tiles, mean, std) -> standardised by the train tiles'
    mean and std (train: a bool per bag), in float16, replaced in kept one at a time."""
    # Standardised, one learning rate fits every model's scale. In float16 ABMIL holds half: 1K
    # slides of 10K tiles of 1536 numbers are 31 GB, not float32's 61; one bag at a time is in
    # float32, never a copy of them all
    counts = np.array([n for n, _, _ in own_scales])[train]
    means = np.stack([m for _, m, _ in own_scales]).astype(np.float64)
    stds = np.stack([s for _, _, s in own_scales]).astype(np.float64)
    # the law of total variance: the train slides' spread within, plus that of their means
    weights = (counts / counts.sum())[:, None]
    mean = (weights * means[train]).sum(0)
    variance = (weights * (stds[train] ** 2 + (means[train] - mean) ** 2)).sum(0)
    std = np.maximum(np.sqrt(variance), 1e-6)
    for i, bag in enumerate(kept):
        unit = np.where(stds[i] > 0, stds[i], 1)
        scale = torch.from_numpy(unit / std).float()
        shift = torch.from_numpy((means[i] - mean) / std).float()
        kept[i] = (bag.float() * scale + shift).half()


def run_slide_protocols(inputs, labels, split, n_classes):
    """Every slide-level protocol on one model's slide_inputs but CKA (add_cka, once every row is
    embedded): linear probe and kNN on mean-pooled slides, ABMIL."""
    results = run_probes(inputs['pooled'], labels, split, n_classes)
    results['abmil'] = run_abmil(inputs['bags'], labels, split, n_classes)
    return results


class ABMIL(torch.nn.Module):
    """Gated attention-based MIL (Ilse et al. 2018): a slide is the attention-weighted mean of its
    projected tiles, and a linear layer classifies it."""

    def __init__(self, dim, n_classes):
        super().__init__()
        # Patho-Bench: 512 wide, dropout 0.25; at most 4x the features' width (a ViT MLP's
        # expansion), so tiny models' heads stay cheap
        width = min(abmil_hidden, 4 * dim)
        # the gate's width: half, as CLAM's and TRIDENT's 512 -> 256
        gate_width = max(1, width // 2)
        self.project = torch.nn.Sequential(torch.nn.Linear(dim, width), torch.nn.ReLU(),
                                           torch.nn.Dropout(abmil_dropout))
        self.attention_v = torch.nn.Linear(width, gate_width)
        self.attention_u = torch.nn.Linear(width, gate_width)
        self.attention_w = torch.nn.Linear(gate_width, 1)
        self.classify = torch.nn.Linear(width, n_classes)

    def forward(self, bag):
        """Class logits (C,) of one slide's tiles (N, dim)."""
        h = self.project(bag)
        # Ilse et al., eq. 9: w^T (tanh(V h) * sigm(U h)), a softmax over the slide's tiles
        gate = torch.tanh(self.attention_v(h)) * torch.sigmoid(self.attention_u(h))
        attention = torch.softmax(self.attention_w(gate), dim=0)
        slide = (attention * h).sum(0)
        return self.classify(slide)


def run_abmil(bags, labels, split, n_classes):
    """ABMIL trained abmil_seeds times (seeds seed, seed + 1, ...) on the train slides, each kept at
    its best val epoch (its last without val), scored on test with CIs: each metric is the mean of
    the seeds' metrics. Also each seed's metrics and chosen epoch. bags: slide_inputs' float16
    bags, standardised by the train tiles' mean and std."""
    train, val, test = (np.flatnonzero(split == s) for s in SPLITS)
    dim = bags[0].shape[1]
    # small problems on one CPU thread: thread hand-offs cost more than the maths (measured on 2
    # busy cores: 1 ms a step instead of 10-25)
    step_size = max(min(len(bags[i]), abmil_bag) for i in train) * dim
    threads = 1 if device == 'cpu' and step_size < 10 ** 6 else None
    with threadpool_limits(threads):
        trained = [train_abmil(bags, labels, train, val, n_classes, seed + s, dim)
                   for s in range(abmil_seeds)]
        probs = np.stack([predict(net, bags, test) for net, _ in trained])
    test_y = labels[test]
    per_seed = {m: [float(metrics(test_y, p)[m][0]) for p in probs] for m in METRICS}
    chosen = [epoch for _, epoch in trained]
    return with_ci(test_y, probs) | dict(per_seed=per_seed, epochs=chosen)


def train_abmil(bags, labels, train, val, n_classes, run_seed, dim):
    """One ABMIL trained with Patho-Bench's recipe: AdamW, cosine schedule over every step, a
    class-balanced loss, one slide a step of at most abmil_bag sampled tiles. Returns it at its
    best val epoch (by selection_score), or at its last without val, and that epoch."""
    # its own random streams: the caller's are left untouched
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(run_seed)
        rng = np.random.default_rng(run_seed)
        net = ABMIL(dim, n_classes).to(device)
        optimizer = torch.optim.AdamW(net.parameters(), lr=abmil_lr,
                                      weight_decay=abmil_weight_decay)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, abmil_epochs * len(train))
        # each class weighs as much as the others in all (scikit-learn's 'balanced')
        counts = np.bincount(labels[train], minlength=n_classes)
        class_weight = (len(train) / (n_classes * np.maximum(counts, 1))).tolist()
        best, best_epoch = None, abmil_epochs
        for epoch in range(1, abmil_epochs + 1):
            net.train()
            for i in rng.permutation(train):
                bag = sample_bag(bags[i], rng)
                logits = net(on_device(bag))
                target = torch.tensor(labels[i], device=device)
                loss = class_weight[labels[i]] * F.cross_entropy(logits, target)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
            if not len(val):
                continue
            score = selection_score(labels[val], predict(net, bags, val))
            # the first of equally good epochs: the earliest stop
            if best is None or score > best[0]:
                state = {k: v.detach().clone() for k, v in net.state_dict().items()}
                best, best_epoch = (score, state), epoch
    if best is not None:
        net.load_state_dict(best[1])
    return net, best_epoch


def sample_bag(bag, rng):
    """At most abmil_bag tiles of a bag, drawn without replacement (all when it is smaller)."""
    if len(bag) <= abmil_bag:
        return bag
    rows = rng.choice(len(bag), abmil_bag, replace=False)
    return bag[torch.from_numpy(rows)]


def on_device(bag):
    """A kept float16 bag on `device`, float32."""
    return bag.to(device).float()


def predict(net, bags, indices):
    """Class probabilities (len(indices), C) of the bags at indices: every tile, no dropout."""
    net.eval()
    with torch.inference_mode():
        logits = torch.stack([net(on_device(bags[i])) for i in indices])
    return torch.softmax(logits.float(), 1).cpu().numpy().astype(np.float64)

# -----------------------------------------------------------------------------
# outputs: a compact table per level first, then every number

def table(header, rows):
    """Markdown lines of a table, a header and rows of cell strings, each column padded to its
    widest cell so that the table reads in a terminal too."""
    widths = [max(map(len, column)) for column in zip(header, *rows)]
    padded = [[cell.ljust(w) for cell, w in zip(cells, widths)] for cells in [header] + rows]
    lines = ['| ' + ' | '.join(cells) + ' |' for cells in padded]
    rule = '|' + '|'.join('-' * (w + 2) for w in widths) + '|'
    return lines[:1] + [rule] + lines[1:]


def headline_columns(level, teachers):
    """A level's compact columns as (protocol, metric): HEADLINE's, with the CKA column once per
    teacher of a committee (metric: the teacher's row)."""
    columns = []
    for protocol, metric in HEADLINE[level]:
        if protocol == 'cka' and len(teachers) > 1:
            columns += [('cka', teacher) for teacher in teachers]
        else:
            columns.append((protocol, metric))
    return columns


def headline_title(protocol, metric):
    """A compact table's column title, e.g. 'kNN@20 bal. acc', 'CKA to UNI2-h'."""
    if protocol == 'cka':
        return f'CKA to {metric}' if metric else 'CKA to teacher'
    protocol_names = {'linear': 'linear', 'knn': f'kNN@{knn_k}', 'abmil': 'ABMIL'}
    return f'{protocol_names[protocol]} {METRICS[metric]}'


def headline_entry(level_results, protocol, metric):
    """A compact table cell's {'value', 'ci'}: a protocol's metric, or the level's CKA (to the
    teacher, or to the committee's teacher `metric`)."""
    if protocol == 'cka' and metric:
        return level_results['cka_teachers'][metric]
    entry = level_results[protocol]
    return entry if metric is None else entry[metric]


def short_ci_cell(entry):
    """'0.83 [0.70, 0.95]': a compact table cell, narrow enough for four a row in 100 columns."""
    low, high = entry['ci']
    return f"{entry['value']:.2f} [{low:.2f}, {high:.2f}]"


def headline_lines(results):
    """Each level's compact table, what its columns are, and its gap lines: what a run prints at
    its end (in 100 columns)."""
    rows = results['models']
    first = next(iter(rows.values()))
    notes = {'tile': [f'linear: logistic regression, C chosen on val; kNN@{knn_k}: vote of the '
                      'nearest train tiles'],
             'slide': [f'ABMIL: gated attention (Ilse et al. 2018), mean of {abmil_seeds} seeds; '
                       "linear: on each slide's mean tile"]}
    lines = []
    for level in HEADLINE:
        if level not in first:
            continue
        columns = headline_columns(level, results['teachers'])
        header = ['model'] + [headline_title(p, m) for p, m in columns]
        body = [[name] + [short_ci_cell(headline_entry(r[level], p, m)) for p, m in columns]
                for name, r in rows.items()]
        title = f"## {level} level: {first[level]['n_test']} test {level}s"
        lines += ['', title, ''] + table(header, body) + [''] + notes[level]
        lines += gap_lines(results, level)
    return lines


def gap_lines(results, level):
    """'<row> closes X% of the gap to the teacher on <metric>: <before> -> <row> (teacher t)', a
    line per row but the teachers and the baseline, on the level's first headline column; with a
    committee the gap is to the best teacher on that column, and a row above every teacher says
    by how much."""
    gaps = results['gap'].get(level, {})
    if not gaps:
        return []
    protocol, metric = HEADLINE[level][0]
    title = headline_title(protocol, metric)
    value = {name: r[level][protocol][metric]['value'] for name, r in results['models'].items()}
    best = best_teacher(results, value)
    before, teacher_value = value[results['baseline']], value[best]
    single = len(results['teachers']) == 1
    teacher_words = 'the teacher' if single else 'the best teacher'
    teacher_label = 'teacher' if single else best
    lines = ['']
    for name, closed in gaps.items():
        if closed is None:
            lines.append(f"{name}: no gap to close on {title}: {results['baseline']} "
                         f'{before:.3f}, {teacher_words} {teacher_value:.3f}')
        else:
            lines.append(f'{name} closes {closed:.0%} of the gap to {teacher_words} on {title}: '
                         f'{before:.3f} -> {value[name]:.3f} ({teacher_label} {teacher_value:.3f})')
        # above every teacher: by how much
        if value[name] > teacher_value:
            every = 'the teacher' if single else 'every teacher'
            lines.append(f'{name} is above {every} on {title} by '
                         f'{value[name] - teacher_value:.3f}')
    return lines


def best_teacher(results, value):
    """The teacher row with the highest value (of {row: value}); the first of equals."""
    return max(results['teachers'], key=lambda t: value[t])


def write_markdown(results, path):
    """results.md: the compact tables with their gap lines, then every metric of every protocol,
    the robustness index and the slides not scored. Returns the compact part, which runs print."""
    rows = results['models']
    sources = [results[k]['source'] for k in ('data', 'slides') if k in results]
    intro = [f"# {', '.join(rows)} on {' and '.join(sources)}", '',
             f"{teachers_sentence(results['teachers'])} The "
             f'test split, with 95% bootstrap CIs ({bootstrap} resamples of the test tiles or '
             'slides, the same for every row).']
    headline = headline_lines(results)
    text = '\n'.join(intro + headline + detail_lines(results)) + '\n'
    save_atomic(path, lambda f: f.write(text.encode()))
    return '\n'.join(headline)


def teachers_sentence(teachers):
    if len(teachers) == 1:
        return f'The teacher, the first row and the reference of CKA: {teachers[0]}.'
    return f"The teachers, the first rows and the references of CKA: {', '.join(teachers)}."


def detail_lines(results):
    """Markdown lines of every number: each level's metrics for each protocol, the robustness
    index, the slides that could not be scored."""
    rows = results['models']
    first = next(iter(rows.values()))
    lines = ['', '## every metric', '',
             f'kNN@{knn_k}: majority vote of the k nearest training samples (cosine); best-k: k '
             'chosen on val. Slide level: linear and kNN on mean-pooled slides; CKA on up to '
             f'{cka_tiles} tiles of the test slides, resampled by slide.']
    for level in HEADLINE:
        if level in first:
            lines += level_section(rows, level, results['teachers'])
    if 'robustness_index' in first:
        lines += robustness_section(rows)
    failed = results.get('slides', {}).get('failed', {})
    if failed:
        lines += ['', f'### slides not scored ({len(failed)})', '']
        lines += [f'- {slide}: {reason}' for slide, reason in failed.items()]
    return lines


def level_section(rows, level, teachers):
    """Markdown lines of one level: every metric of every protocol with its CI, and CKA to the
    teacher, a row per model; then what each model's probes chose."""
    first = next(iter(rows.values()))
    titles = {'linear': 'linear', 'knn': f'kNN@{knn_k}', 'knn_best': 'kNN best-k',
              'abmil': 'ABMIL'}
    protocols = [p for p in titles if p in first[level]]
    header = ['model', 'params']
    for p in protocols:
        header += [f'{titles[p]} {label}' for label in METRICS.values()]
    cka_columns = [c for c in headline_columns(level, teachers) if c[0] == 'cka']
    header += [headline_title(p, m) for p, m in cka_columns]
    body = []
    for name, r in rows.items():
        cells = [name, f"{r['params'] / 1e6:.1f}M"]
        for p in protocols:
            cells += [ci_cell(r[level][p][m]) for m in METRICS]
        cells += [ci_cell(headline_entry(r[level], p, m)) for p, m in cka_columns]
        body.append(cells)
    chosen = [chosen_settings(name, r[level]) for name, r in rows.items()]
    chosen_line = 'Chosen on val (or by CV on train): ' + '; '.join(chosen)
    return ['', f'### {level} level', ''] + table(header, body) + ['', chosen_line]


def ci_cell(entry):
    """'value [low, high]' of one metric."""
    low, high = entry['ci']
    return f"{entry['value']:.3f} [{low:.3f}, {high:.3f}]"


def chosen_settings(name, level_results):
    """'name C=..., k=..., ABMIL epochs ...': the probe's C and, with a val split, the best k and
    the epoch each ABMIL seed was kept at."""
    chosen = f"{name} C={level_results['linear']['C']:g}"
    if 'knn_best' in level_results:
        chosen += f", k={level_results['knn_best']['k']}"
    if 'abmil' in level_results:
        epochs = '/'.join(map(str, level_results['abmil']['epochs']))
        chosen += f', ABMIL epochs {epochs}'
    return chosen


def robustness_section(rows):
    """Markdown lines of the robustness index: both forms at every k, a row per model."""
    first = next(iter(rows.values()))
    ks = list(first['robustness_index'])
    forms = ('SO/OS', 'SO/(SO+OS)')
    header = ['model'] + [f'{form} k={k}' for form in forms for k in ks]
    body = []
    for name, r in rows.items():
        index = r['robustness_index']
        body.append([name] + [f'{index[k][form]:.3f}' for form in forms for k in ks])
    title = ('### robustness index (de Jong et al. 2025): SO/OS > 1 and SO/(SO+OS) > 0.5 mean '
             'biology dominates the centre')
    return ['', title, ''] + table(header, body)


def plot(results, path):
    """results.png: each level's compact table at a glance, a group of bars per column and a bar
    per row with its CI; and the robustness index against k."""
    # imported here, with a backend that needs no display
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    rows = results['models']
    first = next(iter(rows.values()))
    levels = [level for level in HEADLINE if level in first]
    with_index = 'robustness_index' in first
    n_panels = len(levels) + with_index
    fig, axes = plt.subplots(1, n_panels, figsize=(4 + 5 * n_panels, 4.5), squeeze=False)
    for ax, level in zip(axes[0], levels):
        plot_headline(ax, rows, level, results['teachers'])
    axes[0, 0].legend(fontsize=8, loc='lower left')
    if with_index:
        plot_robustness(axes[0, -1], rows)
    fig.tight_layout()
    save_atomic(path, lambda f: fig.savefig(f, format='png', dpi=100))
    plt.close(fig)


def plot_headline(ax, rows, level, teachers):
    """Bars of one level's compact table: a group per column, a bar per row, CI error bars."""
    columns = headline_columns(level, teachers)
    width = 0.8 / len(rows)
    positions = np.arange(len(columns))
    for i, (name, r) in enumerate(rows.items()):
        entries = [headline_entry(r[level], p, m) for p, m in columns]
        value = np.array([e['value'] for e in entries])
        ci = np.array([e['ci'] for e in entries]).T
        # error bars are distances below and above the value; none where the CI is NaN
        error = np.nan_to_num(np.abs(ci - value))
        ax.bar(positions + i * width, value, width, yerr=error, capsize=3, label=name)
    titles = [headline_title(p, m) for p, m in columns]
    ax.set_xticks(positions + width * (len(rows) - 1) / 2, titles, fontsize=9)
    ax.set(title=f'{level} level (test, 95% CI)', ylim=(0, 1.05))


def plot_robustness(ax, rows):
    """A line per model: SO/(SO+OS) against k."""
    # the bounded form: SO/OS is infinite for a model with no other-class same-centre neighbour
    # (a teacher that separates the classes perfectly), and a line cannot show that
    first = next(iter(rows.values()))
    ks = [int(k) for k in first['robustness_index']]
    for name, r in rows.items():
        index = r['robustness_index']
        ax.plot(ks, [index[str(k)]['SO/(SO+OS)'] for k in ks], 'o-', label=name)
    ax.axhline(0.5, color='gray', ls='--', lw=1)
    ax.set(title='robustness index SO/(SO+OS) (> 0.5: biology dominates)', xlabel='k',
           xticks=ks, ylim=(0, 1.05))
    ax.legend(fontsize=8)


# -----------------------------------------------------------------------------
# rows: which models, named how, the teacher first

def model_entries(listing):
    """The entries of a comma-separated --models; none, or one given twice, is an error."""
    entries = [m.strip() for m in listing.split(',') if m.strip()]
    twice = [e for e in entries if entries.count(e) > 1]
    if not entries or twice:
        problem = f'lists {twice[0]} twice' if twice else 'is empty'
        raise SystemExit(f'error: --models {problem}: one entry per row, '
                         'e.g. --models tiny-teacher,tiny-student')
    return entries


def row_names(entries):
    """{row name: entry}: a row is named by its model name, or by its entry when names repeat."""
    model_names = [e.partition('=')[0] for e in entries]
    rows = {}
    for model_name, entry in zip(model_names, entries):
        shared = model_names.count(model_name) > 1
        rows[entry if shared else model_name] = entry
    return rows


def display_names(entries, listing):
    """{entry: display name} from --names, one name per --models entry in its order; {} without."""
    given = [n.strip() for n in listing.split(',')] if listing else []
    if given and len(given) != len(entries):
        raise SystemExit(f'error: --names gives {len(given)} names for {len(entries)} --models '
                         'entries: one name per entry, in the same order')
    if '' in given or len(set(given)) < len(given):
        raise SystemExit(f'error: --names {listing}: every row needs a name of its own')
    return dict(zip(entries, given))


def ordered_rows(entries, reference=None, listing=''):
    """({row name: entry} with the teachers first, as in G2L's tables, then the others in the
    order given; the teachers' row names). reference: comma-separated row names, entries, or more
    entries to add (several for a committee); None is the first entry. listing: --names, display
    names for the entries."""
    display = display_names(entries, listing)
    named = reference.split(',') if reference else [entries[0]]
    # a row name stands for its entry; anything else is an entry itself
    by_name = row_names(entries) | {name: entry for entry, name in display.items()}
    firsts = [by_name.get(n.strip(), n.strip()) for n in named]
    model_names = [e.partition('=')[0] for e in entries]
    for first in firsts:
        if first not in entries and first in model_names:
            raise SystemExit(f'error: --teacher {first} is the name of several --models '
                             'entries: give the whole entry')
    if len(set(firsts)) < len(firsts):
        raise SystemExit(f'error: --teacher {reference} names one row twice')
    others = [e for e in entries if e not in firsts]
    rows = {display.get(entry, name): entry for name, entry in row_names(firsts + others).items()}
    if len(rows) < len(firsts) + len(others):
        raise SystemExit(f'error: --names {listing}: a teacher would share a row name with '
                         'another row; rename it')
    return rows, list(rows)[:len(firsts)]


def baseline_row(rows, teachers, listing):
    """The row "closes X% of the gap to the teacher" is measured from: --baseline (a row name or
    entry), or the first of exactly two rows after the teachers (student before, student after);
    None when there is neither (then there are no gap lines)."""
    students = [name for name in rows if name not in teachers]
    if not listing:
        return students[0] if len(students) == 2 else None
    by_entry = {entry: name for name, entry in rows.items()}
    name = listing if listing in rows else by_entry.get(listing)
    if name not in students:
        raise SystemExit(f'error: --baseline {listing} is not one of the student rows '
                         f"({', '.join(students)})")
    return name

# -----------------------------------------------------------------------------
# the run

def distinct(column):
    """How many different values a column has; None when the data has no such column."""
    return None if column is None else len(np.unique(column))


def describe(dataset):
    """Print what the data holds; returns the summary results.json keeps."""
    counts = {s: int((dataset['split'] == s).sum()) for s in SPLITS}
    print(f"data: {dataset['source']}: {len(dataset['paths'])} images {counts}, "
          f"classes {dataset['classes']}")
    n_centers = distinct(dataset['center'])
    if n_centers == 1:
        print('note: one centre only, so no robustness index '
              '(it needs neighbours from other centres)')
    return dict(source=dataset['source'], classes=dataset['classes'], images=counts,
                n_centers=n_centers, n_slides=distinct(dataset['slide']))

def describe_cohort(cohort):
    """Print what the slide CSV holds; returns the summary results.json keeps."""
    rows = cohort['rows']
    counts = {s: sum(r['split'] == s for r in rows) for s in SPLITS}
    n_tiles = sum(len(r['tiles']['rows']) for r in rows)
    print(f"slides: {cohort['source']}: {len(rows)} slides {counts} tiled in {cohort['tiles']}, "
          f"{n_tiles} tiles; {len(cohort['failed'])} slides cannot be used")
    # failed is the cohort's own dict, which extraction adds to: the exit status reads it
    return dict(source=cohort['source'], tiles=cohort['tiles'], slides=counts, n_tiles=n_tiles,
                failed=cohort['failed'])


def run_protocols(emb, dataset, samples, with_slides):
    """Every protocol on one model's tile embeddings but CKA: tile probes; with a slide column
    (and with_slides), the slide protocols on its slides; with two centres or more, the
    robustness index. samples: what CKA will compare, filled in per level (add_cka)."""
    labels, split = dataset['labels'], dataset['split']
    n_classes = len(dataset['classes'])
    samples['tile'] = (emb[split == 'test'], None)
    row = dict(tile=run_probes(emb, labels, split, n_classes))
    if dataset['slide'] is not None and with_slides:
        bags, slide_labels, slide_split = slide_bags(emb, dataset)
        inputs = slide_inputs(bags, slide_split)
        samples['slide'] = (inputs['sample'], inputs['groups'])
        row['slide'] = run_slide_protocols(inputs, slide_labels, slide_split, n_classes)
    # the robustness index needs neighbours from other centres
    if (distinct(dataset['center']) or 0) >= 2:
        centers, slide_names = dataset['center'], dataset['slide']
        row['robustness_index'] = robustness_index(emb, labels, centers, slide_names, ri_k)
    return row


def evaluate_model(name, entry, dataset, cohort, samples, started):
    """One row: the model built once, its tile embeddings and their protocols (--data), and its
    slides' feature files (--slides). samples: the row's CKA inputs, filled in. started: when this
    run started (time.time())."""
    model_name, _, weights = entry.partition('=')
    net, spec = create(model_name, weights or None, device=device)
    n_params = sum(p.numel() for p in net.parameters())
    row = dict(entry=entry, dim=spec['dim'], params=n_params)
    if dataset is not None:
        remove_stale_temporaries(os.path.join(out, 'cache'), started)
        emb, info = embeddings(entry, net, spec, dataset)
        how = 'from cache' if info['cached'] else 'extracted'
        print(f"{name}: {emb.shape[0]} x {emb.shape[1]} embeddings {how} "
              f"in {info['seconds']:.1f} s ({info['cache']})")
        row |= info
        if not extract_only:
            row |= run_protocols(emb, dataset, samples, with_slides=cohort is None)
    if cohort is not None:
        row['features'] = features_folder(entry)
        remove_stale_temporaries(row['features'], started)
        cohort['failed'] |= extract_slides(name, entry, net, spec, cohort, row['features'])
    return row


def score_cohort(results, cohort, samples):
    """The slide level of every row, on the slides every model embedded: the same slides for
    every row. samples: {row: its CKA inputs}, their slide level filled in."""
    scored = [r for r in cohort['rows'] if r['slide'] not in cohort['failed']]
    classes = sorted({r['label'] for r in scored})
    labels = np.array([classes.index(r['label']) for r in scored], dtype=int)
    split = np.array([r['split'] for r in scored])
    check_splits(cohort['source'], split, labels, classes, unit='slides')
    counts = {s: int((split == s).sum()) for s in SPLITS}
    results['slides'] |= dict(classes=classes, scored=counts, failed=cohort['failed'])
    if cohort['failed']:
        print(f"{len(cohort['failed'])} slides not scored (listed above and in results.md)")
    for name, row in results['models'].items():
        paths = [os.path.join(row['features'], r['tiles']['stem'] + '.h5') for r in scored]
        # read one file at a time: only the bags in float16 are kept
        inputs = slide_inputs((read_features(path)[0] for path in paths), split)
        samples[name]['slide'] = (inputs['sample'], inputs['groups'])
        row['slide'] = run_slide_protocols(inputs, labels, split, len(classes))


def add_cka(results, samples):
    """Each row's CKA to each teacher, at every level it was scored at: 'cka' (to the teacher,
    or the first of a committee), and 'cka_teachers' {teacher: CKA} with a committee. samples:
    {row: {level: (CKA sample, its test slides or None)}}, the same tiles for every row."""
    teachers = results['teachers']
    for name, row in results['models'].items():
        for level, (x, groups) in samples[name].items():
            per_teacher = {t: cka_with_ci(x, samples[t][level][0], groups) for t in teachers}
            row[level]['cka'] = per_teacher[teachers[0]]
            if len(teachers) > 1:
                row[level]['cka_teachers'] = per_teacher
        # the tile level's CKA where scripts that read results.json find it
        if 'tile' in row:
            row['cka_to_teacher'] = row['tile']['cka']['value']


def gaps(results):
    """{level: {row: share of the gap closed}}: (row - baseline) / (teacher - baseline) on the
    level's first compact column (the best teacher's, with a committee), for each row but the
    teachers and the baseline; None where the baseline scores as the teacher does or above (a
    committee of teachers that each know part of the task can all score below a random student)."""
    rows, before = results['models'], results['baseline']
    if before is None:
        return {}
    gap = {}
    for level, columns in HEADLINE.items():
        if level not in rows[before]:
            continue
        protocol, metric = columns[0]
        value = {name: r[level][protocol][metric]['value'] for name, r in rows.items()}
        # to the best teacher on this column: a committee student is measured against the best
        span = value[best_teacher(results, value)] - value[before]
        others = [name for name in rows if name not in results['teachers'] + [before]]
        if span < 1e-9:
            gap[level] = dict.fromkeys(others)
            continue
        # + 0.0: no '-0%' where nothing moved
        gap[level] = {name: (value[name] - value[before]) / span + 0.0 for name in others}
    return gap


def write_results(results):
    """OUT/results.json, results.md and results.png; prints the compact tables."""
    # JSON has no NaN or Infinity (SO/OS is inf when no neighbour is OS; a CI is NaN on a
    # one-class test set): they are written as null
    strict = json.loads(json.dumps(results), parse_constant=lambda _: None)
    text = json.dumps(strict, indent=2, allow_nan=False)
    # each through a temporary name: an interrupted run never leaves a truncated result
    os.makedirs(out, exist_ok=True)
    save_atomic(os.path.join(out, 'results.json'), lambda f: f.write(text.encode()))
    print(write_markdown(results, os.path.join(out, 'results.md')))
    plot(results, os.path.join(out, 'results.png'))
    print(f'wrote {out}/results.json, results.md, results.png')


def main(argv=None):
    # temporary files last written before now are no live run's (tile.remove_stale_temporaries)
    started = time.time()
    # config: the defaults on every call (the tests call main more than once), then a config file
    # and --key=value
    globals().update(DEFAULTS)
    globals().update(configure(dict(DEFAULTS), sys.argv[1:] if argv is None else argv))
    config = {k: globals()[k] for k in config_keys}
    print('config:', json.dumps(config))

    # which rows, named how, the teacher first. extract_only embeds the --models entries alone: a
    # --teacher that is one more entry (as a config file may set it) is the scoring run's
    entries = model_entries(models)
    rows, teachers = row_names(entries), []
    if not extract_only:
        rows, teachers = ordered_rows(entries, teacher, names)
    check_models(rows)
    if bench:
        return dict(config=config, bench=bench_extraction(rows))
    results = dict(config=config, teacher=next(iter(rows)), teachers=teachers, baseline=None,
                   models={})
    if not extract_only:
        results['baseline'] = baseline_row(rows, teachers, baseline)
    if data is None and slides is None:
        raise SystemExit('error: give --data (labelled tiles or images), or --slides with --tiles '
                         '(labelled slides), or both')

    # one run at a time writes into out; extract_only runs (a model each, on several GPUs) share
    # it, each model's files written by one of them
    make_out_folder(out)
    parts = [os.path.basename(features_folder(e)) for e in rows.values()] if extract_only else []
    with one_writer(out, 'evaluate', parts):
        remove_stale_temporaries(out, started)
        return evaluate_rows(results, rows, started)


def check_models(rows):
    """Stop with one line (model.WeightsError) on an entry that names no model, before the first
    is built: not after an hour of embedding the ones before it."""
    for entry in rows.values():
        model_name, _, weights = entry.partition('=')
        resolve(model_name, weights or None)


def evaluate_rows(results, rows, started):
    """The run in its output folder: the data, every row's embeddings and protocols, the slide
    level, the outputs; returns results."""
    # data: labelled images (--data), labelled slides (--slides with --tiles), or both
    dataset = cohort = None
    if data is not None:
        dataset = read_dataset(data)
        results['data'] = describe(dataset)
    if slides is not None:
        cohort = read_cohort(slides, tiles)
        results['slides'] = describe_cohort(cohort)

    # per model its embeddings, the protocols on them and its slides' feature files. One model in
    # memory at a time: a ViT-g and a ViT-L need not share the GPU. CKA comes once every row is
    # embedded, from what each row keeps of its test embeddings
    samples = {name: {} for name in rows}
    for name, entry in rows.items():
        row = evaluate_model(name, entry, dataset, cohort, samples[name], started)
        results['models'][name] = row
    if extract_only:
        # no results.*: a table of this run's rows alone would look like the whole comparison
        print(f"extract_only: {', '.join(rows)} embedded under {out}, nothing scored; run again "
              'with every model and without --extract_only to score them')
        return results
    # the slide level once every model has embedded every slide, so all rows score the same slides
    if cohort is not None:
        score_cohort(results, cohort, samples)
    add_cka(results, samples)

    # outputs
    results['gap'] = gaps(results)
    write_results(results)
    return results


def exit_status(results):
    """1 when slides of the cohort could not be scored, so that a job script sees the run is not
    complete; else 0."""
    return 1 if results.get('slides', {}).get('failed') else 0


if __name__ == '__main__':
    sys.exit(exit_status(main()))
