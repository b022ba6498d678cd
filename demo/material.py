"""
The demos' material, made on first use and reused after: synthetic slides tiled at 0.5 µm/px, a
labelled patch set of the same tissues, and the demo teachers, tiny models trained on the tissue
labels as a stand-in for a giga model's pretraining. Two demos:
  'g2l' (config/demo.py): three tissues that differ in their nuclei; one teacher knows them all.
  'committee' (config/demo_committee.py): two questions about the same tissue, which cells and
  which matrix; each of two teachers knows one answer and cannot see the other (blind by
  construction: each sees its input along one axis of colour), so only a student of both knows
  the tissue.
distill.py calls prepare() when a config asks for synthetic slides; `python tile.py --demo DIR`
calls tile_demo().
"""
import json
import math
import os
import shutil

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import model as zoo
import tile
from demo import synthetic

# the size and resolution of the demo's synthetic slides
DEMO_SLIDE = dict(width=4096, height=3072, mpp=0.5)
# each demo's teachers, by the name of their weight file: the question each learns. The g2l
# teacher the three tissues; the committee's cells teacher which cells, its matrix teacher which
# matrix. All are tiny-teachers
DEMO_TEACHERS = {'g2l': {'teacher.safetensors': 'tissues'},
                 'committee': {'cells_teacher.safetensors': 'cells',
                               'matrix_teacher.safetensors': 'matrix'}}


def prepare(config, master):
    """What the demo needs and lacks: its slides tiled, its labelled patches, its teachers.
    config: distill.py's settings (synthetic_demo, data_dir, synthetic_slides, synthetic_patches,
    eval_data, teacher, teacher_weights, demo_teacher_steps, seed, out_dir). Only the master
    process makes anything; the caller makes the others wait."""
    story = config['synthetic_demo']
    if story not in DEMO_TEACHERS:
        raise SystemExit(f"error: synthetic_demo={story!r}: use {' or '.join(DEMO_TEACHERS)}")
    data_dir, eval_data = config['data_dir'], config['eval_data']
    # a tiles folder of an older demo or of other settings is refused, on every rank, before
    # anything is made or trained on it
    if os.path.isdir(data_dir):
        check_demo_tiles(data_dir, config['synthetic_slides'], config['out_dir'], story)
    if master and not os.path.isdir(data_dir):
        make_demo_tiles(data_dir, config['synthetic_slides'], story)
    if master and eval_data and not os.path.exists(eval_data):
        committee = dict(classes=synthetic.committee_classes(), stains=synthetic.COMMITTEE_STAINS,
                         stain_jitter=0.0) if story == 'committee' else {}
        synthetic.write_synthetic_patches(os.path.dirname(eval_data), seed=config['seed'],
                                          patches_per_slide=config['synthetic_patches'],
                                          **committee)
    # the demo's teachers are tiny-teachers trained into teacher_weights files of the names
    # DEMO_TEACHERS gives; any other teacher is the user's
    for name, path in zip(config['teacher'].split(','), config['teacher_weights'].split(',')):
        question = DEMO_TEACHERS[story].get(os.path.basename(path))
        demo_teacher = name == 'tiny-teacher' and question
        if master and demo_teacher and not os.path.exists(path):
            train_demo_teacher(path, config['demo_teacher_steps'], config['seed'], question)


def make_demo_tiles(data_dir, n_slides, story='g2l'):
    """The demo's slides, tiled at 0.5 µm/px, with demo.json saying what they were made from:
    synthetic H&E with three tissues that differ in their nuclei, not in colour
    (synthetic.DEMO_TISSUES), from two centres that stain differently; or, for the committee,
    tumour and lymphocytes (synthetic.COMMITTEE_CELLS) in one matrix a slide (synthetic.MATRICES),
    collagenous in the even slides, myxoid in the odd ones."""
    slides_dir = os.path.join(os.path.dirname(os.path.abspath(data_dir)), 'slides')
    os.makedirs(slides_dir, exist_ok=True)
    # a killed earlier attempt's folder may hold tiles of older slides: start afresh
    building = data_dir + '.tmp'
    shutil.rmtree(building, ignore_errors=True)
    paths = []
    for i in range(n_slides):
        paths.append(os.path.join(slides_dir, f'synthetic_{i}.tiff'))
        # written again even when there: an older demo's slide of that name has other tissues,
        # and a killed run leaves half a file (the eight take ~25 s)
        synthetic.write_synthetic_slide(paths[-1], **DEMO_SLIDE, seed=i, **slide_tissues(i, story))
    rows = tile.tile_slides(paths, building, mpp=DEMO_SLIDE['mpp'], tile_size=256, min_tissue=0.5)
    if any(r['status'] != 'ok' for r in rows):
        raise SystemExit(f'error: tiling the demo slides failed: {rows}')
    # a plain write: demo.json arrives with the folder, which appears only once complete
    with open(os.path.join(building, 'demo.json'), 'w') as f:
        json.dump(demo_recipe(n_slides, story), f, indent=1)
    os.replace(building, data_dir)


def slide_tissues(i, story):
    """What slide i of a demo draws: its tissues and its centre, every other slide; for the
    committee the centre is the slide's matrix."""
    if story == 'committee':
        return dict(tissues=synthetic.COMMITTEE_CELLS, centre=i % len(synthetic.MATRICES),
                    stains=synthetic.COMMITTEE_STAINS, stain_jitter=0.0)
    return dict(tissues=synthetic.DEMO_TISSUES, centre=i % len(synthetic.CENTRE_STAINS))


def demo_recipe(n_slides, story='g2l'):
    """What the demo's tiles are made from, as demo.json records it."""
    # the count and what the slides draw: the tissue classes and the centres' (or the committee's
    # matrices') stains
    if story == 'committee':
        tissues = {t: synthetic.TISSUES[t] for t in synthetic.COMMITTEE_CELLS}
        recipe = dict(synthetic_demo=story, synthetic_slides=n_slides, slide=DEMO_SLIDE,
                      tissues=tissues, matrix_stains=synthetic.COMMITTEE_STAINS)
    else:
        tissues = {t: synthetic.TISSUES[t] for t in synthetic.DEMO_TISSUES}
        recipe = dict(synthetic_slides=n_slides, slide=DEMO_SLIDE, tissues=tissues,
                      centre_stains=synthetic.CENTRE_STAINS)
    # as JSON reads it back: tuples become lists
    return json.loads(json.dumps(recipe))


def check_demo_tiles(data_dir, n_slides, out_dir, story='g2l'):
    """A one-line error unless data_dir holds the tiles make_demo_tiles makes for this demo."""
    # the demo makes what it lacks and reuses what it finds: material of an older demo (fewer
    # slides, no tissue classes) would silently give another table
    marker = os.path.join(data_dir, 'demo.json')
    made_with = None
    if os.path.exists(marker):
        with open(marker) as f:
            made_with = json.load(f)
    recipe = demo_recipe(n_slides, story)
    if made_with is None:
        why = 'no demo.json: made by an older demo, or not by the demo'
    else:
        differs = [k for k in recipe if made_with.get(k) != recipe[k]]
        if not differs:
            return
        name = differs[0]
        why = f'{name} {short(made_with.get(name))} there, {short(recipe[name])} here'
    raise SystemExit(f"error: {data_dir} is not this demo's tiles folder ({why}): delete it and "
                     f'{out_dir}, then rerun to make them afresh')


def short(value):
    """A value for an error line: long ones cut to their first characters."""
    text = str(value)
    return text[:20] + '...' if len(text) > 24 else text


def train_demo_teacher(path, steps, seed, question='tissues'):
    """Train a tiny teacher on one question about the demo's tissues, and save its weights to
    `path`: 'tissues' (the g2l demo's three), 'cells' or 'matrix' (the committee's two).

    A stand-in for a giga model's pretraining, which the demo cannot afford: H-optimus-0 learnt
    from >500K slides what a tissue looks like; this teacher learns the synthetic tissues from
    their labels in a few hundred steps. Distillation then has something to transfer: the random
    student cannot tell these tissues apart, the teacher can (README: the demo's table).
    """
    from safetensors.torch import save
    n_classes, draw, see = teacher_question(question, seed)
    vit, spec = zoo.create('tiny-teacher')
    vit.train()
    # a linear classifier on the pooled embedding, the one distillation will copy
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        classifier = nn.Linear(spec['dim'], n_classes)
    params = list(vit.parameters()) + list(classifier.parameters())
    # our choice, measured on the demo's tissues (300 steps, seed 1337): lr 2e-3 after a 30-step
    # warm-up, then a cosine to 0, learns the three tissues in ~150 steps (loss 1.00 -> 0.31)
    peak_lr = 2e-3
    warmup = 30
    # label smoothing 0.1 (our choice, the common default): the loss cannot fall below 0.29, the
    # entropy of the smoothed targets of 3 classes, and measured sits there from ~step 200 on
    # (0.291). There the logits stop growing, at a gap of ln 28 = 3.3; without smoothing they
    # would keep growing for as long as it trains
    label_smoothing = 0.1
    optimizer = torch.optim.AdamW(params, lr=peak_lr, weight_decay=0.05)
    print(f'training the demo teacher on {question} ({steps} steps) into {path}')
    see(vit, spec)
    for step in tqdm(range(steps), desc='demo teacher', unit='step'):
        # fresh crops of the slides' tissue textures every step, each in a random slide's stain
        crops, labels = draw(step)
        images = torch.from_numpy(crops).permute(0, 3, 1, 2)
        if step % 2:
            images = images.flip(3)
        for group in optimizer.param_groups:
            group['lr'] = warmup_cosine(step, peak_lr, warmup, steps)
        pooled, _ = zoo.embed(vit, spec, images)
        logits = classifier(pooled)
        loss = F.cross_entropy(logits, torch.from_numpy(labels), label_smoothing=label_smoothing)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        # after every update: what the teacher may see stays all it sees
        see(vit, spec)
    state = {k: v.detach().contiguous() for k, v in vit.state_dict().items()}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tile.save_atomic(path, lambda f: f.write(save(state)))


def teacher_question(question, seed):
    """(number of classes, draw(step) -> (uint8 crops, labels), see(vit, spec): what the
    teacher may see of its input) of a demo teacher's question."""
    # our choice: 32 fresh crops a step, none seen twice, so it learns the tissues, not its crops
    crops_per_step = 32
    if question == 'tissues':
        draw = lambda step: synthetic.synthetic_crops(crops_per_step, seed=[seed, step])[:2]
        return len(synthetic.DEMO_TISSUES), draw, lambda vit, spec: None

    def committee_draw(step):
        crops, cells, matrices = synthetic.committee_crops(crops_per_step, seed=[seed, step])
        return crops, cells if question == 'cells' else matrices
    # each committee teacher sees its input along one axis of colour: the cells teacher the luma,
    # in which the matrices are one; the matrix teacher the matrices' axis, in which the nuclei
    # do not show
    axis = synthetic.LUMA if question == 'cells' else synthetic.MATRIX_AXIS
    n_classes = len(synthetic.COMMITTEE_CELLS if question == 'cells' else synthetic.MATRICES)
    return n_classes, committee_draw, lambda vit, spec: see_along(vit, spec, axis)


def see_along(vit, spec, axis):
    """Tie the patch embedding's three channels so that the ViT sees its input along one axis of
    colour and nothing across it: weight[:, c] = axis_c * std_c * K for one kernel K, so that
    sum_c weight[:, c] * (x_c - mean_c) / std_c = K * (axis . x - axis . mean). Whatever it
    learns, two inputs of the same projection on the axis are the same input to it."""
    scale = torch.tensor(axis, dtype=torch.float32) * torch.tensor(spec['std'])
    scale = scale.view(1, 3, 1, 1)
    with torch.no_grad():
        weight = vit.patch_embed.proj.weight
        # the least-squares kernel: the one closest to the weights the step left
        kernel = (weight * scale).sum(1, keepdim=True) / (scale * scale).sum()
        weight.copy_(kernel * scale)


def warmup_cosine(step, peak, warmup, total):
    """A linear warm-up to `peak` over `warmup` steps, then a cosine to 0 at step `total`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.5 * (1 + math.cos(math.pi * t)) * peak


def tile_demo(out):
    """`python tile.py --demo DIR`: synthetic slides, tiled and benched: 40x TIFF and Aperio SVS,
    that glass at 20x, a crop that is all tissue, a blank."""
    slides = os.path.join(out, 'slides')
    os.makedirs(slides, exist_ok=True)
    write = synthetic.write_synthetic_slide
    write(os.path.join(slides, 'g40.tif'))
    write(os.path.join(slides, 'a40.svs'), aperio=True)
    write(os.path.join(slides, 'g20.tif'), width=2048, height=1536, mpp=0.5)
    write(os.path.join(slides, 'crop.tif'), width=2048, height=1536, mpp=0.5, full_tissue=True)
    write(os.path.join(slides, 'blank.tif'), width=2048, height=1536, blank=True)
    # the blank slide fails: no tissue
    tile.main([slides, '--out', os.path.join(out, 'tiles')])
    tile.bench(os.path.join(out, 'tiles'))
