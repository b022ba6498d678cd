"""
Tile whole-slide images at a physical resolution (µm/px) for G2L distillation.

For each slide: find tissue on a low-resolution pyramid level (HSV saturation + Otsu, as in CLAM), lay a
non-overlapping grid of TILE_SIZE px tiles at MPP µm/px over level 0, keep the tiles that are at least MIN_TISSUE
tissue and save their level-0 coordinates (int64 N×2 top-left x,y, as in TRIDENT) with a QC picture. No tile
pixels are read here; TileDataset reads them later through OpenSlide, for distill.py and evaluate.py.

  python tile.py --demo /tmp/g2l_demo                               # CPU demo: synthetic slides -> tiles -> bench
  python tile.py /data/TCGA-BRCA --out tiles/brca --workers 16      # every slide below a folder (recursive)
  python tile.py slides/ --out tiles --slide-mpp 0.25 --mpp-csv mpp.csv    # slides whose metadata lacks mpp
  python tile.py /data/TCGA-BRCA --out tiles/brca --shard $SLURM_ARRAY_TASK_ID/64   # job array: shard I of N
  python tile.py --bench tiles/brca                                 # TileDataset vs bare read_region, tiles/s

Outputs in --out: <stem>.npz (coords, tissue, level, read_size, tile_size, mpp, slide_mpp, slide_path), <stem>.jpg
(QC: tissue outline in green, kept tiles in blue) and manifest.csv (one row per slide). Finished slides are skipped
on a rerun; the exit status is 0 only when every slide succeeded.
"""
import argparse
import collections
import csv
import functools
import hashlib
import io
import itertools
import math
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed

import numpy as np
import openslide
import tifffile
from PIL import Image, ImageDraw, ImageFilter
from scipy import ndimage
from tqdm import tqdm

MPP = 0.5               # target µm/px of a tile: H-optimus-0 and G2L work at 0.5 µm/px (~20x)
TILE_SIZE = 256         # tile side in px at MPP; G2L cuts non-overlapping 256 px tiles, then random-crops 224
MIN_TISSUE = 0.5        # keep a tile when at least half of it is tissue (CLAM / TRIDENT default)
MPP_SLACK = 0.05        # a level up to 5% coarser than MPP still counts as "not coarser": scanners' 20x is 0.46-0.50
SNAP = 0.02             # read exactly TILE_SIZE px when within 2%: TRIDENT reads a 20x level as 20x, no resize
SEG_MPP = 8.0           # µm/px of the image tissue is found on (CLAM segments 40x scans at downsample 64, 16 µm/px)
MIN_SATURATION = 20     # Otsu floor (of 255): glass is S < 10 even under JPEG noise, eosin-pale stroma S > 40,
                        # so a blank slide (where Otsu splits noise) finds nothing
MIN_VALUE = 40          # darker pixels are black ink, folds' shadows or the slide edge, not stained tissue
INK_MARGIN = 20         # G > R + 20 is blue/green/teal marker: both H&E stains absorb green most, so tissue has G < R
MIN_PIECE_MM2 = 0.02    # tissue pieces smaller than this are dust or debris (CLAM's a_t area filter); ~1 tile
MAX_HOLE_MM2 = 0.02     # holes smaller than this are filled (gaps between cells); bigger ones (lumen, fat) stay holes
PLAIN_IMAGES = {'.png', '.jpg', '.jpeg'}  # read whole through PIL, as one level
SUFFIXES = {'.svs', '.tif', '.tiff', '.ndpi', '.vms', '.vmu', '.scn', '.mrxs', '.svslide', '.bif', '.czi',
            '.dcm'} | PLAIN_IMAGES  # what OpenSlide 4 opens, plus plain images
BENCH_TILES = 500       # tiles read per timed loop in --bench
COLUMNS = ['path', 'stem', 'status', 'n_tiles', 'slide_mpp', 'level', 'read_size', 'seconds', 'error']  # manifest
Image.MAX_IMAGE_PIXELS = None  # plain PNG/JPEG scans are far bigger than PIL's decompression-bomb limit


class SlideError(Exception):
    """An expected per-slide failure; its message is the one-line reason written to the manifest."""


# ----------------------------------------------------------------------------- slide metadata and levels

def open_slide(path):
    """OpenSlide for slide formats, openslide.ImageSlide (PIL) for plain images. A .tif that OpenSlide rejects is an
    error, not a PIL fallback: a truncated or strip-organised TIFF would otherwise be decoded whole, or fail later."""
    try:
        if os.path.splitext(path)[1].lower() in PLAIN_IMAGES:
            return openslide.ImageSlide(path)
        return openslide.OpenSlide(path)
    except Exception as e:
        size = os.path.getsize(path) / 2 ** 20 if os.path.exists(path) else 0
        raise SlideError(f"cannot open ({type(e).__name__}: {e}; {size:.1f} MiB): truncated or corrupt, or a format "
                         "OpenSlide 4 does not read (it reads SVS, NDPI, MRXS, SCN, BIF, CZI, DICOM, tiled TIFF); "
                         "convert it with `vips tiffsave in out.tif --tile --pyramid --compression jpeg`") from None


def find_mpp(slide, path, mpp_table=None, default=None):
    """Level-0 µm/px: a row of --mpp-csv for this slide, else the metadata (TRIDENT's order), else --slide-mpp."""
    for key in (os.path.abspath(path), os.path.basename(path), os.path.splitext(os.path.basename(path))[0]):
        if mpp_table and key in mpp_table:
            return mpp_table[key]
    props = slide.properties
    unit = {'centimeter': 1e4, 'inch': 25400.0}.get(props.get('tiff.ResolutionUnit'))
    resolution = unit / float(props['tiff.XResolution']) if unit and props.get('tiff.XResolution') else None
    found = next((float(m) for m in (props.get('openslide.mpp-x'), props.get('aperio.MPP'), resolution) if m), None)
    if found and 0.05 <= found <= 50:  # 72 or 300 dpi (353 or 85 µm/px) is a default of a non-scanner tool
        return found
    if default:
        return default
    power = props.get('openslide.objective-power')
    hint = (f' (it says {found:.4g} µm/px, not a scan resolution)' if found else '') + \
        (f' (objective {power}x suggests {10 / float(power):g})' if power else '')
    raise SlideError(f"no mpp in the slide metadata{hint}; give the level-0 µm/px with --slide-mpp 0.25 "
                     f"(all such slides) or a line '{os.path.basename(path)},0.25' in --mpp-csv (header slide,mpp)")


def pick_level(slide, slide_mpp, mpp, tile_size):
    """The coarsest level not coarser than the target mpp, and read_size: its pixels that cover one tile.
    40x and 20x scans of the same glass then give tiles of the same µm (CLAM reads 40x at a level as if 20x)."""
    level_mpps = [slide_mpp * d for d in slide.level_downsamples]
    fine_enough = [i for i, m in enumerate(level_mpps) if m <= mpp * (1 + MPP_SLACK)]
    if not fine_enough:
        raise SlideError(f"level 0 is {slide_mpp:.3f} µm/px, coarser than the target {mpp} µm/px; "
                         f"tile at --mpp {slide_mpp:.3g} or coarser instead of inventing resolution")
    level = max(fine_enough, key=lambda i: level_mpps[i])
    read_size = round(tile_size * mpp / level_mpps[level])
    if abs(read_size - tile_size) <= SNAP * tile_size:
        read_size = tile_size
    return level, read_size


def slide_bounds(slide):
    """Level-0 (x, y, w, h) of the scanned area: MRXS and some others scan only a rectangle of the glass."""
    p, (w, h) = slide.properties, slide.dimensions
    x, y = int(p.get('openslide.bounds-x', 0)), int(p.get('openslide.bounds-y', 0))
    return x, y, int(p.get('openslide.bounds-width', w)), int(p.get('openslide.bounds-height', h))


def read_thumbnail(slide, level, factor, bounds):
    """The bounds of pyramid `level` as uint8 RGB, shrunk by an integer `factor` (box average), read in bands of
    ~16 Mpx so a slide with no pyramid (one huge level) never needs the whole level in memory."""
    x0, y0, w0, h0 = bounds
    ds = slide.level_downsamples[level]
    w, h = max(1, int(w0 / ds)), max(1, int(h0 / ds))
    band = max(1, (1 << 24) // (w * factor)) * factor
    rows = []
    for y in range(0, h, band):
        rgba = np.asarray(slide.read_region((x0, y0 + round(y * ds)), level, (w, min(band, h - y))))
        rgb, clear = rgba[..., :3], rgba[..., 3] == 0
        if clear.any():  # unscanned (transparent) areas of MRXS and others are glass, not black tissue
            rgb = rgb.copy()
            rgb[clear] = 255
        rows.append(np.asarray(Image.fromarray(rgb).reduce(factor)))
    return np.concatenate(rows)


# ----------------------------------------------------------------------------- tissue detection and tile grid

def otsu(values):
    """Otsu's threshold of uint8 values: the split that maximises the between-class variance."""
    hist = np.bincount(values.ravel(), minlength=256).astype(np.float64)
    w0, m0 = np.cumsum(hist), np.cumsum(hist * np.arange(256))
    w1, m1 = w0[-1] - w0, m0[-1] - m0
    with np.errstate(divide='ignore', invalid='ignore'):
        between = w0 * w1 * (m0 / w0 - m1 / w1) ** 2
    return int(np.nanargmax(between)) if np.isfinite(between).any() else 255


def tissue_mask(rgb, seg_mpp):
    """Boolean tissue mask of an RGB thumbnail at seg_mpp µm/px."""
    hsv = np.asarray(Image.fromarray(rgb).convert('HSV'))
    # CLAM median-blurs the saturation channel before thresholding; a 3x3 box blur does the same job at a fraction of
    # the cost (PIL's median filter takes ~1 s on a 1 Mpx thumbnail), and speck removal follows anyway
    saturation = np.asarray(Image.fromarray(hsv[..., 1]).filter(ImageFilter.BoxBlur(1)))
    value = hsv[..., 2]
    red, green = rgb[..., 0].astype(np.int16), rgb[..., 1].astype(np.int16)
    mask = (saturation > max(otsu(saturation), MIN_SATURATION)) & (value >= MIN_VALUE) & (green <= red + INK_MARGIN)
    px_mm2 = (seg_mpp / 1000) ** 2
    pieces, n = ndimage.label(mask)  # drop specks: pieces smaller than MIN_PIECE_MM2
    mask = (np.bincount(pieces.ravel(), minlength=n + 1) * px_mm2 >= MIN_PIECE_MM2)[pieces] & mask
    holes, n = ndimage.label(~mask)  # fill holes: background pieces that are small and do not touch the border
    small = np.bincount(holes.ravel(), minlength=n + 1) * px_mm2 < MAX_HOLE_MM2
    small[np.unique(np.concatenate([holes[0], holes[-1], holes[:, 0], holes[:, -1]]))] = False
    small[0] = False
    return mask | small[holes]


def score_grid(mask, seg_ds, footprint, bounds):
    """Tissue fraction of every tile of the grid (rows × cols) at once, from an integral image of the mask.
    Tile (r, c) covers level-0 [c·footprint, (c+1)·footprint) from the bounds' origin; only whole tiles count."""
    integral = np.zeros((mask.shape[0] + 1, mask.shape[1] + 1), np.int32)
    integral[1:, 1:] = mask.cumsum(0, dtype=np.int32).cumsum(1, dtype=np.int32)
    cols, rows = int(bounds[2] // footprint), int(bounds[3] // footprint)
    ex = np.clip(np.rint(np.arange(cols + 1) * footprint / seg_ds), 0, mask.shape[1]).astype(int)
    ey = np.clip(np.rint(np.arange(rows + 1) * footprint / seg_ds), 0, mask.shape[0]).astype(int)
    y0, y1, x0, x1 = ey[:-1, None], ey[1:, None], ex[None, :-1], ex[None, 1:]
    inside = integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]
    return inside / np.maximum((y1 - y0) * (x1 - x0), 1)


def draw_qc(rgb, mask, tiles_px, tile_px, caption):
    """QC thumbnail: tissue outline in green, kept tiles in blue, what was done in the corner."""
    qc = rgb.copy()
    qc[mask & ~ndimage.binary_erosion(mask)] = (0, 170, 0)
    image = Image.fromarray(qc)
    draw = ImageDraw.Draw(image)
    for x, y in tiles_px:
        draw.rectangle((x, y, x + tile_px, y + tile_px), outline=(0, 60, 255))
    draw.text((4, 4), caption, fill=(0, 0, 0))
    return image


def save_atomic(path, write):
    """Write through a temporary name and rename: a killed run never leaves a half file that looks done."""
    tmp = os.path.join(os.path.dirname(path), f'.{os.path.basename(path)}.{os.getpid()}.tmp')
    with open(tmp, 'wb') as f:
        write(f)
    os.replace(tmp, path)


def tile_slide(path, stem, out_dir, mpp=MPP, tile_size=TILE_SIZE, min_tissue=MIN_TISSUE, mpp_table=None,
               slide_mpp=None):
    """Tile one slide: writes out_dir/<stem>.jpg then out_dir/<stem>.npz (the 'done' mark); returns a manifest row."""
    t0 = time.perf_counter()
    row = dict.fromkeys(COLUMNS, '') | dict(path=path, stem=stem, status='error', n_tiles=0)
    try:
        slide = open_slide(path)
        try:
            downsamples = slide.level_downsamples
            mpp0 = find_mpp(slide, path, mpp_table, slide_mpp)
            level, read_size = pick_level(slide, mpp0, mpp, tile_size)
            footprint = read_size * downsamples[level]  # level-0 px per tile side
            bounds = slide_bounds(slide)
            # segment on the coarsest level still finer than seg_mpp, then box-shrink to it; never level 0 when the
            # slide has a pyramid. seg_mpp is capped so a tile spans >= 8 thumbnail px (tissue fraction in 1/64s)
            seg_mpp = min(SEG_MPP, tile_size * mpp / 8)
            seg_level = max([i for i, d in enumerate(downsamples) if mpp0 * d <= seg_mpp] or [0],
                            key=lambda i: downsamples[i])
            factor = max(1, int(seg_mpp / (mpp0 * downsamples[seg_level])))
            rgb = read_thumbnail(slide, seg_level, factor, bounds)
            seg_ds = downsamples[seg_level] * factor  # level-0 px per thumbnail px
            mask = tissue_mask(rgb, mpp0 * seg_ds)
            tissue = score_grid(mask, seg_ds, footprint, bounds)
            rows, cols = np.nonzero(tissue >= min_tissue)
            coords = np.stack([bounds[0] + np.rint(cols * footprint), bounds[1] + np.rint(rows * footprint)], 1)
            coords = coords.astype(np.int64).reshape(-1, 2)
            try:  # read the first and last tile: an unreadable tile level fails here, not in the middle of training
                for x, y in coords[[0, -1]] if len(coords) else []:
                    slide.read_region((int(x), int(y)), level, (read_size, read_size))
            except openslide.OpenSlideError as e:
                raise SlideError(f'level {level} is unreadable (OpenSlideError: {e}): truncated or corrupt') from None
        finally:
            slide.close()
        caption = f'{stem}: {len(coords)} tiles, {tile_size}px at {mpp} um/px, level {level} read {read_size}px'
        qc = draw_qc(rgb, mask, np.stack([cols, rows], 1) * footprint / seg_ds, footprint / seg_ds, caption)
        save_atomic(os.path.join(out_dir, stem + '.jpg'), lambda f: qc.save(f, 'JPEG', quality=85))
        save_atomic(os.path.join(out_dir, stem + '.npz'), lambda f: np.savez(
            f, coords=coords, tissue=tissue[rows, cols].astype(np.float32), level=level, read_size=read_size,
            tile_size=tile_size, mpp=mpp, slide_mpp=mpp0, slide_path=os.path.abspath(path)))
        row.update(n_tiles=len(coords), slide_mpp=mpp0, level=level, read_size=read_size)
        if len(coords):
            row['status'] = 'ok'
        else:
            row['error'] = (f'no tissue: 0 of {tissue.size} grid tiles are >= {min_tissue:.0%} tissue '
                            f'(tissue covers {mask.mean():.1%} of the thumbnail; see {stem}.jpg)')
    except Exception as e:  # one bad slide must not stop the batch: record a one-line reason, never a traceback
        reason = str(e) if isinstance(e, SlideError) else f'{type(e).__name__}: {e}'
        row['error'] = ' '.join(reason.split())
    row['seconds'] = round(time.perf_counter() - t0, 3)
    return row


# ----------------------------------------------------------------------------- batch

def find_slides(inputs, exclude=None):
    """Slide files named or found (recursively) under the inputs, sorted. A DICOM series is a folder of .dcm files
    that OpenSlide opens from any one of them, so one file per folder is kept."""
    exclude = os.path.abspath(exclude) + os.sep if exclude else None
    found, dicom_dirs = [], set()
    for item in inputs:
        if os.path.isfile(item):  # named explicitly: always tried, whatever its suffix
            found.append(item)
            continue
        for p in sorted(os.path.join(d, f) for d, _, files in os.walk(item, followlinks=True) for f in files):
            root, ext = os.path.splitext(p)
            ext = ext.lower()
            qc = ext in PLAIN_IMAGES and (os.path.exists(root + '.npz') or exclude and
                                          os.path.abspath(p).startswith(exclude))  # our own QC picture
            if ext not in SUFFIXES or os.path.basename(p).startswith('.') or qc:
                continue
            if ext == '.dcm':
                if os.path.dirname(p) in dicom_dirs:
                    continue
                dicom_dirs.add(os.path.dirname(p))
            found.append(p)
    return sorted(set(found))


def unique_stems(paths):
    """File stems, with a short hash of the folder appended where two slides share one (a/S.svs, b/S.svs)."""
    stems = [os.path.splitext(os.path.basename(p))[0] for p in paths]
    dupes = {s for s, n in collections.Counter(stems).items() if n > 1}
    return [f"{s}-{hashlib.sha1(os.path.dirname(os.path.abspath(p)).encode()).hexdigest()[:8]}" if s in dupes else s
            for s, p in zip(stems, paths)]


def tile_slides(inputs, out_dir, mpp=MPP, tile_size=TILE_SIZE, min_tissue=MIN_TISSUE, workers=1, shard=None,
                overwrite=False, slide_mpp=None, mpp_csv=None):
    """Tile every slide under `inputs` into out_dir; returns the manifest rows (also written to manifest.csv)."""
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    out_dir = str(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    paths = find_slides([str(p) for p in inputs], exclude=out_dir)
    jobs = list(zip(paths, unique_stems(paths)))  # stems from the full list, so every shard agrees on them
    manifest = 'manifest.csv'
    if shard:
        index, count = map(int, shard.split('/')) if isinstance(shard, str) else shard
        jobs, manifest = jobs[index::count], f'manifest-{index}-of-{count}.csv'  # shards never share a manifest
    mpp_table = None
    if mpp_csv:
        with open(mpp_csv, newline='') as f:
            mpp_table = {row['slide'].strip(): float(row['mpp']) for row in csv.DictReader(f)}
    kwargs = dict(mpp=mpp, tile_size=tile_size, min_tissue=min_tissue, slide_mpp=slide_mpp, mpp_table=mpp_table)
    rows, todo = [], []
    for path, stem in jobs:
        npz = os.path.join(out_dir, stem + '.npz')
        if overwrite or not os.path.exists(npz):
            todo.append((path, stem))
            continue
        with np.load(npz) as done:  # finished earlier: report it, do not redo it
            settings, n = (float(done['mpp']), int(done['tile_size'])), len(done['coords'])
            row = dict(path=path, stem=stem, status='ok', n_tiles=n, slide_mpp=float(done['slide_mpp']),
                       level=int(done['level']), read_size=int(done['read_size']), seconds=0, error='')
        if settings != (mpp, tile_size):  # never mix two settings in one folder
            row.update(status='error', error=f'done earlier at {settings[0]} µm/px, {settings[1]} px; '
                                             'use another --out, or --overwrite')
        elif not n:
            row.update(status='error', error='no tissue (done earlier)')
        rows.append(row)
    with tqdm(total=len(jobs), initial=len(rows), unit='slide', desc='tiling') as bar:
        if workers <= 1:
            for path, stem in todo:
                rows.append(tile_slide(path, stem, out_dir, **kwargs))
                bar.update()
        else:
            with ProcessPoolExecutor(workers) as pool:
                futures = {pool.submit(tile_slide, path, stem, out_dir, **kwargs): (path, stem) for path, stem in todo}
                for future in as_completed(futures):
                    try:
                        rows.append(future.result())
                    except Exception as e:  # the worker process itself died (e.g. a crash inside a slide reader)
                        path, stem = futures[future]
                        rows.append(dict.fromkeys(COLUMNS, '') | dict(path=path, stem=stem, status='error', n_tiles=0,
                                                                      error=f'worker died: {type(e).__name__}'))
                    bar.update()
    rows.sort(key=lambda r: r['stem'])
    text = io.StringIO()
    writer = csv.DictWriter(text, COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    save_atomic(os.path.join(out_dir, manifest), lambda f: f.write(text.getvalue().encode()))
    return rows


# ----------------------------------------------------------------------------- reading tiles

class TileDataset:
    """Every tile of a tiles folder, as a map-style dataset for torch's DataLoader: ds[i] is a uint8 (3, tile_size,
    tile_size) tensor. Each process opens its own OpenSlide handles on first use (a handle is never shared across
    DataLoader workers: the cache is dropped when pickled or when the pid changes after a fork)."""

    def __init__(self, tiles_dir):
        files = sorted(f for f in os.listdir(tiles_dir) if f.endswith('.npz') and not f.startswith('.'))
        if not files:
            raise ValueError(f'no <stem>.npz in {tiles_dir}; run `python tile.py SLIDES --out {tiles_dir}` first')
        self.stems, self.slide_paths, self.levels, self.read_sizes, coords, sizes = [], [], [], [], [], set()
        for f in files:
            with np.load(os.path.join(tiles_dir, f)) as z:
                self.stems.append(f[:-4])
                self.slide_paths.append(str(z['slide_path']))
                self.levels.append(int(z['level']))
                self.read_sizes.append(int(z['read_size']))
                sizes.add(int(z['tile_size']))
                coords.append(z['coords'])
        if len(sizes) != 1:
            raise ValueError(f'{tiles_dir} mixes tile sizes {sorted(sizes)}; tile each size into its own folder')
        self.tile_size = sizes.pop()
        self.coords = np.concatenate(coords).reshape(-1, 2)
        self.slide_index = np.repeat(np.arange(len(files)), [len(c) for c in coords])
        self._handles, self._pid = {}, None

    def __len__(self):
        return len(self.coords)

    def __getstate__(self):
        return {**self.__dict__, '_handles': {}, '_pid': None}

    def slide(self, s):
        """This process's OpenSlide handle for slide s, opened on first use."""
        if self._pid != os.getpid():
            self._handles, self._pid = {}, os.getpid()
        if s not in self._handles:
            self._handles[s] = open_slide(self.slide_paths[s])
        return self._handles[s]

    def read(self, i):
        """Tile i as a uint8 (3, tile_size, tile_size) numpy array."""
        s, (x, y) = self.slide_index[i], self.coords[i]
        size = self.read_sizes[s]
        try:
            region = self.slide(s).read_region((int(x), int(y)), self.levels[s], (size, size))
        except openslide.OpenSlideError as e:  # say which tile; OpenSlide alone does not
            raise RuntimeError(f'{self.slide_paths[s]}: tile ({x}, {y}) at level {self.levels[s]}: {e}') from e
        if size != self.tile_size:  # no level at the target mpp: shrink from the finer one by area averaging
            region = region.convert('RGB')  # drop alpha first: Pillow premultiplies RGBA around every resample
            region = region.reduce(size // self.tile_size) if size % self.tile_size == 0 else \
                region.resize((self.tile_size,) * 2, Image.BOX)
        # RGBA -> RGB and HWC -> CHW in one numpy copy (PIL convert + a torch permute copy cost ~4x more here)
        return np.ascontiguousarray(np.asarray(region)[..., :3].transpose(2, 0, 1))

    def __getitem__(self, i):
        import torch  # only readers of tiles need torch; tiling never imports it
        return torch.from_numpy(self.read(i))


def bench(tiles_dir, n=BENCH_TILES):
    """Tiles/s on one core: TileDataset vs a bare OpenSlide read_region loop on the same tiles (same level/size)."""
    import torch
    torch.set_num_threads(1)
    ds = TileDataset(tiles_dir)
    order = np.random.default_rng(0).permutation(len(ds))[:n]  # random order, as a training loader reads
    handles = {}

    def bare(i):
        s = ds.slide_index[i]
        if s not in handles:
            handles[s] = open_slide(ds.slide_paths[s])
        handles[s].read_region(tuple(map(int, ds.coords[i])), ds.levels[s], (ds.read_sizes[s],) * 2)

    def timed(read):
        for i in order[:20]:  # warm-up: open handles, touch the files
            read(i)
        t0 = time.perf_counter()
        for i in order:
            read(i)
        return len(order) / (time.perf_counter() - t0)

    rates = {'bare': 0.0, 'dataset': 0.0}
    for _ in range(3):  # interleaved rounds, best of each, so a busy neighbour on the CPU hurts both alike
        rates['bare'] = max(rates['bare'], timed(bare))
        rates['dataset'] = max(rates['dataset'], timed(ds.__getitem__))
    resized = np.mean([ds.read_sizes[s] != ds.tile_size for s in ds.slide_index[order]])
    print(f'{len(order)} tiles of {len(ds)} from {len(ds.stems)} slides ({resized:.0%} shrunk from a finer level)')
    print(f"bare read_region: {rates['bare']:.0f} tiles/s/core | TileDataset: {rates['dataset']:.0f} tiles/s/core | "
          f"ratio {rates['dataset'] / rates['bare']:.0%}")
    return rates


# ----------------------------------------------------------------------------- synthetic slides (tests, demo)

@functools.lru_cache(maxsize=1)
def _stain_textures(size=1024):
    """A seamless 256 µm square of H&E at 0.25 µm/px (pink eosin, purple nuclei 5-9 µm wide, stain noise) and one
    of bare glass, each with box-averaged copies at every power-of-two coarser pixel size, as RGBX packed in uint32
    (one np.where per tile instead of three). The same for every slide: seeds vary the tissue layout."""
    rng = np.random.default_rng(0)
    image = Image.new('RGB', (size, size), (232, 150, 196))
    draw = ImageDraw.Draw(image)
    for x, y, r in zip(*rng.uniform(0, size, (2, 220)), rng.uniform(10, 18, 220)):
        for dx, dy in itertools.product((-size, 0, size), repeat=2):  # drawn 9 times: seamless when repeated
            draw.ellipse((x + dx - r, y + dy - 0.8 * r, x + dx + r, y + dy + 0.8 * r), fill=(92, 52, 142))
    tissue = np.asarray(image, np.float32) + rng.normal(0, 8, (size, size, 3)).astype(np.float32)
    glass = 245 + rng.normal(0, 2, (size, size, 3)).astype(np.float32)
    pyramid = []
    while size >= 1:  # copies smaller than a tile are repeated up to 256 px so a tile is always a plain slice
        packed = [np.pad(np.clip(t, 0, 255).astype(np.uint8), ((0, 0), (0, 0), (0, 1))).view(np.uint32)[..., 0]
                  for t in (tissue, glass)]
        pyramid.append([np.tile(p, (max(1, 256 // size),) * 2) for p in packed])
        size //= 2
        tissue, glass = [t.reshape(size, 2, size, 2, 3).mean((1, 3)) for t in (tissue, glass)] if size else (0, 0)
    return pyramid


def write_synthetic_slide(path, width=4096, height=3072, mpp=0.25, seed=0, aperio=False, blank=False):
    """Write an H&E-like pyramidal TIFF that OpenSlide opens: a few tissue blobs with nuclei on white glass and a blue
    pen circle, level 0 at `mpp` µm/px. Tissue is laid out in slide fractions and the stain in µm, so the same seed at
    (w, h, 0.25) and (w/2, h/2, 0.5) is the same glass scanned at 40x and 20x. Levels halve (or quarter, like Aperio,
    when aperio=True, which also writes an Aperio ImageDescription instead of resolution tags). Returns
    {'tissue_fraction': exact level-0 tissue fraction (pen excluded), 'mpp', 'size', 'levels', 'pen'}."""
    rng = np.random.default_rng(seed)
    blobs = rng.uniform([0.25, 0.25, 0.06, 0.06], [0.75, 0.75, 0.14, 0.14], (6, 4)).astype(np.float32)
    textures = _stain_textures()
    physical = np.array([width, height]) * mpp  # µm
    pen = (0.88 * physical[0], 0.15 * physical[1], 0.1 * physical.min(), 0.015 * physical.min())  # x, y, r, half-width
    sizes = [(width, height)]
    while max(sizes[-1]) > 512:
        sizes.append(tuple(-(-s // (4 if aperio else 2)) for s in sizes[-1]))
    tissue_px = 0

    def tiles(w, h):
        nonlocal tissue_px
        scale = mpp / 0.25 * width / w  # this level's pixel in 0.25 µm units, picks the texture copy
        stain, glass = textures[min(len(textures) - 1, max(0, round(math.log2(scale))))]
        period = len(stain)
        for ty in range(0, h, 256):
            for tx in range(0, w, 256):
                u = ((tx + np.arange(256, dtype=np.float32) + 0.5) / w)[None, :]  # pixel centres, slide fractions
                v = ((ty + np.arange(256, dtype=np.float32) + 0.5) / h)[:, None]
                inside = (u < 1) & (v < 1) & (not blank)
                field = sum(np.exp(-0.5 * ((v - cy) / sy) ** 2) * np.exp(-0.5 * ((u - cx) / sx) ** 2)
                            for cx, cy, sx, sy in blobs)
                tissue = (field > 0.5) & inside
                d2 = (u * physical[0] - pen[0]) ** 2 + (v * physical[1] - pen[1]) ** 2  # µm² from the pen circle
                ring = (d2 > (pen[2] - pen[3]) ** 2) & (d2 < (pen[2] + pen[3]) ** 2) & inside
                window = np.s_[ty % period:ty % period + 256, tx % period:tx % period + 256]
                rgbx = np.where(tissue, stain[window], glass[window])
                rgbx[ring] = np.array([40, 90, 180, 0], np.uint8).view(np.uint32)[0]
                if w == width:
                    tissue_px += int((tissue & ~ring).sum())
                yield rgbx.view(np.uint8).reshape(256, 256, 4)[..., :3]

    description = f'Aperio Image Library v12.0.15 \r\n{width}x{height} [0,0 {width}x{height}] (256x256) JPEG/RGB ' \
                  f'Q=80|MPP = {mpp}|AppMag = {10 / mpp:g}' if aperio else None
    with tifffile.TiffWriter(path, bigtiff=width * height * 3 > 2 ** 31) as tif:
        for level, (w, h) in enumerate(sizes):
            resolution = {} if aperio else dict(resolution=(1e4 / (mpp * width / w),) * 2, resolutionunit='CENTIMETER')
            tif.write(tiles(w, h), shape=(h, w, 3), dtype=np.uint8, tile=(256, 256), photometric='rgb',
                      compression='jpeg', compressionargs={'level': 80}, subfiletype=1 if level else 0,
                      description=description if level == 0 else None, metadata=None, **resolution)
    return {'tissue_fraction': tissue_px / (width * height), 'mpp': mpp, 'size': (width, height), 'levels': sizes,
            'pen': tuple(p / mpp for p in pen)}


def demo(out):
    """Synthetic slides (40x generic TIFF, 40x Aperio SVS, the same glass at 20x, a blank one), tiled and benched."""
    os.makedirs(os.path.join(out, 'slides'), exist_ok=True)
    for name, kw in [('g40.tif', {}), ('a40.svs', dict(aperio=True)), ('g20.tif', dict(width=2048, height=1536,
                      mpp=0.5)), ('blank.tif', dict(width=2048, height=1536, blank=True))]:
        info = write_synthetic_slide(os.path.join(out, 'slides', name), **kw)
        print(f"wrote {name}: {info['size']} px at {info['mpp']} µm/px, {info['tissue_fraction']:.1%} tissue")
    for r in tile_slides(os.path.join(out, 'slides'), os.path.join(out, 'tiles')):
        print(f"{r['stem']}: {r['status']}, {r['n_tiles']} tiles read at level {r['level']} as {r['read_size']} px, "
              f"{r['seconds']} s {r['error']}")
    bench(os.path.join(out, 'tiles'))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('inputs', nargs='*', help='slide files or folders (searched recursively)')
    parser.add_argument('--out', help='output folder for <stem>.npz, <stem>.jpg and manifest.csv')
    parser.add_argument('--mpp', type=float, default=MPP, help='target µm/px of a tile (0.5 ~ 20x, 0.25 ~ 40x)')
    parser.add_argument('--tile', type=int, default=TILE_SIZE, help='tile side in px at --mpp')
    parser.add_argument('--min-tissue', type=float, default=MIN_TISSUE, help='keep tiles at least this much tissue')
    parser.add_argument('--workers', type=int, default=1, help='slides tiled in parallel (processes)')
    parser.add_argument('--shard', help='I/N: only slides I, I+N, I+2N... (0-based) of the sorted list')
    parser.add_argument('--overwrite', action='store_true', help='redo slides that already have a <stem>.npz')
    parser.add_argument('--slide-mpp', type=float, help='level-0 µm/px for slides whose metadata has none')
    parser.add_argument('--mpp-csv', help="CSV 'slide,mpp' (slide = path, file name or stem); wins over metadata")
    parser.add_argument('--bench', metavar='TILES_DIR', help='time TileDataset vs bare read_region on a tiles folder')
    parser.add_argument('--demo', metavar='DIR', help='write synthetic slides into DIR, tile and bench them')
    args = parser.parse_args(argv)
    if args.bench:
        bench(args.bench)
        return 0
    if args.demo:
        demo(args.demo)
        return 0
    missing = [p for p in args.inputs + [args.mpp_csv] * bool(args.mpp_csv) if not os.path.exists(p)]
    if not args.inputs or not args.out or missing:
        parser.error(f'no such file or folder: {", ".join(missing)}' if missing else 'give SLIDE_OR_DIR ... --out DIR')
    index, _, count = (args.shard or '0/1').partition('/')
    if not (index.isdigit() and count.isdigit() and int(index) < int(count)):
        parser.error(f'--shard {args.shard}: expected I/N with 0 <= I < N, e.g. --shard 0/8')
    rows = tile_slides(args.inputs, args.out, args.mpp, args.tile, args.min_tissue, args.workers, args.shard,
                       args.overwrite, args.slide_mpp, args.mpp_csv)
    failed = [r for r in rows if r['status'] != 'ok']
    for r in failed:
        print(f"error {r['path']}: {r['error']}", file=sys.stderr)
    print(f"{len(rows)} slides: {len(rows) - len(failed)} ok, {len(failed)} failed, "
          f"{sum(r['n_tiles'] for r in rows)} tiles -> {args.out}")
    return 1 if failed or not rows else 0


if __name__ == '__main__':
    sys.exit(main())
