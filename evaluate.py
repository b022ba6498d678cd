r"""
Evaluate frozen encoders side by side, the way G2L (arXiv 2510.11176) compares the giga teacher
(H-optimus-0) with the student before (Hibou-L) and after distillation: linear probe and kNN on
tile and slide tasks, linear CKA to the teacher, and the robustness index across medical centres
(de Jong et al. 2025). One row per model, teacher first.

CPU demo (random tiny models; 72 generated 64 px tiles: 3 classes, 2 centres, 18 slides; < 1 min):
    python -c "import evaluate; evaluate.write_demo_data('data/eval-demo')"
    python evaluate.py --data data/eval-demo/labels.csv --models tiny-teacher,tiny-student \
        --out out/eval-demo --device cpu
Single GPU (bf16; NAME=PATH loads local weights; a distilled folder needs no NAME):
    python evaluate.py --data brca_patches/ \
        --models H-optimus-0=/data/hf/H-optimus-0,Hibou-L=/data/hf/hibou-L,out/g2l_brca
    python evaluate.py config/eval_brca.py     # the same, with the settings in a config file
No torchrun line: extraction is one forward pass per image. For several GPUs run one process per
model with the same --out (the cache is shared, written atomically), then one run with all models
finds them cached.

--data: an ImageFolder root (train/, optional val/, test/; a subfolder per class) or a CSV
path,label,split[,center][,slide] (paths relative to the CSV).
Writes OUT/results.json, results.md, results.png; embeddings in OUT/cache/.
--models: one row per entry, named by its model name, or by the whole entry when entries share a
name: --models Hibou-L,Hibou-L=out/g2l/student.safetensors is the student before and after
distillation.
"""
import csv
import hashlib
import io
import json
import os
import re
import sys
import time
import warnings
from contextlib import nullcontext
from functools import partial

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

from model import configure, create, embed, resize_crop

# -----------------------------------------------------------------------------
# config: these defaults, then a config/*.py file, then --key=value
# (model.configure checks keys and types)
data = None                          # ImageFolder root or CSV path,label,split[,center][,slide]
# comma-separated, one row each: model.py names, NAME=WEIGHTS, distilled folders
models = 'tiny-teacher,tiny-student'
# the reference row (CKA is measured to it): a name or entry of models, or one more entry;
# None = the first of models
teacher = None
out = 'out/eval'                     # results.* here, embeddings in out/cache/
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
seed = 0                             # the probe's fits, its CV folds and the bootstrap resamples
# -----------------------------------------------------------------------------
# every plain value above is a config key
config_types = (int, float, str, list, type(None))
config_keys = [k for k, v in globals().items()
               if not k.startswith('_') and isinstance(v, config_types)]
DEFAULTS = {k: globals()[k] for k in config_keys}

SPLITS = ('train', 'val', 'test')
IMAGE_EXTS = ('.png', '.jpg', '.jpeg', '.tif', '.tiff', '.bmp', '.webp')
# the first leads the tables, as balanced accuracy leads eva's
METRICS = {'balanced_accuracy': 'bal. acc',
           'f1_macro': 'macro F1',
           'auroc': 'AUROC',
           'accuracy': 'acc'}
# bump when load_images or the cache layout changes: old caches then miss
CACHE_VERSION = 'v2 shorter side, centre crop'

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
    return dataset


def check_splits(source, split, labels, classes):
    """Train and test must have images, and every class must have train images."""
    for s in ('train', 'test'):
        if not (split == s).any():
            raise SystemExit(f'error: {source}: the {s} split is empty; '
                             'train and test are required, val is optional')
    trained_classes = set(labels[split == 'train'])
    untrained = sorted(set(range(len(classes))) - trained_classes)
    if untrained:
        raise SystemExit(f'error: {source}: class {classes[untrained[0]]!r} has no train images, '
                         'so no probe can learn it')


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
    with open(path, newline='') as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    missing = {'path', 'label', 'split'} - set(reader.fieldnames or [])
    if missing or not rows:
        what = ', '.join(sorted(missing)) or 'rows'
        raise SystemExit(f'error: {path} needs a header path,label,split[,center][,slide] and at '
                         f'least one row (missing: {what})')
    # paths are relative to the CSV's folder; absolute paths pass through
    base = os.path.dirname(os.path.abspath(path))
    for r in rows:
        r['path'] = os.path.join(base, r['path'])
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


def write_atomic(path, payload):
    """Write bytes to a temporary name, then rename."""
    # an interrupted run never leaves a truncated cache or result that looks complete
    os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
    temporary = f'{path}.tmp{os.getpid()}'
    with open(temporary, 'wb') as f:
        f.write(payload)
    os.replace(temporary, path)

# -----------------------------------------------------------------------------
# embeddings, extracted once per (model, dataset)

def cache_path(name, net, spec, dataset):
    """OUT/cache/<name>-<key>.npz; the key changes with the weights, preprocessing or any image."""
    key = hashlib.blake2b(digest_size=8)
    # the weights themselves, not their file name: a student re-trained into the same folder must
    # miss (hashing a ViT-g takes a few seconds)
    for param_name, tensor in net.state_dict().items():
        key.update(param_name.encode())
        raw_bytes = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
        key.update(raw_bytes.numpy())
    # the preprocessing, and every image's path, size and mtime
    preprocess = {k: spec.get(k) for k in ('img_size', 'resize', 'mean', 'std', 'pool', 'dim')}
    inputs = [CACHE_VERSION, preprocess, dataset['stamps']]
    key.update(json.dumps(inputs, sort_keys=True).encode())
    slug = re.sub(r'[^A-Za-z0-9._-]+', '_', name.strip('/'))[-60:]
    return os.path.join(out, 'cache', f'{slug}-{key.hexdigest()}.npz')


def embeddings(name, weights, dataset):
    """Pooled embeddings (N, dim) of every image, float32, from the cache while model and data are
    unchanged; and a dict of dim, params, cache (its path), cached, seconds."""
    start = time.time()
    net, spec = create(name, weights or None, device=device)
    path = cache_path(name, net, spec, dataset)
    n_params = sum(p.numel() for p in net.parameters())
    info = dict(dim=spec['dim'], params=n_params, cache=path, cached=os.path.exists(path))
    if info['cached']:
        with np.load(path) as cached:
            return cached['embeddings'], info | dict(seconds=time.time() - start)
    emb = extract(name, net, spec, dataset['paths'])
    # the image paths beside the embeddings: the file stands alone
    buffer = io.BytesIO()
    np.savez(buffer, embeddings=emb, paths=np.array(dataset['paths']))
    write_atomic(path, buffer.getvalue())
    return emb, info | dict(seconds=time.time() - start)


def extract(name, net, spec, paths):
    """Pooled embeddings (N, dim), float32, of the images at paths: one forward pass each."""
    loader = torch.utils.data.DataLoader(paths, batch_size=batch_size, num_workers=num_workers,
                                         collate_fn=partial(load_images, spec=spec),
                                         pin_memory=device.startswith('cuda'))
    # precision lives here: bf16 autocast on CUDA, float32 on CPU (bf16 is 3-4x slower there)
    if device.startswith('cuda'):
        autocast = torch.autocast('cuda', dtype=torch.bfloat16)
    else:
        autocast = nullcontext()
    progress = tqdm(total=len(paths), unit='img', desc=f'embed {name}')
    chunks = []
    with torch.inference_mode(), autocast, progress:
        for images, error in loader:
            if error:
                raise SystemExit(error)
            pooled, _ = embed(net, spec, images.to(device, non_blocking=True))
            chunks.append(pooled.float().cpu().numpy())
            progress.update(len(images))
    return np.concatenate(chunks)

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


def with_ci(y, scores):
    """Each metric on the test set with its 95% CI over `bootstrap` resamples:
    {metric: {'value', 'ci': [2.5th, 97.5th percentile]}}."""
    point = metrics(y, scores)
    # the same resamples for every model, so the CIs are paired across rows
    rng = np.random.default_rng(seed)
    draws = {m: [np.full(1, np.nan)] for m in METRICS}
    # 100 resamples at a time bounds the (100, N) weight matrix
    for start in range(0, bootstrap, 100):
        n_resamples = min(100, bootstrap - start)
        picks = rng.integers(0, len(y), (n_resamples, len(y)))
        multiplicities = [np.bincount(p, minlength=len(y)) for p in picks]
        weights = np.stack(multiplicities).astype(np.float64)
        for m, values in metrics(y, scores, weights).items():
            draws[m].append(values)
    results = {}
    with warnings.catch_warnings():
        # all-NaN: no resamples, or a test set of one class
        warnings.simplefilter('ignore', RuntimeWarning)
        for m in METRICS:
            ci = np.nanpercentile(np.concatenate(draws[m]), [2.5, 97.5])
            results[m] = dict(value=float(point[m][0]), ci=ci.tolist())
    return results

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
    """(balanced accuracy, mean log-likelihood) on held-out samples of a probe fitted with C."""
    probs = fit_probe(x, y, C).predict_proba(held_x)
    balanced_accuracy = metrics(held_y, probs)['balanced_accuracy'][0]
    # ties in balanced accuracy (common on small val sets) go to the lower cross-entropy: among
    # equally accurate C, the best-fitting one, not the strongest regulariser with near-uniform
    # probabilities
    true_class_probs = probs[np.arange(len(held_y)), held_y]
    log_likelihood = np.log(true_class_probs).mean()
    return np.array([balanced_accuracy, log_likelihood])


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
    results = dict(linear=with_ci(test_y, probs) | dict(C=C))
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


def linear_cka(x, y):
    """Linear CKA (Kornblith et al. 2019) between two embeddings (N, D1) and (N, D2) of the same
    samples: 1 for the same features up to rotation and isotropic scale."""
    # ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F) on centred features. G2L reports 0.76
    # between Hibou-L and H-optimus-0, 0.97 after distillation.
    x = x.astype(np.float64) - x.mean(0)
    y = y.astype(np.float64) - y.mean(0)
    cross = np.linalg.norm(y.T @ x) ** 2
    return float(cross / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y)))


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


def pool_slides(emb, dataset):
    """Mean of each slide's tile embeddings, with each slide's label and split."""
    # the simplest slide encoder, a baseline every MIL model must beat
    slide_names = dataset['slide']
    _, first_tile, slide_of_tile = np.unique(slide_names, return_index=True, return_inverse=True)
    order = np.argsort(slide_of_tile, kind='stable')
    tiles_per_slide = np.bincount(slide_of_tile)
    slide_starts = np.r_[0, np.cumsum(tiles_per_slide)[:-1]]
    summed = np.add.reduceat(emb[order], slide_starts, axis=0)
    pooled = summed / tiles_per_slide[:, None]
    # read_dataset checked one label and one split per slide: its first tile's are the slide's
    labels = dataset['labels'][first_tile]
    split = dataset['split'][first_tile]
    return pooled.astype(np.float32), labels, split

# -----------------------------------------------------------------------------
# outputs

def table(header, rows):
    """Markdown lines of a table: a header and rows of cell strings."""
    lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
    return lines + ['| ' + ' | '.join(cells) + ' |' for cells in rows]


def write_markdown(results, path):
    """results.md: a table per level (tile, slide), then the robustness index; returns the text."""
    rows = results['models']
    first = next(iter(rows.values()))
    lines = [f"# {', '.join(rows)} on {results['data']['source']}", '',
             f"Teacher {results['teacher']}. "
             f"Test split, 95% bootstrap CIs ({bootstrap} resamples). "
             f"kNN@{knn_k}: majority vote of the k nearest training samples (cosine); "
             "best-k: k chosen on val."]
    for level in ('tile', 'slide'):
        if level in first:
            lines += level_section(rows, level)
    if 'robustness_index' in first:
        lines += robustness_section(rows)
    text = '\n'.join(lines)
    write_atomic(path, (text + '\n').encode())
    return text


def level_section(rows, level):
    """Markdown lines of one level: every metric of every protocol with its CI, a row per model,
    then the C and k each model's probes chose."""
    first = next(iter(rows.values()))
    titles = {'linear': 'linear', 'knn': f'kNN@{knn_k}', 'knn_best': 'kNN best-k'}
    protocols = [p for p in titles if p in first[level]]
    # CKA to the teacher is measured on tile embeddings: a column of the tile table only
    with_cka = level == 'tile'
    header = ['model', 'params']
    for p in protocols:
        header += [f'{titles[p]} {label}' for label in METRICS.values()]
    header += ['CKA to teacher'] * with_cka
    body = []
    for name, r in rows.items():
        cells = [name, f"{r['params'] / 1e6:.1f}M"]
        for p in protocols:
            cells += [ci_cell(r[level][p][m]) for m in METRICS]
        cells += [f"{r['cka_to_teacher']:.3f}"] * with_cka
        body.append(cells)
    chosen = [chosen_settings(name, r[level]) for name, r in rows.items()]
    chosen_line = 'Chosen on val (or by CV on train): ' + '; '.join(chosen)
    return ['', f'## {level} level', ''] + table(header, body) + ['', chosen_line]


def ci_cell(entry):
    """'value [low, high]' of one metric."""
    low, high = entry['ci']
    return f"{entry['value']:.3f} [{low:.3f}, {high:.3f}]"


def chosen_settings(name, level_results):
    """'name C=..., k=...': the probe's C and, with a val split, the best k."""
    chosen = f"{name} C={level_results['linear']['C']:g}"
    if 'knn_best' in level_results:
        chosen += f", k={level_results['knn_best']['k']}"
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
    title = ('## robustness index (de Jong et al. 2025): SO/OS > 1 and SO/(SO+OS) > 0.5 mean '
             'biology dominates the centre')
    return ['', title, ''] + table(header, body)


def plot(results, path):
    """results.png: a panel per metric, CKA to the teacher, and the robustness index against k."""
    # imported here, with a backend that needs no display
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    rows = results['models']
    first = next(iter(rows.values()))
    # a group of bars per level and protocol
    levels = [level for level in ('tile', 'slide') if level in first]
    groups = [(level, p) for level in levels for p in ('linear', 'knn')]
    fig, axes = plt.subplots(2, 3, figsize=(16, 8))
    for ax, (metric, label) in zip(axes.flat, METRICS.items()):
        plot_metric(ax, rows, groups, metric, label)
    axes[0, 0].legend(fontsize=8)
    plot_cka(axes[1, 1], rows, results['teacher'])
    plot_robustness(axes[1, 2], rows)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format='png', dpi=100)
    plt.close(fig)
    write_atomic(path, buffer.getvalue())


def plot_metric(ax, rows, groups, metric, label):
    """Bars of one metric: a group per (level, protocol), a bar per model, CI error bars."""
    width = 0.8 / len(rows)
    positions = np.arange(len(groups))
    for i, (name, r) in enumerate(rows.items()):
        value = np.array([r[level][p][metric]['value'] for level, p in groups])
        ci = np.array([r[level][p][metric]['ci'] for level, p in groups]).T
        # error bars are distances below and above the value; none where the CI is NaN
        error = np.nan_to_num(np.abs(ci - value))
        ax.bar(positions + i * width, value, width, yerr=error, capsize=3, label=name)
    protocol_names = {'linear': 'linear', 'knn': f'kNN@{knn_k}'}
    group_names = [f'{level} {protocol_names[p]}' for level, p in groups]
    ax.set_xticks(positions + width * (len(rows) - 1) / 2, group_names)
    ax.set(title=f'{label} (test, 95% CI)', ylim=(0, 1.05))


def plot_cka(ax, rows, teacher):
    """A bar per model: its linear CKA to the teacher."""
    colours = [f'C{i}' for i in range(len(rows))]
    ax.bar(list(rows), [r['cka_to_teacher'] for r in rows.values()], color=colours)
    ax.set(title=f'linear CKA to {teacher} (test)', ylim=(0, 1.05))
    ax.tick_params(axis='x', labelrotation=15)


def plot_robustness(ax, rows):
    """A line per model: SO/OS against k; only a title when the data has no centres."""
    ax.set_title('robustness index: needs a center column')
    first = next(iter(rows.values()))
    if 'robustness_index' not in first:
        return
    ks = [int(k) for k in first['robustness_index']]
    for name, r in rows.items():
        index = r['robustness_index']
        ax.plot(ks, [index[str(k)]['SO/OS'] for k in ks], 'o-', label=name)
    ax.axhline(1, color='gray', ls='--', lw=1)
    ax.set(title='robustness index SO/OS (> 1: biology dominates)', xlabel='k', xticks=ks)
    ax.legend(fontsize=8)


def write_demo_data(root, slides_per_split=(3, 1, 2), tiles_per_slide=4, size=64, seed=0):
    """Small PNG tiles of 3 colour/texture classes from 2 centres, written as an ImageFolder under
    root and listed in root/labels.csv with center and slide columns. Returns the CSV's path."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    dense_dark_dots = ((xx % 12 < 5) & (yy % 12 < 5)) * 2.0 - 1
    pink_fibres = np.sin(xx / 3.0)
    purple_blobs = np.sin(xx / 5.0) * np.sin(yy / 5.0)
    # each class: an RGB colour and a texture in [-1, 1]
    classes = {'lymphocytes': ((80, 60, 150), dense_dark_dots),
               'stroma': ((230, 150, 190), pink_fibres),
               'tumor': ((150, 90, 170), purple_blobs)}
    rows = []
    for label, (colour, texture) in classes.items():
        for split, n_slides in zip(SPLITS, slides_per_split):
            for s in range(n_slides):
                os.makedirs(os.path.join(root, split, label), exist_ok=True)
                slide, center = f'{label}-{split}-{s}', f'center{s % 2}'
                # a stain shift per centre plus one per slide: within a lab, slides vary too
                stain = np.array([12, -8, 10]) * (1 if s % 2 else -1) + rng.normal(0, 20, 3)
                for t in range(tiles_per_slide):
                    noise = rng.normal(0, 10, (size, size, 3))
                    pixels = np.array(colour) + stain + 40 * texture[..., None] + noise
                    path = os.path.join(split, label, f'{slide}_{t}.png')
                    tile = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
                    tile.save(os.path.join(root, path))
                    rows.append((path, label, split, center, slide))
    csv_path = os.path.join(root, 'labels.csv')
    with open(csv_path, 'w') as f:
        f.write('path,label,split,center,slide\n')
        f.writelines(','.join(r) + '\n' for r in rows)
    return csv_path

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


def ordered_rows(entries, reference=None):
    """{row name: entry} with the teacher first, as in G2L's tables. reference: a row name, an
    entry, or one more entry to add; None is the first entry."""
    named = reference or entries[0]
    # a row name stands for its entry; anything else is an entry itself
    first = row_names(entries).get(named, named)
    if first not in entries and first in [e.partition('=')[0] for e in entries]:
        raise SystemExit(f'error: --teacher {first} is the name of several --models entries: '
                         'give the whole entry')
    others = [e for e in entries if e != first]
    return row_names([first] + others)

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


def run_protocols(emb, dataset, teacher_test):
    """Every protocol on one model's tile embeddings: tile probes and CKA to the teacher; with
    a slide column, probes on mean-pooled slides; with two centres or more, the robustness index."""
    labels, split = dataset['labels'], dataset['split']
    n_classes = len(dataset['classes'])
    test = split == 'test'
    row = dict(tile=run_probes(emb, labels, split, n_classes),
               cka_to_teacher=linear_cka(emb[test], teacher_test))
    if dataset['slide'] is not None:
        slide_emb, slide_labels, slide_split = pool_slides(emb, dataset)
        row['slide'] = run_probes(slide_emb, slide_labels, slide_split, n_classes)
    # the robustness index needs neighbours from other centres
    if (distinct(dataset['center']) or 0) >= 2:
        centers, slides = dataset['center'], dataset['slide']
        row['robustness_index'] = robustness_index(emb, labels, centers, slides, ri_k)
    return row


def write_results(results):
    """OUT/results.json, results.md (printed too) and results.png."""
    # JSON has no NaN or Infinity (SO/OS is inf when no neighbour is OS; a CI is NaN on a
    # one-class test set): they are written as null
    strict = json.loads(json.dumps(results), parse_constant=lambda _: None)
    text = json.dumps(strict, indent=2, allow_nan=False)
    write_atomic(os.path.join(out, 'results.json'), text.encode())
    print(write_markdown(results, os.path.join(out, 'results.md')))
    plot(results, os.path.join(out, 'results.png'))
    print(f'wrote {out}/results.json, results.md, results.png')


def main(argv=None):
    # config: the defaults on every call (the tests call main more than once), then a config file
    # and --key=value
    globals().update(DEFAULTS)
    globals().update(configure(dict(DEFAULTS), sys.argv[1:] if argv is None else argv))
    config = {k: globals()[k] for k in config_keys}
    print('config:', json.dumps(config))

    # which rows, the teacher first
    rows = ordered_rows(model_entries(models), teacher)
    reference = next(iter(rows))

    # data
    dataset = read_dataset(data)
    results = dict(config=config, teacher=reference, models={}, data=describe(dataset))

    # per model its embeddings, then every protocol on them. One model in memory at a time: a ViT-g
    # and a ViT-L need not share the GPU.
    test = dataset['split'] == 'test'
    for name, entry in rows.items():
        model_name, _, weights = entry.partition('=')
        emb, info = embeddings(model_name, weights, dataset)
        how = 'from cache' if info['cached'] else 'extracted'
        print(f"{name}: {emb.shape[0]} x {emb.shape[1]} embeddings {how} "
              f"in {info['seconds']:.1f} s ({info['cache']})")
        # the teacher's row comes first: its test embeddings are there for every row's CKA
        if name == reference:
            teacher_test = emb[test]
        results['models'][name] = info | run_protocols(emb, dataset, teacher_test)

    # outputs
    write_results(results)
    return results


if __name__ == '__main__':
    main()
